"""What a pretrained SAM teacher does alone, before any training: box-prompted Dice on the test sets.

``box``: SAM's own box prompt, the tight box of each ground-truth structure (the upper reference:
what the teacher can do when told where to look). ``none``: the whole-image box, no location
given. LiteMedSAM's input convention throughout: the image stretched to 256x256, pixels in
[0, 1] (8-bit frames / 255; ACDC slices as stored, grey repeated to RGB); the box is taken from
the mask stretched to 256x256, and Dice is computed there. Neither the learnable prompt heads nor
the adapters take part.

Scores: per case and foreground class, Dice of the union of its slices' predictions against the
label (a 2D frame is one slice). With ``box``, a class gets a box on each slice where the label
has it and nothing elsewhere; a case without the class has no box to give, so it is left out of
that class's score and named as excluded. With ``none``, one whole-image prediction per slice is
scored against every class, empty labels included, under the project's empty-mask policy
(``knowsam.metrics.EMPTY_MASK_POLICY``). mDice is the mean over the classes of each class's mean
over its scored cases (over cases alone for one class, as the polyp papers average).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from knowsam.config import SAM_ARCHS
from knowsam.data.sources import get_dataset
from knowsam.dice import class_masks, dice
from knowsam.errors import ConfigError, KnowsamError
from knowsam.metrics import metric

PROMPTS = ("box", "none")


@dataclass
class Case:
    test_set: str
    name: str
    images: torch.Tensor  # (D, 3, S, S) float in [0, 1], S the encoder's input size
    labels: np.ndarray  # (D, S, S) uint8 class ids


def frame_cases(raw: Path, spec, size: int, limit: int | None, test_sets: list[str] | None) -> Iterator[Case]:
    from knowsam.data.frames import (
        find_pairs,
        ordered_test_sets,
        read_image,
        read_mask,
        resize_binary_mask,
        resize_image,
    )

    for test_set in ordered_test_sets(spec, raw):
        folder = raw / "TestDataset" / test_set
        if not folder.is_dir() or (test_sets is not None and test_set not in test_sets):
            continue
        for name, image_path, mask_path in find_pairs(folder / "images", folder / "masks")[:limit]:
            image = resize_image(read_image(image_path), size, "bilinear")
            mask = resize_binary_mask(read_mask(mask_path), size, "bilinear")
            yield Case(test_set, name, torch.from_numpy(image)[None].float() / 255, mask[None])


def acdc_cases(raw: Path, spec, size: int, limit: int | None, test_sets: list[str] | None) -> Iterator[Case]:
    from knowsam.data.volumes import ACDC_TEST_PART, Job, read_h5_pair, read_list

    if test_sets is not None and ACDC_TEST_PART not in test_sets:
        return
    for name in read_list(raw / "test.list")[:limit]:
        job = Job(read_h5_pair, raw / "data" / f"{name}.h5", None, name, 0, True, size, "bilinear", spec.num_classes)
        image, label, _ = read_h5_pair(job)
        images = (
            F.interpolate(torch.from_numpy(image)[:, None], size=(size, size), mode="bilinear", align_corners=False)
            .clamp(0, 1)
            .expand(-1, 3, -1, -1)
        )
        labels = (
            F.interpolate(torch.from_numpy(label.astype(np.float32))[:, None], size=(size, size), mode="nearest")[:, 0]
            .numpy()
            .astype(np.uint8)
        )
        yield Case(ACDC_TEST_PART, name, images.contiguous(), labels)


CASE_READERS = {"frames": frame_cases, "ssl4mis-h5": acdc_cases}


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def prompts_for(labels: np.ndarray, num_classes: int, prompt: str) -> list[tuple[int, int, list[float]]]:
    """(slice, class, box) for every prompt; class 0 in ``none`` mode stands for every class."""
    size = labels.shape[-1]
    if prompt == "none":
        return [(d, 0, [0.0, 0.0, size - 1.0, size - 1.0]) for d in range(len(labels))]
    return [
        (d, c, tight_box(labels[d] == c))
        for d in range(len(labels))
        for c in range(1, num_classes)
        if (labels[d] == c).any()
    ]


def check_prompts(prompts: tuple[str, ...]) -> None:
    bad = [p for p in prompts if p not in PROMPTS]
    if bad:
        raise ConfigError(f"--prompt {bad[0]!r}: use one of {', '.join(PROMPTS)}")


def pretrained_teacher(
    arch: str, checkpoint: str, cache_dir: str, train, bf16: bool = False
) -> tuple[torch.nn.Module, str]:
    """The frozen teacher with its pretrained weights, in eval mode, and a one-line description of them.

    ``bf16`` (``sam.amp_bf16``): its prompt encoder and mask decoder run under bfloat16 autocast, as a
    training step with a cached encoder runs them; the encoder stays float32.
    """
    from knowsam.machine import pick_device
    from knowsam.models.sam_checkpoint import load_sam_weights, resolve_checkpoint
    from knowsam.models.sam_teacher import SamTeacher

    if arch not in SAM_ARCHS:  # before the checkpoint, which is looked up by arch
        raise ConfigError(f"--arch {arch!r} is not a SAM arch; known: {', '.join(SAM_ARCHS)}")
    if checkpoint == "none":
        raise KnowsamError(
            "teacher-check scores pretrained weights and sam.checkpoint is none: "
            "pass --arch lite_medsam --checkpoint bundled (or set them in params)",
            2,
        )
    path = resolve_checkpoint(checkpoint, arch, Path(cache_dir).expanduser())
    if train.threads:
        torch.set_num_threads(train.threads)
    size = 256  # LiteMedSAM's input; the ViTs run at the paper's size
    # The pretrained model as published: SAM's own decoder with every weight loaded (no adapters).
    teacher = SamTeacher(arch, size, 1, encoder="cached", decoder="stock", bf16=bf16)
    load_sam_weights(teacher, path)
    return teacher.to(pick_device(train.device)).eval(), f"{arch} {path.name}" + (", bf16 decoder" if bf16 else "")


def teacher_check(
    dataset: str,
    raw: Path,
    teacher,
    prompts: tuple[str, ...],
    *,
    limit: int | None = None,
    test_sets: list[str] | None = None,
    batch: int = 4,
    progress=None,
) -> dict:
    """{"prompt": {test set: {"n", "mDice", ["per_class"], "excluded"}}, "seconds", "images"} for the
    pretrained ``teacher``; ``n`` counts the cases scored, ``excluded`` names those left out (see the module)."""
    spec = get_dataset(dataset)
    if spec.reader not in CASE_READERS:
        raise KnowsamError(f"teacher-check reads 2D frame datasets and ACDC, not {dataset!r} ({spec.reader})")
    check_prompts(prompts)
    k = spec.num_classes
    scores: dict[str, dict[str, list[tuple[str, list[float | None]]]]] = {p: {} for p in prompts}
    started, images = time.perf_counter(), 0
    device = next(teacher.parameters()).device
    for case in CASE_READERS[spec.reader](raw, spec, teacher.encoder_size, limit, test_sets):
        with torch.no_grad():
            emb = torch.cat(
                [teacher.encode(case.images[i : i + batch].to(device)) for i in range(0, len(case.images), batch)]
            )
            for prompt in prompts:
                found = prompts_for(case.labels, k, prompt)
                pred = np.zeros((k, *case.labels.shape), dtype=bool)
                if found:
                    rows = torch.tensor([d for d, _, _ in found], device=device)
                    boxes = torch.tensor([b for _, _, b in found], device=device)
                    masks = (teacher.decode_boxes(emb, boxes, rows) > 0).cpu().numpy()
                    for (d, c, _), m in zip(found, masks):
                        pred[c, d] |= m
                truth = class_masks(case.labels, k)
                predicted = pred[1:] if prompt == "box" else np.broadcast_to(pred[0], truth.shape)
                values = dice(predicted, truth, truth.ndim - 1, both_empty=metric("mDice").both_empty)
                per_class = [
                    None if prompt == "box" and not present.any() else float(value)  # no box to give
                    for value, present in zip(values, truth)
                ]
                scores[prompt].setdefault(case.test_set, []).append((case.name, per_class))
        images += len(case.images)
        if progress is not None:
            progress(case)
    if not images:
        raise KnowsamError(
            f"{raw}: no test images found for {dataset}"
            + (f" in test sets {', '.join(test_sets)}" if test_sets else "")
        )
    out = {
        prompt: {part: _summary(rows, spec.class_names) for part, rows in parts.items()}
        for prompt, parts in scores.items()
    }
    return {"dataset": dataset, "scores": out, "images": images, "seconds": time.perf_counter() - started}


def _summary(rows: list[tuple[str, list[float | None]]], class_names: tuple[str, ...]) -> dict:
    """n, mDice (None when no case could be scored), per-class means (several classes) and excluded cases."""
    scores = np.array([[np.nan if v is None else v for v in per_class] for _, per_class in rows], dtype=float)
    scored = ~np.isnan(scores)
    class_means = [
        float(scores[scored[:, j], j].mean()) if scored[:, j].any() else None for j in range(scores.shape[1])
    ]
    present = [m for m in class_means if m is not None]
    entry: dict = {"n": int(scored.any(axis=1).sum()), "mDice": float(np.mean(present)) if present else None}
    if len(class_names) > 2:
        entry["per_class"] = dict(zip(class_names[1:], class_means))
    several = scores.shape[1] > 1
    entry["excluded"] = [
        f"{name}/{class_names[j + 1]}" if several else name
        for (name, _), row in zip(rows, scored)
        for j in np.flatnonzero(~row)
    ]
    return entry

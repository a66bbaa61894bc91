"""The volume readers: ACDC (``ssl4mis-h5``) and PROMISE12 (``promise12-mhd``) into the prepared format.

Models train on 2D slices, so training arrays hold slices whose ``case`` is given by the
spec's ``case_rule`` from their volume (ACDC: the patient; PROMISE12: the volume itself):
splits then stay case-level (all slices of a case on one side). Evaluation parts keep
every slice of each volume at training size plus the original label volume, so metrics
are computed per volume, at the original in-plane size, with the voxel spacing.

Images are resized with the configured interpolation (bilinear by default; PIL
antialiases when shrinking) and stored as float16 in [0, 1]; label ids are always resized
by nearest neighbour, since interpolating ids invents classes (between 1 and 3 lies 2).
Each file is checked as it is read: image/label shape mismatch, NaN/inf voxels and label
values outside ``0..K-1`` are errors naming the file, because any of them would corrupt
training or evaluation silently. Softer findings (list inconsistencies, patients in two
parts, identical slices across parts, volumes without foreground) go to the fingerprint.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from knowsam import fileio
from knowsam.data.dataset import meta_header, part_slug, write_npy, write_npz
from knowsam.data.sources import DatasetSpec
from knowsam.data.workers import map_in_workers
from knowsam.errors import KnowsamError, describe_error

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
NO_SPACING = (1.0, 1.0, 1.0)

ACDC_TEST_PART = "ACDC"
ACDC_PROTOCOL = "SSL4MIS lists: train_slices.list (training), val.list (validation), test.list (test)"
_ACDC_SLICE = re.compile(r"(patient\d{3}_frame\d{2})_slice_(\d+)")
_ACDC_VOLUME = re.compile(r"patient\d{3}_frame\d{2}")

PROMISE12_TEST_PART = "PROMISE12"
# PROMISE12 publishes no test labels, so the 50 labelled training cases are partitioned
# here, once, by case number: 35 training, 5 validation, 10 test cases.
PROMISE12_PARTITION: dict[str, tuple[int, ...]] = {
    "train": tuple(range(0, 35)),
    "val": tuple(range(35, 40)),
    "test": tuple(range(40, 50)),
}
PROMISE12_PROTOCOL = "case numbers 00-34 training, 35-39 validation, 40-49 test"
PROMISE12_CLIP_PERCENTILES = (0.5, 99.5)
PROMISE12_INTENSITY = "per volume: clipped to its 0.5th-99.5th intensity percentiles, then scaled linearly to [0, 1]"


@dataclass(frozen=True)
class Job:
    """One file (or image/label file pair) to read, check and resize; sent to worker processes."""

    reader: Callable[[Job], tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]
    path: Path  # the file named in errors (the image file for pairs)
    label_path: Path | None
    case: str
    first_slice: int
    keep_label: bool  # evaluation parts keep the original label volume
    size: int
    interpolation: str
    num_classes: int


@dataclass(frozen=True)
class Stack:
    """Consecutive slices of one case: training-size arrays plus what the fingerprint needs."""

    case: str
    source: str
    first_slice: int
    images: np.ndarray  # (D, 1, S, S) float16 in [0, 1]
    masks: np.ndarray  # (D, S, S) uint8 label ids
    label: np.ndarray | None  # original (D, H, W) uint8 label ids, evaluation parts only
    shape: tuple[int, int, int]  # original (D, H, W)
    spacing: tuple[float, float, float]  # (z, y, x) in mm; 1s (voxel units) where the source has none
    label_counts: tuple[int, ...]  # voxels per class at original resolution
    slice_hashes: tuple[str, ...]


# --- reading --------------------------------------------------------------------------


def read_h5_pair(job: Job) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """An SSL4MIS h5 file: 'image' (float, [0, 1]) and 'label' (ids); no spacing is stored."""
    import h5py

    try:
        with h5py.File(job.path, "r") as h5:
            missing = [k for k in ("image", "label") if k not in h5]
            if missing:
                raise KnowsamError(f"{job.path}: no '{missing[0]}' dataset in this h5 file (has {sorted(h5)})")
            groups = [k for k in ("image", "label") if not isinstance(h5[k], h5py.Dataset)]
            if groups:
                raise KnowsamError(f"{job.path}: '{groups[0]}' in this h5 file is a group, not an array")
            image, label = h5["image"][()], h5["label"][()]
    except OSError as exc:
        raise KnowsamError(f"{job.path}: unreadable h5 file ({describe_error(exc)})") from None
    image, label = np.asarray(image, dtype=np.float32), np.asarray(label)
    # A slice saved with a channel axis, (H, W, 1), would otherwise read as H slices of W x 1.
    while image.ndim > 2 and image.shape[-1] == 1:
        image = image[..., 0]
    while label.ndim > 2 and label.shape[-1] == 1:
        label = label[..., 0]
    if not job.keep_label and image.ndim != 2:  # training files are single slices
        raise KnowsamError(f"{job.path}: expected a 2D training slice, got image shape {image.shape}")
    if image.ndim == 2:  # a training slice
        image, label = image[None], label[None]
    if image.ndim != 3:
        raise KnowsamError(f"{job.path}: expected a 2D slice or a 3D volume, got image shape {image.shape}")
    _check_pair(job, image, label)
    if image.size and (image.min() < 0 or image.max() > 1):
        raise KnowsamError(
            f"{job.path}: image values span {image.min():g}..{image.max():g}, "
            "expected the SSL4MIS normalisation to [0, 1]"
        )
    return image, label, NO_SPACING


def read_mhd_pair(job: Job) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A MetaImage volume and its segmentation, (z, y, x) order, intensities scaled to [0, 1]."""
    image, spacing = read_mhd(job.path)
    label, label_spacing = read_mhd(job.label_path)
    if image.ndim != 3:
        raise KnowsamError(f"{job.path}: expected a 3D volume, got {image.ndim} dimensions")
    _check_pair(job, image, label)
    if not np.allclose(spacing, label_spacing, rtol=1e-3):
        raise KnowsamError(f"{job.label_path}: spacing {label_spacing} differs from its image's {spacing}")
    return normalise_percentiles(image, job.path), label, spacing


def read_mhd(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array in (z, y, x) order, spacing (z, y, x)) from the MetaImage header; SimpleITK orders axes (x, y, z)."""
    import SimpleITK as sitk

    try:
        volume = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise KnowsamError(f"{path}: unreadable MetaImage ({_missing_data_file(path) or _last_line(exc)})") from None
    return sitk.GetArrayFromImage(volume), tuple(float(s) for s in reversed(volume.GetSpacing()))


def normalise_percentiles(image: np.ndarray, path: Path) -> np.ndarray:
    """Clip to the volume's 0.5-99.5 percentiles, scale to [0, 1]: robust to the bright outliers
    (fat, coil artefacts) that make min-max scaling depend on a handful of voxels."""
    lo, hi = np.percentile(image, PROMISE12_CLIP_PERCENTILES)
    if hi <= lo:
        raise KnowsamError(f"{path}: image is constant between its intensity percentiles ({lo:g}); cannot normalise")
    return np.clip((image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _check_pair(job: Job, image: np.ndarray, label: np.ndarray) -> None:
    culprit = job.label_path or job.path
    if image.shape != label.shape:
        raise KnowsamError(f"{culprit}: label shape {label.shape} differs from image shape {image.shape}")
    bad = np.count_nonzero(~np.isfinite(image))
    if bad:
        raise KnowsamError(f"{job.path}: {bad} NaN/inf voxel(s) in the image")
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.rint(label)):
        raise KnowsamError(f"{culprit}: label holds non-integer values (dtype {label.dtype})")
    values = np.unique(label)
    outside = values[(values < 0) | (values >= job.num_classes)]
    if outside.size:
        raise KnowsamError(f"{culprit}: label values {outside.tolist()[:5]} outside 0..{job.num_classes - 1}")


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else exc.__class__.__name__


def _missing_data_file(header: Path) -> str | None:
    """ITK blames the header when the .raw beside it is missing; name the real culprit."""
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if match and match.group(1) != "LOCAL" and not (header.parent / match.group(1)).is_file():
        return f"its data file {header.parent / match.group(1)} is missing"
    return None


# --- resizing and loading -------------------------------------------------------------


def resize_volume(image: np.ndarray, label: np.ndarray, size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) -> (D, 1, S, S) float16 images and (D, S, S) uint8 ids; ids only by nearest neighbour."""
    images = np.empty((len(image), 1, size, size), np.float16)
    masks = np.empty((len(label), size, size), np.uint8)
    for k in range(len(image)):
        im = Image.fromarray(np.ascontiguousarray(image[k], dtype=np.float32))
        images[k, 0] = np.clip(np.asarray(im.resize((size, size), _PIL_FILTERS[interpolation])), 0.0, 1.0)
        lab = Image.fromarray(np.ascontiguousarray(label[k], dtype=np.uint8)).resize((size, size), Image.NEAREST)
        masks[k] = np.asarray(lab)
    return images, masks


def load_stack(job: Job) -> Stack:
    image, label, spacing = job.reader(job)
    label = label.astype(np.uint8)
    images, masks = resize_volume(image, label, job.size, job.interpolation)
    return Stack(
        case=job.case,
        source=str(job.path),
        first_slice=job.first_slice,
        images=images,
        masks=masks,
        label=label if job.keep_label else None,
        shape=tuple(label.shape),
        spacing=spacing,
        label_counts=tuple(int(n) for n in np.bincount(label.ravel(), minlength=job.num_classes)),
        slice_hashes=tuple(hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in image),
    )


def load_all(jobs: list[Job], workers: int) -> list[Stack]:
    if workers <= 1 or len(jobs) < 8:
        return [load_stack(j) for j in jobs]
    return map_in_workers(load_stack, jobs, workers, chunksize=max(1, len(jobs) // (8 * workers)))


# --- fingerprint ----------------------------------------------------------------------


def part_stats(stacks: list[Stack], class_names: tuple[str, ...]) -> dict:
    """Counts, slice sizes, label histogram and spacing of one part; one entry per case for spacing."""
    cases: dict[str, list[Stack]] = defaultdict(list)
    for s in stacks:
        cases[s.case].append(s)
    depths = np.array([sum(s.shape[0] for s in group) for group in cases.values()])
    voxels = np.sum([s.label_counts for s in stacks], axis=0) if stacks else np.zeros(len(class_names), int)
    present = {
        name: sum(any(s.label_counts[c] for s in group) for group in cases.values())
        for c, name in enumerate(class_names)
    }
    spacing = np.array([group[0].spacing for group in cases.values()]).reshape(-1, 3)
    sizes = Counter()
    for s in stacks:
        sizes[f"{s.shape[2]}x{s.shape[1]}"] += s.shape[0]
    return {
        "cases": len(cases),
        "slices": int(depths.sum()),
        "slices_per_case": _summary(depths),
        "slice_sizes": dict(sizes.most_common()),
        "label_voxels": {name: int(n) for name, n in zip(class_names, voxels)},
        "cases_with_class": present,
        "cases_without_foreground": sum(not any(sum(s.label_counts[1:]) for s in g) for g in cases.values()),
        "spacing": {axis: _summary(spacing[:, i]) for i, axis in enumerate("zyx")},
    }


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"min": 0, "median": 0, "max": 0}
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def cross_part_duplicates(train: list[Stack], part: str, stacks: list[Stack]) -> list[str]:
    """Slices of an evaluation part that are byte-identical to a training slice: a leak."""
    seen = {h: f"{s.case} slice {s.first_slice + k}" for s in train for k, h in enumerate(s.slice_hashes)}
    return sorted(
        f"{part}/{s.case} slice {k} == train/{seen[h]}"
        for s in stacks
        for k, h in enumerate(s.slice_hashes)
        if h in seen
    )


def volume_fingerprint(
    spec: DatasetSpec, *, train: list[Stack], val: list[Stack], test_part: str, test: list[Stack], problems: list[str]
) -> dict:
    """Per-part statistics plus every soft problem: leaks across parts and volumes without foreground."""
    evaluated = {"val": val, test_part: test}
    stats = {part: part_stats(stacks, spec.class_names) for part, stacks in evaluated.items()}
    problems = list(problems)
    for part, stacks in evaluated.items():
        dupes = cross_part_duplicates(train, part, stacks)
        stats[part]["duplicates_of_train"] = len(dupes)
        problems += [f"cross-set duplicate: {d}" for d in dupes]
        problems += [
            f"{s.source}: no foreground label in {part} volume {s.case}" for s in stacks if not any(s.label_counts[1:])
        ]
    return {
        "kind": spec.kind,
        "train": part_stats(train, spec.class_names),
        "val": stats["val"],
        "test_sets": {test_part: stats[test_part]},
        "unavailable": [],
        "problems": problems,
    }


# --- writing --------------------------------------------------------------------------


def _write_train(folder: Path, spec: DatasetSpec, stacks: list[Stack]) -> None:
    write_npy(folder / "train_images.npy", np.concatenate([s.images for s in stacks]))
    write_npy(folder / "train_masks.npy", np.concatenate([s.masks for s in stacks]))
    names = [f"{s.case}_slice_{s.first_slice + k}" for s in stacks for k in range(s.shape[0])]
    cases = [spec.case_of(s.case) for s in stacks for _ in range(s.shape[0])]
    fileio.write_text(folder / "train_index.csv", pd.DataFrame({"name": names, "case": cases}).to_csv(index=False))


def _write_eval_part(folder: Path, part: str, stacks: list[Stack], with_masks: bool) -> None:
    """Slices at training size in volume order, one index row per slice, the label volume per case."""
    slug = part_slug(part)
    write_npy(folder / f"{slug}_images.npy", np.concatenate([s.images for s in stacks]))
    if with_masks:
        write_npy(folder / f"{slug}_masks.npy", np.concatenate([s.masks for s in stacks]))
    rows = [
        {
            "name": f"{s.case}_slice_{k}",
            "case": s.case,
            "slice": k,
            "orig_h": s.shape[1],
            "orig_w": s.shape[2],
            "spacing_z": s.spacing[0],
            "spacing_y": s.spacing[1],
            "spacing_x": s.spacing[2],
        }
        for s in stacks
        for k in range(s.shape[0])
    ]
    fileio.write_text(folder / f"{slug}_index.csv", pd.DataFrame(rows).to_csv(index=False))
    write_npz(folder / f"{slug}_gt.npz", {s.case: s.label for s in stacks})


def write_volume_dataset(
    out: Path,
    spec: DatasetSpec,
    *,
    train: list[Stack],
    val: list[Stack],
    test_part: str,
    test: list[Stack],
    image_size: int,
    interpolation: str,
    protocol: str,
    intensity: str,
    spacing_unit: str,
    problems: list[str],
) -> dict:
    """Assemble the prepared folder in a temporary sibling and rename it into place (never half-written)."""
    if (spec.kind, spec.in_channels) != ("3d", 1):
        raise KnowsamError(
            f"dataset {spec.name!r}: the volume readers read single-channel 3D volumes, "
            f"not kind {spec.kind} with {spec.in_channels} channel(s)"
        )
    fingerprint = volume_fingerprint(spec, train=train, val=val, test_part=test_part, test=test, problems=problems)
    fingerprint.update(protocol=protocol, intensity=intensity, spacing_unit=spacing_unit)
    meta = {
        **meta_header(spec, image_size, interpolation),
        "label_interpolation": "nearest",
        "kind": spec.kind,
        "protocol": protocol,
        "intensity": intensity,
        "spacing_unit": spacing_unit,
        "train": fingerprint["train"]["slices"],
        "train_cases": fingerprint["train"]["cases"],
        "has_val": True,
        "val": len(val),
        "val_slices": fingerprint["val"]["slices"],
        "test_sets": {test_part: len(test)},
        "unavailable": [],
    }
    with fileio.atomic_dir(out, writer="knowsam-bench prepare") as tmp:
        _write_train(tmp, spec, train)
        _write_eval_part(tmp, "val", val, with_masks=True)
        _write_eval_part(tmp, test_part, test, with_masks=False)
        fileio.write_json(tmp / "fingerprint.json", fingerprint)
        fileio.write_json(tmp / "meta.json", meta)
    return meta


# --- datasets -------------------------------------------------------------------------


def read_list(path: Path) -> list[str]:
    """Non-empty lines of a split list; an empty list or a repeated name is an error, not a smaller split."""
    if not path.is_file():
        raise KnowsamError(f"{path}: split list not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise KnowsamError(f"{path}: split list is empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise KnowsamError(f"{path}: lists {repeated[0]!r} more than once")
    return names


def prepare_acdc(
    raw: Path, out: Path, spec: DatasetSpec, *, image_size: int, interpolation: str, workers: int = 2
) -> dict:
    """ACDC in the SSL4MIS layout: training from train_slices.list, val/test volumes from their lists."""
    common = dict(size=image_size, interpolation=interpolation, num_classes=spec.num_classes)
    slices = []
    for lineno, name in enumerate(read_list(raw / "train_slices.list"), 1):
        match = _ACDC_SLICE.fullmatch(name)
        if not match:
            raise KnowsamError(f"{raw / 'train_slices.list'}:{lineno}: {name!r} is not patientNNN_frameNN_slice_K")
        slices.append((match.group(1), int(match.group(2)), name))
    slices.sort(key=lambda t: (t[0], t[1]))
    parts = {}
    for part in ("train", "val", "test"):
        names = read_list(raw / f"{part}.list")
        bad = [n for n in names if not _ACDC_VOLUME.fullmatch(n)]
        if bad:
            raise KnowsamError(f"{raw / f'{part}.list'}: {bad[0]!r} is not a volume name patientNNN_frameNN")
        parts[part] = names
    jobs = [
        Job(read_h5_pair, _existing(raw / "data" / f"{name}.h5"), None, case, k, False, **common)
        for case, k, name in slices
    ]
    jobs += [
        Job(read_h5_pair, _existing(raw / "data" / f"{case}.h5"), None, case, 0, True, **common)
        for part in ("val", "test")
        for case in parts[part]
    ]
    stacks = load_all(jobs, workers)
    n_train, n_val = len(slices), len(parts["val"])
    return write_volume_dataset(
        out,
        spec,
        train=stacks[:n_train],
        val=stacks[n_train : n_train + n_val],
        test_part=ACDC_TEST_PART,
        test=stacks[n_train + n_val :],
        image_size=image_size,
        interpolation=interpolation,
        protocol=ACDC_PROTOCOL,
        intensity="as stored: SSL4MIS min-max scaling to [0, 1]",
        spacing_unit="voxel (the h5 files store no spacing)",
        problems=_acdc_problems(raw, spec, {case for case, _, _ in slices}, parts),
    )


def _acdc_problems(raw: Path, spec: DatasetSpec, slice_cases: set[str], parts: dict[str, list[str]]) -> list[str]:
    """List inconsistencies and cases (patients) shared between parts."""
    problems = []
    listed = set(parts["train"])
    if slice_cases != listed:
        problems.append(
            f"{raw / 'train.list'}: {len(listed - slice_cases)} volume(s) without slices in "
            f"train_slices.list, {len(slice_cases - listed)} sliced volume(s) not listed"
        )
    patients = {
        "train": {spec.case_of(c) for c in slice_cases},
        **{p: {spec.case_of(c) for c in parts[p]} for p in ("val", "test")},
    }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(patients[a] & patients[b])
        if shared:
            problems.append(
                f"patient(s) in both {a} and {b}: {', '.join(shared[:5])}"
                + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
            )
    return problems


def prepare_promise12(
    raw: Path,
    out: Path,
    spec: DatasetSpec,
    *,
    image_size: int,
    interpolation: str,
    workers: int = 2,
    partition: dict[str, tuple[int, ...]] = PROMISE12_PARTITION,
) -> dict:
    """PROMISE12 training_data/ (CaseNN.mhd + CaseNN_segmentation.mhd) split by ``partition``."""
    common = dict(size=image_size, interpolation=interpolation, num_classes=spec.num_classes)
    folder = raw / "training_data"
    numbers = [n for part in ("train", "val", "test") for n in partition[part]]
    if len(set(numbers)) != len(numbers) or not all(partition[part] for part in ("train", "val", "test")):
        raise KnowsamError(f"{folder}: the PROMISE12 partition {partition} must give each part cases, none twice")
    jobs = {
        part: [
            Job(
                read_mhd_pair,
                _existing(folder / f"Case{n:02d}.mhd"),
                _existing(folder / f"Case{n:02d}_segmentation.mhd"),
                f"Case{n:02d}",
                0,
                part != "train",
                **common,
            )
            for n in partition[part]
        ]
        for part in ("train", "val", "test")
    }
    stacks = load_all([j for part in ("train", "val", "test") for j in jobs[part]], workers)
    n_train, n_val = len(jobs["train"]), len(jobs["val"])
    listed = {f"Case{n:02d}" for n in numbers}
    extra = sorted(p.stem for p in folder.glob("Case[0-9][0-9].mhd") if p.stem not in listed)
    problems = [f"{folder}: case(s) outside the partition, not used: {', '.join(extra)}"] if extra else []
    return write_volume_dataset(
        out,
        spec,
        train=stacks[:n_train],
        val=stacks[n_train : n_train + n_val],
        test_part=PROMISE12_TEST_PART,
        test=stacks[n_train + n_val :],
        image_size=image_size,
        interpolation=interpolation,
        protocol=PROMISE12_PROTOCOL,
        intensity=PROMISE12_INTENSITY,
        spacing_unit="mm (MetaImage header)",
        problems=problems,
    )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise KnowsamError(f"{path}: file not found")
    return path

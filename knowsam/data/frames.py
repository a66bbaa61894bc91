"""The ``frames`` reader: image and mask folders -> the prepared format (see ``knowsam.data.dataset``).

Reads the PraNet layout (``TrainDataset/{images,masks}`` and ``TestDataset/<set>/{images,masks}``)
of the polyp datasets and the synthetic demo: RGB frames with binary masks. Each image/mask
pair is checked (missing mask, size mismatch, non-binary values) and exact duplicates
across train/test are found by content hash. A fingerprint report (counts, sizes,
foreground fraction, problems) is written next to the arrays.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from knowsam import fileio
from knowsam.data.dataset import meta_header, part_slug, write_npy, write_npz
from knowsam.data.image_files import image_files, open_image
from knowsam.data.masks import MaskSource, check_empty_share, decode_mask, grey_levels
from knowsam.data.sources import DatasetSpec
from knowsam.data.workers import map_in_workers
from knowsam.errors import KnowsamError, describe_error

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class PairResult:
    name: str
    image: np.ndarray  # (C, S, S) uint8
    mask_small: np.ndarray  # (S, S) uint8 class ids
    mask_orig: np.ndarray  # (H, W) uint8 class ids
    image_sha256: str
    nonbinary_pixels: int


def read_tiff(path: Path, keep_16bit: bool = False) -> np.ndarray:
    """The first image of a TIFF as stored: (H, W) or (H, W, samples), 8-bit (16-bit kept for masks).

    The layout comes from the sample axes, not the colour tag: polyp distributions (CVC,
    ETIS-LaribPolypDB) include colour TIFFs tagged as greyscale, which PIL refuses.
    Planar files (samples first) are turned samples-last. Compressions that tifffile decodes
    only with optional codecs (LZW, JPEG) occur in ordinary RGB-tagged TIFFs, which PIL reads.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise KnowsamError(f"{path}: unreadable image (a TIFF without any image)")
            page = tif.pages[0]
            arr, axes = page.asarray(), page.axes
    except (OSError, ValueError) as exc:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError):
            raise KnowsamError(f"{path}: unreadable TIFF ({describe_error(exc)})") from None
    if axes.startswith("S") and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return arr if keep_16bit else (arr >> 8).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise KnowsamError(f"{path}: unsupported TIFF sample type {arr.dtype} (expected 8- or 16-bit integers)")
    return arr


def read_image(path: Path) -> np.ndarray:
    """An RGB frame as (H, W, 3) uint8; TIFFs go through ``read_tiff`` (colour frames tagged as grey)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = read_tiff(path)
    else:
        arr = np.asarray(open_image(path).convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise KnowsamError(f"{path}: expected a colour image, got array shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8, copy=False)


def read_mask(path: Path) -> np.ndarray:
    """A binary mask as (H, W) uint8 class ids, decoded by the policy of ``knowsam.data.masks``."""
    return decode_mask(open_mask(path), source=path)


def open_mask(path: Path) -> MaskSource:
    """A mask file as stored, for ``decode_mask``: TIFFs as arrays (grey-tagged colour TIFFs), others as images."""
    return read_tiff(path, keep_16bit=True) if path.suffix.lower() in (".tif", ".tiff") else open_image(path, "mask")


def resize_image(arr: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """(H, W, C) uint8 -> (C, S, S); PIL's bilinear filter antialiases when shrinking."""
    im = Image.fromarray(arr).resize((size, size), _PIL_FILTERS[interpolation])
    return np.asarray(im).transpose(2, 0, 1).copy()


def resize_binary_mask(mask: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Binary {0,1} mask to S x S: bilinear coverage thresholded at 0.5 keeps boundaries smooth."""
    im = Image.fromarray(mask * 255).resize((size, size), _PIL_FILTERS[interpolation])
    return (np.asarray(im) > 127).astype(np.uint8)


def find_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) matched by file stem; a frame without a mask is an error.

    ETIS-LaribPolypDB's own distribution names the mask of frame ``N.tif`` ``pN.tif``: that
    name is accepted when no mask has the frame's exact stem.
    """
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise KnowsamError(f"{d}: folder not found")
    images, masks = image_files(images_dir), image_files(masks_dir)
    if not images:
        raise KnowsamError(f"{images_dir}: no images found")
    for path in (*images.values(), *masks.values()):
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes come back as surrogates
            raise KnowsamError(
                f"{path.parent}: file name {os.fsencode(path.name)!r} is not valid UTF-8; rename it"
            ) from None
    paired = {stem: masks.get(stem) or masks.get(f"p{stem}") for stem in images}
    missing = sorted(stem for stem, mask in paired.items() if mask is None)
    if missing:
        raise KnowsamError(
            f"{images[missing[0]]}: no mask named {missing[0]} or p{missing[0]} in {masks_dir} "
            f"({len(missing)} frame(s) without a mask)"
        )
    return [(stem, images[stem], paired[stem]) for stem in sorted(images, key=_natural_key)]


def _natural_key(stem: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem))


def load_pair(args: tuple[str, Path, Path, int, str]) -> PairResult:
    name, image_path, mask_path, size, interpolation = args
    image = read_image(image_path)
    mask = open_mask(mask_path)
    binary = decode_mask(mask, source=mask_path)
    if binary.shape != image.shape[:2]:
        raise KnowsamError(
            f"{mask_path}: mask size {binary.shape[1]}x{binary.shape[0]} differs from "
            f"its image's {image.shape[1]}x{image.shape[0]}"
        )
    levels = grey_levels(mask, source=mask_path)
    nonbinary = 0 if levels is None else int(np.count_nonzero((levels != 0) & (levels != 255)))
    return PairResult(
        name=name,
        image=resize_image(image, size, interpolation),
        mask_small=resize_binary_mask(binary, size, interpolation),
        mask_orig=binary,
        image_sha256=hashlib.sha256(image.tobytes()).hexdigest(),
        nonbinary_pixels=nonbinary,
    )


def _load_all(pairs, size: int, interpolation: str, workers: int) -> list[PairResult]:
    jobs = [(n, i, m, size, interpolation) for n, i, m in pairs]
    if workers <= 1 or len(jobs) < 32:
        return [load_pair(j) for j in jobs]
    return map_in_workers(load_pair, jobs, workers, chunksize=16)


def _stats(results: list[PairResult]) -> dict:
    sizes = Counter(f"{r.mask_orig.shape[1]}x{r.mask_orig.shape[0]}" for r in results)
    fg = np.array([r.mask_orig.mean() for r in results]) if results else np.zeros(0)
    return {
        "n": len(results),
        "sizes": dict(sizes.most_common()),
        "foreground_fraction": {
            "mean": float(fg.mean()) if len(fg) else 0.0,
            "min": float(fg.min()) if len(fg) else 0.0,
            "max": float(fg.max()) if len(fg) else 0.0,
        },
        "empty_masks": int(sum(r.mask_orig.max() == 0 for r in results)),
        "nonbinary_masks": int(sum(r.nonbinary_pixels > 0 for r in results)),
    }


def ordered_test_sets(spec: DatasetSpec, raw: Path) -> list[str]:
    """Test sets in table order: the spec's optional parts, else (synthetic data) the folders found."""
    named = [p.name for p in spec.parts if p.optional]
    if named:
        return named
    if not (raw / "TestDataset").is_dir():
        raise KnowsamError(f"{raw / 'TestDataset'}: folder not found (expected TestDataset/<set>/images and masks)")
    return sorted(p.name for p in (raw / "TestDataset").iterdir() if p.is_dir() and not p.name.startswith("."))


def _empty_mask_problems(pairs: list[tuple[str, Path, Path]], results: list[PairResult]) -> list[str]:
    mask_paths = [mask for _, _, mask in pairs]
    return check_empty_share(mask_paths[0].parent, mask_paths, [not r.mask_orig.any() for r in results], open_mask)


def prepare_frames(
    raw: Path,
    out: Path,
    spec: DatasetSpec,
    *,
    image_size: int,
    interpolation: str,
    test_sets: list[str] | None = None,
    workers: int = 2,
) -> dict:
    """Prepare ``raw/TrainDataset`` and each available ``raw/TestDataset/<set>`` into ``out``.

    ``test_sets`` picks the test sets and their order (default: ``ordered_test_sets``). Output
    is assembled in a temporary sibling folder and renamed into place, so an interrupted
    preparation never leaves a half-prepared dataset behind.
    """
    if (spec.kind, spec.in_channels, spec.num_classes) != ("2d", 3, 2):
        raise KnowsamError(
            f"dataset {spec.name!r}: the frames reader reads 2D RGB frames with binary masks, "
            f"not kind {spec.kind} with {spec.in_channels} channel(s) and {spec.num_classes} classes"
        )
    if test_sets is None:
        test_sets = ordered_test_sets(spec, raw)
    with fileio.atomic_dir(out, writer="knowsam-bench prepare") as tmp:
        train_pairs = find_pairs(raw / "TrainDataset" / "images", raw / "TrainDataset" / "masks")
        train = _load_all(train_pairs, image_size, interpolation, workers)
        problems = _empty_mask_problems(train_pairs, train)
        write_npy(tmp / "train_images.npy", np.stack([r.image for r in train]))
        write_npy(tmp / "train_masks.npy", np.stack([r.mask_small for r in train]))
        fileio.write_text(
            tmp / "train_index.csv",
            pd.DataFrame({"name": [r.name for r in train], "case": [spec.case_of(r.name) for r in train]}).to_csv(
                index=False
            ),
        )
        fingerprint = {"train": _stats(train), "test_sets": {}, "unavailable": [], "problems": problems}
        train_hashes = {r.image_sha256: r.name for r in train}
        available = []
        for test_set in test_sets:
            folder = raw / "TestDataset" / test_set
            if not folder.is_dir():
                fingerprint["unavailable"].append(test_set)
                continue
            fingerprint["test_sets"][test_set], problems = _write_test_set(
                tmp, folder, test_set, train_hashes, image_size, interpolation, workers
            )
            fingerprint["problems"] += problems
            available.append(test_set)
        meta = {
            **meta_header(spec, image_size, interpolation),
            "kind": spec.kind,
            "train": len(train),
            "test_sets": {s: fingerprint["test_sets"][s]["n"] for s in available},
            "unavailable": fingerprint["unavailable"],
            "has_val": False,
        }
        fileio.write_json(tmp / "fingerprint.json", fingerprint)
        fileio.write_json(tmp / "meta.json", meta)
    return meta


def _write_test_set(
    tmp: Path,
    folder: Path,
    test_set: str,
    train_hashes: dict[str, str],
    image_size: int,
    interpolation: str,
    workers: int,
) -> tuple[dict, list[str]]:
    """One test set's images (training size), index and ground truth (original size); its stats and problems
    (empty masks, and frames identical to a training frame)."""
    pairs = find_pairs(folder / "images", folder / "masks")
    results = _load_all(pairs, image_size, interpolation, workers)
    problems = _empty_mask_problems(pairs, results)
    slug = part_slug(test_set)
    write_npy(tmp / f"{slug}_images.npy", np.stack([r.image for r in results]))
    index = pd.DataFrame(
        {
            "name": [r.name for r in results],
            "case": [r.name for r in results],
            "slice": 0,
            "orig_h": [r.mask_orig.shape[0] for r in results],
            "orig_w": [r.mask_orig.shape[1] for r in results],
            "spacing_z": 1.0,
            "spacing_y": 1.0,
            "spacing_x": 1.0,
        }
    )
    fileio.write_text(tmp / f"{slug}_index.csv", index.to_csv(index=False))
    write_npz(tmp / f"{slug}_gt.npz", {r.name: r.mask_orig for r in results})
    stats = _stats(results)
    dupes = sorted(
        f"{test_set}/{r.name} == train/{train_hashes[r.image_sha256]}"
        for r in results
        if r.image_sha256 in train_hashes
    )
    stats["duplicates_of_train"] = len(dupes)
    return stats, problems + [f"cross-set duplicate: {d}" for d in dupes]

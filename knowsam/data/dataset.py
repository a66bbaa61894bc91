"""The prepared-dataset format and its reader: the file boundary between preparation and training/evaluation.

``data/prepared/<dataset>/``::

    meta.json                  dataset, num_classes, in_channels, image_size, parts and counts
    train_images.npy           (N, C, S, S) uint8 (8-bit sources) or float16 in [0, 1]; memory-mapped
    train_masks.npy            (N, S, S) uint8 class ids at training size
    train_index.csv            name, case (slices of one volume share a case)
    <part>_images.npy          evaluation parts (test sets, and "val" where the dataset defines one)
    <part>_index.csv           name, case, slice, orig_h, orig_w, spacing_z, spacing_y, spacing_x
    <part>_gt.npz              one original-resolution label array per case (2D image or 3D volume)

Training reads the arrays memory-mapped; evaluation predicts at training size and scores
against the original masks in ``*_gt.npz``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from knowsam import fileio
from knowsam.errors import KnowsamError

FORMAT_VERSION = 1


def meta_header(spec, image_size: int, interpolation: str) -> dict:
    """The first keys of every prepared dataset's meta.json (``spec``: a ``sources.DatasetSpec``)."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "class_names": list(spec.class_names),
        "image_size": image_size,
        "interpolation": interpolation,
    }


def part_slug(part: str) -> str:
    """File-name-safe form of a part name (test set names contain dashes and may contain spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part)


def write_npy(path: Path, arr: np.ndarray) -> None:
    """One array of the format, written atomically (readers memory-map it, so never half a file)."""
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(_PythonWrites(fh), arr)


class _PythonWrites:
    """A file that numpy takes for a plain stream, so it writes through Python's file object: numpy's own
    ``tofile`` reports a full disk as a short write without errno, which no disk-full check recognises."""

    def __init__(self, fh):
        self.write = fh.write


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Named arrays (the original-resolution labels, one per case), compressed, written atomically."""
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


@dataclass
class PreparedDataset:
    root: Path

    @cached_property
    def meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.is_file():
            raise KnowsamError(f"{path}: prepared dataset not found; run the prepare stage first")
        try:
            meta = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise KnowsamError(f"{path}: unreadable ({type(exc).__name__}); re-run the prepare stage") from None
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise KnowsamError(
                f"{path}: prepared with format version {version}, "
                f"this version reads {FORMAT_VERSION}; re-run the prepare stage"
            )
        return meta

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.meta["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def eval_parts(self) -> list[str]:
        """Evaluation parts in the dataset's table order (test sets; "val" is separate)."""
        return list(self.meta["test_sets"])

    def images(self, part: str = "train") -> np.ndarray:
        return self._read(f"{part_slug(part)}_images.npy", np.load, mmap_mode="r")

    def masks(self) -> np.ndarray:
        return self._read("train_masks.npy", np.load, mmap_mode="r")

    def index(self, part: str = "train") -> pd.DataFrame:
        return self._read(f"{part_slug(part)}_index.csv", pd.read_csv, dtype={"name": str, "case": str})

    def ground_truth(self, part: str) -> np.lib.npyio.NpzFile:
        return self._read(f"{part_slug(part)}_gt.npz", np.load)

    def _read(self, name: str, reader, **kwargs):
        """A file of the prepared dataset; a missing or damaged one is a one-line error."""
        _ = self.meta  # a dataset that was never prepared (or is of another format) says so first
        path = self.root / name
        try:
            return reader(path, **kwargs)
        # np.load: ValueError on a bad header, EOFError on an empty file (which typer would turn into "Aborted!")
        except (OSError, ValueError, EOFError, pd.errors.ParserError) as exc:
            raise KnowsamError(
                f"{path}: missing or unreadable ({type(exc).__name__}); re-run the prepare stage"
            ) from None


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> [0, 1] float32; float16 arrays are already in [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)

"""Preparation entry point: runs the reader a dataset's spec names on ``<raw_root>/<dataset>``."""

from __future__ import annotations

from pathlib import Path

from knowsam import fileio
from knowsam.config import DataParams
from knowsam.data.frames import prepare_frames
from knowsam.data.sources import get_dataset
from knowsam.data.volumes import prepare_acdc, prepare_promise12
from knowsam.errors import KnowsamError

# Keyed by ``DatasetSpec.reader``: one reader per raw format, each called as
# ``reader(raw, out, spec, image_size=..., interpolation=...)`` and returning meta.json's content.
READERS = {"frames": prepare_frames, "ssl4mis-h5": prepare_acdc, "promise12-mhd": prepare_promise12}


def prepare_dataset(name: str, data: DataParams, reports_root: str | Path = "reports/fingerprints") -> dict:
    """Prepare ``<raw_root>/<name>`` into ``<prepared_root>/<name>``; copy its fingerprint to ``reports_root``."""
    spec = get_dataset(name)
    raw = Path(data.raw_root) / name
    if not raw.is_dir():
        raise KnowsamError(f"{raw}: raw dataset folder not found; run `knowsam-bench acquire {name}` first")
    if not any(raw.iterdir()):
        raise KnowsamError(f"{raw}: raw dataset folder is empty; run `knowsam-bench acquire {name}` first")
    out = Path(data.prepared_root) / name
    meta = READERS[spec.reader](raw, out, spec, image_size=data.image_size, interpolation=data.interpolation)
    fingerprint = (out / "fingerprint.json").read_text()
    fileio.write_text(Path(reports_root) / f"{name}.json", fingerprint)
    return meta

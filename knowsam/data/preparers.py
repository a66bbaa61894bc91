"""Preparation entry point: picks the preparer for a dataset's on-disk layout."""

from __future__ import annotations

from pathlib import Path

from knowsam import io
from knowsam.config import Params
from knowsam.data.prepare import prepare_polyp_layout
from knowsam.data.prepare_volumes import prepare_acdc, prepare_promise12
from knowsam.data.sources import get_dataset
from knowsam.errors import KnowsamError

# Volume datasets differ in file format and split protocol, so each has its own preparer.
VOLUME_PREPARERS = {"acdc": prepare_acdc, "promise12": prepare_promise12}


def polyp_test_sets(spec, raw: Path) -> list[str]:
    """Test sets in table order: the spec's named parts, else (synthetic data) the folders found."""
    named = [p.name for p in spec.parts if p.optional]
    if named:
        return named
    if not (raw / "TestDataset").is_dir():
        raise KnowsamError(f"{raw / 'TestDataset'}: folder not found (expected TestDataset/<set>/images and masks)")
    return sorted(p.name for p in (raw / "TestDataset").iterdir() if p.is_dir())


def prepare_dataset(name: str, params: Params, reports_root: str | Path = "reports/fingerprints") -> dict:
    spec = get_dataset(name)
    raw = Path(params.data.raw_root) / name
    if not raw.is_dir():
        raise KnowsamError(f"{raw}: raw dataset folder not found; run `knowsam-bench acquire {name}` first")
    if not any(raw.iterdir()):
        raise KnowsamError(f"{raw}: raw dataset folder is empty; run `knowsam-bench acquire {name}` first")
    out = Path(params.data.prepared_root) / name
    if spec.kind == "polyp-2d":
        meta = prepare_polyp_layout(raw, out, dataset=name, image_size=params.data.image_size,
                                    interpolation=params.data.interpolation, test_sets=polyp_test_sets(spec, raw))
    elif spec.kind == "volume-mri" and name in VOLUME_PREPARERS:
        meta = VOLUME_PREPARERS[name](raw, out, spec, image_size=params.data.image_size,
                                      interpolation=params.data.interpolation)
    else:
        raise KnowsamError(f"{name}: no preparer for dataset kind {spec.kind!r}")
    fingerprint = (out / "fingerprint.json").read_text()
    io.write_text(Path(reports_root) / f"{name}.json", fingerprint)
    return meta

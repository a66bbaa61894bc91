"""Shared fixtures: a tiny prepared demo dataset and small, fast params."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from knowsam import config

# One thread: small test tensors gain little from two, and two threads slow down badly
# (OpenMP barriers spin) whenever anything else runs on a 2-core machine.
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``name``, registered while in use (its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def mirror_root() -> Path | None:
    """The offline data mirror the package would use (``$KNOWSAM_MIRROR``), if that folder exists."""
    from knowsam.data.sources import mirror_folder

    path = mirror_folder()
    return path if path is not None and path.is_dir() else None


@functools.cache  # decoded once for all real-image tests (callers must not modify the tensors)
def polyp_images(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training frames of the polyp mirror at ``size`` px, as the preparer resizes them.

    Without the mirror, the built-in demo's frames (same layout, synthetic polyps) stand in, so a
    machine without the real data still checks that every method learns.
    """
    import numpy as np

    from knowsam.data.frames import find_pairs, load_pair

    root = mirror_root()
    train = root / "polyp" / "TrainDataset" if root else None
    if train is None or not (train / "images").is_dir():
        train = _demo_frames(n) / "TrainDataset"
    pairs = find_pairs(train / "images", train / "masks")[:n]
    loaded = [load_pair((name, img, mask, size, "bilinear")) for name, img, mask in pairs]
    x = torch.from_numpy(np.stack([r.image for r in loaded])).float() / 255.0
    y = torch.from_numpy(np.stack([r.mask_small for r in loaded])).long()
    return x, y


@functools.cache
def _demo_frames(n: int) -> Path:
    import atexit
    import shutil
    import tempfile

    from knowsam.data.demo import generate_demo

    root = Path(tempfile.mkdtemp(prefix="knowsam-demo-frames-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    generate_demo(root / "demo", seed=0, n_train=n, test_sets={"Demo-Kvasir": 1})
    return root / "demo"


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory) -> Path:
    """A 48-image demo dataset prepared at 32 px; returns the workspace root holding data/."""
    from knowsam.data.demo import generate_demo
    from knowsam.data.frames import prepare_frames
    from knowsam.data.sources import DEMO

    root = tmp_path_factory.mktemp("ws")
    generate_demo(root / "data/raw/demo", seed=0, n_train=48, test_sets={"Demo-Kvasir": 6, "Demo-Colon": 6})
    prepare_frames(
        root / "data/raw/demo",
        root / "data/prepared/demo",
        DEMO,
        image_size=32,
        interpolation="bilinear",
        test_sets=["Demo-Kvasir", "Demo-Colon"],
        workers=1,
    )
    return root


def small_params(root: Path, **train_overrides) -> config.Params:
    """Demo profile shrunk for tests, with paths inside ``root``."""
    import yaml

    raw = yaml.safe_load((REPO / "knowsam/profiles/demo.yaml").read_text())
    params = config.parse(raw)
    data = dataclasses.replace(
        params.data,
        raw_root=str(root / "data/raw"),
        prepared_root=str(root / "data/prepared"),
        splits_root=str(root / "data/splits"),
        image_size=32,
    )
    train = dataclasses.replace(
        params.train,
        **{
            "iterations": 6,
            "batch_size": 4,
            "labeled_batch": 2,
            "eval_every": 3,
            "checkpoint_every": 3,
            "threads": 1,
            **train_overrides,
        },
    )
    return dataclasses.replace(params, data=data, train=train)

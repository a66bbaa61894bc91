"""Labeled/unlabeled/validation splits: deterministic, case-level, nested across ratios.

For a seed, one permutation of the training cases decides everything: the first
``floor(ratio * n_cases)`` cases (at least 1) are labeled, the last
``floor(val_fraction * n_cases)`` are the validation set (unless the dataset ships its
own validation part, e.g. ACDC's val list), the rest is unlabeled. Because the
permutation does not depend on the ratio, the 5% labeled set is inside the 10% one.
All slices of a case (volume) fall on the same side.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from knowsam import fileio
from knowsam.config import ratio_text
from knowsam.data.dataset import PreparedDataset
from knowsam.errors import KnowsamError

SPLIT_VERSION = 1
ROUNDING_RULE = "labeled cases = max(1, floor(ratio x n_training_cases)); 10% of 1450 = 145, 5% = 72"


def split_path(splits_root: str | Path, dataset: str, ratio: float, seed: int) -> Path:
    return Path(splits_root) / dataset / f"ratio-{ratio_text(ratio)}_seed-{seed}.json"


def labeled_count(ratio: float, n_cases: int) -> int:
    # The epsilon absorbs binary floating point (0.1 * 1450 = 145.00000000000003 is fine,
    # but 0.29 * 100 = 28.999999999999996 must give 29).
    return max(1, math.floor(ratio * n_cases + 1e-9))


def make_split(data: PreparedDataset, ratio: float, seed: int, val_fraction: float) -> dict:
    cases = sorted(data.index("train")["case"].unique())
    n = len(cases)
    perm = [cases[i] for i in np.random.default_rng(seed).permutation(n)]
    own_val = bool(data.meta.get("has_val"))
    n_val = 0 if own_val else math.floor(val_fraction * n)
    n_lab = min(labeled_count(ratio, n), n - n_val)
    if n_lab < 1:
        raise KnowsamError(
            f"{data.root}: {n} training cases leave none to label after holding out {n_val} for validation"
        )
    labeled, unlabeled = perm[:n_lab], perm[n_lab : n - n_val]
    validation = perm[n - n_val :] if n_val else []
    return {
        "version": SPLIT_VERSION,
        "dataset": data.meta["dataset"],
        "ratio": ratio,
        "seed": seed,
        "rounding": ROUNDING_RULE,
        "validation_source": "dataset val part"
        if own_val
        else f"floor({val_fraction} x n_cases) held-out training cases",
        "counts": {
            "training_cases": n,
            "labeled": len(labeled),
            "unlabeled": len(unlabeled),
            "validation": len(validation) if not own_val else int(data.meta.get("val", 0)),
            "test": dict(data.meta["test_sets"]),
        },
        "labeled": sorted(labeled),
        "unlabeled": sorted(unlabeled),
        "validation": sorted(validation),
    }


def write_split(data: PreparedDataset, out: Path, ratio: float, seed: int, val_fraction: float) -> dict:
    split = make_split(data, ratio, seed, val_fraction)
    fileio.write_json(out, split)
    return split


def read_split(path: Path, data: PreparedDataset) -> dict:
    """Load a split and check it against the prepared dataset it claims to split."""
    import json

    if not path.is_file():
        raise KnowsamError(f"{path}: split file not found; run the split stage first")
    try:
        split = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KnowsamError(f"{path}: not a valid JSON split file") from None
    if split.get("version") != SPLIT_VERSION:
        raise KnowsamError(
            f"{path}: split version {split.get('version')} is not {SPLIT_VERSION}; re-run the split stage"
        )
    known = set(data.index("train")["case"])
    for key in ("labeled", "unlabeled", "validation"):
        unknown = [c for c in split.get(key, []) if c not in known]
        leaked = _test_case(data, split.get(key, []), known)
        if leaked:
            raise KnowsamError(
                f"{path}: '{key}' names case {leaked[0]!r} of test set {leaked[1]!r}; "
                "training and test cases must not overlap"
            )
        if unknown:
            raise KnowsamError(
                f"{path}: '{key}' names {len(unknown)} case(s) not in the prepared training set, e.g. {unknown[0]!r}"
            )
    overlap = set(split["labeled"]) & (set(split["unlabeled"]) | set(split["validation"]))
    if overlap:
        raise KnowsamError(f"{path}: case {sorted(overlap)[0]!r} is both labeled and unlabeled/validation")
    return split


def _test_case(data: PreparedDataset, cases: list[str], train_cases: set[str]) -> tuple[str, str] | None:
    """(case, test set) for the first split case that is a test case: one that only the test set
    has, or one the training set has too with identical images (a name alone may recur across the
    source datasets of a polyp training pool, so a shared name with other images is no overlap)."""
    wanted = set(cases)
    if not wanted:
        return None
    train_index = None
    for part in data.eval_parts:
        index = data.index(part)
        for case in sorted(wanted & set(index["case"])):
            if case not in train_cases:
                return case, part
            if train_index is None:
                train_index = data.index("train")
            a = data.images("train")[np.flatnonzero(train_index["case"].to_numpy() == case)]
            b = data.images(part)[np.flatnonzero(index["case"].to_numpy() == case)]
            if a.shape == b.shape and np.array_equal(a, b):
                return case, part
    return None

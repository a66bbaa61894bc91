"""Splits: rounding rule, determinism, nesting across ratios, case level, validation against data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from knowsam.data.dataset import PreparedDataset
from knowsam.data.splits import labeled_count, make_split, read_split, write_split
from knowsam.errors import KnowsamError


def test_rounding_rule_matches_the_polyp_protocol():
    assert labeled_count(0.10, 1450) == 145
    assert labeled_count(0.05, 1450) == 72
    assert labeled_count(0.29, 100) == 29
    assert labeled_count(0.001, 100) == 1


def test_split_sizes_and_disjointness(demo_prepared):
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    split = make_split(data, 0.25, seed=0, val_fraction=0.1)
    assert split["counts"]["labeled"] == 12 and split["counts"]["validation"] == 4
    assert split["counts"]["unlabeled"] == 48 - 12 - 4
    members = split["labeled"] + split["unlabeled"] + split["validation"]
    assert len(set(members)) == 48


def test_split_files_byte_identical_for_a_seed_and_different_for_another(demo_prepared, tmp_path):
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    c = tmp_path / "c.json"
    write_split(data, a, 0.1, 0, 0.1)
    write_split(data, b, 0.1, 0, 0.1)
    write_split(data, c, 0.1, 1, 0.1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_smaller_ratio_is_nested_in_larger(demo_prepared):
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    small = make_split(data, 0.1, 3, 0.1)
    large = make_split(data, 0.25, 3, 0.1)
    assert set(small["labeled"]) < set(large["labeled"])
    assert small["validation"] == large["validation"]


def test_case_level_split_keeps_slices_together(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    cases = [f"patient{i:03d}" for i in range(20) for _ in range(5)]
    pd.DataFrame({"name": [f"{c}_slice_{k}" for k, c in enumerate(cases)], "case": cases}).to_csv(
        root / "train_index.csv", index=False
    )
    (root / "meta.json").write_text(json.dumps({"format_version": 1, "dataset": "vol", "test_sets": {}}))
    split = make_split(PreparedDataset(root), 0.1, 0, 0.1)
    assert split["counts"]["labeled"] == 2 and split["counts"]["validation"] == 2
    assert all(c.startswith("patient") for c in split["labeled"])
    assert len(set(split["labeled"]) | set(split["unlabeled"]) | set(split["validation"])) == 20


def test_split_naming_unknown_images_is_refused(demo_prepared, tmp_path):
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    path = tmp_path / "s.json"
    split = write_split(data, path, 0.1, 0, 0.1)
    split["labeled"].append("not-an-image")
    path.write_text(json.dumps(split))
    with pytest.raises(KnowsamError, match="'labeled' names 1 case\\(s\\) not in the prepared training set"):
        read_split(path, data)


def test_prepared_arrays_match_the_raw_files(demo_prepared):
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    images, masks = data.images("train"), data.masks()
    assert images.shape == (48, 3, 32, 32) and images.dtype == np.uint8
    assert masks.shape == (48, 32, 32) and set(np.unique(masks)) <= {0, 1}
    gt = data.ground_truth("Demo-Kvasir")
    index = data.index("Demo-Kvasir")
    for row in index.itertuples():
        assert gt[row.case].shape == (row.orig_h, row.orig_w)

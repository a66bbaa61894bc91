"""Per-case metrics against medpy, hand-computed cases and the empty-mask policy."""

from __future__ import annotations

import math
import re

import medpy.metric.binary as mb
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from knowsam.errors import ConfigError, KnowsamError
from knowsam.metrics import BINARY_METRICS, EMPTY_MASK_POLICY, binary_metrics, case_metrics, summarize
from tests.conftest import mirror_root

MEDPY = {
    "dice": lambda p, g, s: mb.dc(p, g),
    "iou": lambda p, g, s: mb.jc(p, g),
    "hd95": mb.hd95,
    "asd": mb.asd,
    "assd": mb.assd,
    "hd": mb.hd,
    "hd_x095_paper": lambda p, g, s: 0.95 * mb.hd(p, g, s),
    "precision": lambda p, g, s: mb.precision(p, g),
    "recall": lambda p, g, s: mb.recall(p, g),
}


def assert_matches_medpy(pred: np.ndarray, gt: np.ndarray, spacing=None, keys=BINARY_METRICS) -> None:
    """Compare with the reference: one medpy call per metric, as the usual per-image loop does."""
    ours = binary_metrics(pred, gt, spacing)
    assert list(ours) == list(BINARY_METRICS)
    for key in keys:
        assert ours[key] == pytest.approx(MEDPY[key](pred, gt, spacing), rel=1e-12, abs=1e-12), key


def blobs(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Random multi-component shapes, often touching the array border."""
    return ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5 + 0.02 * rng.standard_normal()


@pytest.mark.parametrize("seed", range(6))
def test_random_2d_shapes_match_medpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, gt = blobs(rng, (48, 61), 2.5), blobs(rng, (48, 61), 2.5)
    assert pred.any() and gt.any()
    assert_matches_medpy(pred, gt)
    assert_matches_medpy(pred, gt, spacing=(0.7, 1.9))


def test_3d_anisotropic_spacing_matches_medpy() -> None:
    rng = np.random.default_rng(7)
    gt = blobs(rng, (9, 30, 26), 2.0)
    pred = ndimage.binary_dilation(np.roll(gt, (1, -2, 3), axis=(0, 1, 2)))
    assert_matches_medpy(pred, gt, spacing=(3.0, 0.8, 1.25))


def test_pooled_hd95_differs_from_directed_percentile() -> None:
    # gt: 4x4 square (12 surface pixels). pred: the same square plus two isolated
    # pixels 10 and 20 pixels right of the square's edge (14 surface pixels).
    gt = np.zeros((10, 30), bool)
    gt[0:4, 0:4] = True
    pred = gt.copy()
    pred[0, 13] = pred[0, 23] = True
    m = binary_metrics(pred, gt)
    # Pooled: 24 zeros, 10, 20 -> 26 values; rank 0.95 * 25 = 23.75 -> 0 + 0.75 * 10.
    # (The 95th percentile of pred->gt alone would be 10 + 0.35 * 10 = 13.5.)
    assert m["hd95"] == pytest.approx(7.5)
    assert m["asd"] == pytest.approx(30 / 14)
    assert m["assd"] == pytest.approx(30 / 26)
    assert m["hd"] == pytest.approx(20.0)
    assert m["hd_x095_paper"] == pytest.approx(19.0)
    assert m["dice"] == pytest.approx(32 / 34)
    assert m["iou"] == pytest.approx(16 / 18)
    assert m["precision"] == pytest.approx(16 / 18)
    assert m["recall"] == 1.0


def test_parallel_lines_with_spacing_hand_computed() -> None:
    # Axis 0 spacing 0.5, axis 1 spacing 2. pred: row 2, cols 1..8; gt: row 5, cols 1..10.
    pred = np.zeros((8, 12), bool)
    gt = np.zeros((8, 12), bool)
    pred[2, 1:9] = True
    gt[5, 1:11] = True
    m = binary_metrics(pred, gt, spacing=(0.5, 2.0))
    far = [math.hypot(1.5, 2.0), math.hypot(1.5, 4.0)]  # gt cols 9 and 10 to pred col 8
    pooled = np.sort([1.5] * 16 + far)  # 8 pred->gt, 8 + 2 gt->pred
    assert m["asd"] == pytest.approx(1.5)
    assert m["hd"] == pytest.approx(far[1])
    assert m["hd95"] == pytest.approx(pooled[16] + 0.15 * (pooled[17] - pooled[16]))
    assert m["assd"] == pytest.approx(pooled.mean())
    assert m["dice"] == m["iou"] == m["precision"] == m["recall"] == 0.0


def test_both_empty_is_perfect() -> None:
    m = binary_metrics(np.zeros((5, 7)), np.zeros((5, 7)))
    assert m == {
        "dice": 1.0,
        "iou": 1.0,
        "hd95": 0.0,
        "asd": 0.0,
        "assd": 0.0,
        "hd": 0.0,
        "hd_x095_paper": 0.0,
        "precision": 1.0,
        "recall": 1.0,
    }


@pytest.mark.parametrize("missing", ["pred", "gt"])
@pytest.mark.parametrize(
    ("shape", "spacing", "diagonal"),
    [((30, 40), (2.0, 1.0), math.hypot(60, 40)), ((4, 5, 6), (2.0, 1.0, 0.5), math.sqrt(98)), ((30, 40), None, 50.0)],
)
def test_one_empty_mask_scores_worst(missing: str, shape, spacing, diagonal: float) -> None:
    full = np.zeros(shape, bool)
    full[(slice(1, 3),) * len(shape)] = True
    empty = np.zeros(shape, bool)
    pred, gt = (empty, full) if missing == "pred" else (full, empty)
    m = binary_metrics(pred, gt, spacing)
    for key in ("dice", "iou", "precision", "recall"):
        assert m[key] == 0.0, key
    for key in ("hd95", "asd", "assd", "hd"):
        assert m[key] == pytest.approx(diagonal), key
    assert m["hd_x095_paper"] == pytest.approx(0.95 * diagonal)
    # The penalty exceeds any distance a non-empty prediction can reach.
    corner = np.zeros(shape, bool)
    corner[(-1,) * len(shape)] = True
    reachable = binary_metrics(corner, full, spacing)["hd"]
    assert reachable < m["hd"]


def test_policy_text_states_what_the_metrics_compute() -> None:
    """Every value the policy text (printed in leaderboards and summaries) promises is what is computed."""
    both = re.search(r"both empty, ((?:\w+ = )+)(\d) and all distances are (\d)", EMPTY_MASK_POLICY)
    one = re.search(
        r"exactly one is empty[^,]*, ((?:\w+ = )+)(\d) and every distance equals the image diagonal", EMPTY_MASK_POLICY
    )
    assert both and one, EMPTY_MASK_POLICY
    shape, spacing = (30, 40), (2.0, 1.0)
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[5:9, 5:9] = True
    distances = ("hd95", "asd", "assd", "hd")
    m = binary_metrics(empty, empty, spacing)
    for name in both.group(1).split(" = ")[:-1]:
        assert m[name.lower()] == float(both.group(2)), name
    assert all(m[key] == float(both.group(3)) for key in distances)
    for pred, gt in ((empty, full), (full, empty)):
        m = binary_metrics(pred, gt, spacing)
        for name in one.group(1).split(" = ")[:-1]:
            assert m[name.lower()] == float(one.group(2)), name
        assert all(m[key] == pytest.approx(math.hypot(60, 40)) for key in distances)


def test_case_metrics_multiclass_per_class_and_mean() -> None:
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (6, 20, 22))
    gt = ndimage.median_filter(gt, size=3).astype(np.uint8)
    pred = np.roll(gt, 1, axis=2)
    pred[pred == 2] = 0  # class 2 never predicted: a miss for that class
    spacing = (2.5, 1.0, 0.75)
    m = case_metrics(pred, gt, 4, spacing)
    for c in (1, 3):
        for key in ("dice", "hd95", "asd", "precision", "recall"):
            ref = MEDPY[key](pred == c, gt == c, spacing)
            assert m[f"{key}_c{c}"] == pytest.approx(ref, rel=1e-12), (key, c)
    assert m["dice_c2"] == 0.0
    assert m["hd95_c2"] == pytest.approx(float(np.linalg.norm(np.multiply(gt.shape, spacing))))
    for key in BINARY_METRICS:
        assert m[key] == pytest.approx(np.mean([m[f"{key}_c{c}"] for c in (1, 2, 3)]))


def test_case_metrics_two_classes_reduce_to_binary() -> None:
    rng = np.random.default_rng(5)
    gt, pred = blobs(rng, (32, 32), 2.0), blobs(rng, (32, 32), 2.0)
    m = case_metrics(pred.astype(np.int64), gt.astype(np.int64), 2, spacing=1.5)
    binary = binary_metrics(pred, gt, spacing=1.5)
    assert {k: m[k] for k in BINARY_METRICS} == binary
    assert {k: m[f"{k}_c1"] for k in BINARY_METRICS} == binary


def test_class_absent_from_both_counts_as_perfect() -> None:
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 2:5] = 1
    m = case_metrics(labels, labels, 3)
    assert m["dice_c2"] == 1.0 and m["hd95_c2"] == 0.0 and m["dice"] == 1.0


@pytest.mark.parametrize(
    ("pred", "gt", "num_classes", "error", "text"),
    [
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), 2, KnowsamError, "shape"),
        (np.full((4, 4), 3, np.uint8), np.zeros((4, 4), np.uint8), 3, KnowsamError, "outside 0..2"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), 2, KnowsamError, "float32"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), 1, ConfigError, "num_classes"),
    ],
)
def test_case_metrics_rejects_bad_input(pred, gt, num_classes, error, text) -> None:
    with pytest.raises(error, match=text):
        case_metrics(pred, gt, num_classes)


@pytest.mark.parametrize("spacing", [-1.0, (1.0, 0.0), (1.0, float("nan")), (1.0, 2.0, 3.0)])
def test_bad_spacing_is_rejected(spacing) -> None:
    mask = np.ones((3, 3), bool)
    with pytest.raises(KnowsamError, match="spacing"):
        binary_metrics(mask, mask, spacing)


def test_summarize_is_mean_of_per_image_values() -> None:
    # Image a: large, perfect. Image b: small, half overlap. Global Dice would be ~1.
    per_case = pd.DataFrame(
        {
            "name": ["a", "b"],
            "case": [17, 18],  # an integer id column must not be averaged
            "dice": [1.0, 0.5],
            "iou": [1.0, 1 / 3],
            "hd95": [0.0, 4.0],
            "asd": [0.0, 2.0],
            "recall": [1.0, 0.5],
        }
    )
    s = summarize(per_case)
    assert s["n"] == 2
    assert s["mDice"] == pytest.approx(0.75)
    assert s["mDice_std"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert s["mIoU"] == pytest.approx(2 / 3)
    assert s["HD95"] == pytest.approx(2.0) and s["ASD"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.75)
    assert "dice" not in s and "name" not in s and "case" not in s


def test_summarize_single_case_and_refusals() -> None:
    assert summarize(pd.DataFrame({"dice": [0.4]}))["mDice_std"] is None
    with pytest.raises(KnowsamError, match="'hd95'"):
        summarize(pd.DataFrame({"dice": [0.4, 0.5], "hd95": [1.0, np.nan]}))
    with pytest.raises(KnowsamError, match="empty"):
        summarize(pd.DataFrame({"dice": []}))
    with pytest.raises(KnowsamError, match="no metric columns"):
        summarize(pd.DataFrame({"case": [1, 2]}))


def test_summarize_keeps_per_class_columns() -> None:
    s = summarize(pd.DataFrame({"dice": [0.5, 0.7], "dice_c1": [0.4, 0.6], "hd95_c12": [1.0, 3.0], "dice_cx": [9, 9]}))
    assert s["mDice"] == pytest.approx(0.6)
    assert s["dice_c1"] == pytest.approx(0.5) and s["hd95_c12"] == pytest.approx(2.0)
    assert "dice_cx" not in s


def test_real_polyp_masks_match_medpy() -> None:
    mirror = mirror_root()
    test_sets = mirror / "polyp" / "TestDataset" if mirror else None
    if test_sets is None or not test_sets.is_dir():
        pytest.skip("polyp mirror not found: set KNOWSAM_MIRROR to the offline data folder")
    subsets = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "Kvasir")
    paths = [p for subset in subsets for p in sorted((test_sets / subset / "masks").glob("*.png"))[:5]]
    assert len(paths) == 20
    for i, path in enumerate(paths):
        gt = np.asarray(Image.open(path).convert("L")) > 127
        pred = np.roll(gt, (4 - i % 9, 3 * (i % 3) - 3), axis=(0, 1))
        pred = ndimage.binary_erosion(pred) if i % 2 else ndimage.binary_dilation(pred, iterations=2)
        assert pred.any(), path
        # assd, hd and hd_x095_paper come from the same two distance sets as hd95 and
        # are checked on synthetic shapes above; skipping them halves medpy's cost here.
        assert_matches_medpy(pred, gt, keys=("dice", "iou", "hd95", "asd", "precision", "recall"))

"""``knowsam.dice``: the one Dice, against a computation written apart, per image and class, both empty-mask rules."""

from __future__ import annotations

import numpy as np
import pytest

from knowsam.dice import class_masks, dice
from knowsam.errors import KnowsamError


def reference_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int, both_empty: float) -> np.ndarray:
    """(K-1, N): one image and one class at a time, by set sizes."""
    out = np.zeros((num_classes - 1, len(pred_labels)))
    for c in range(1, num_classes):
        for i, (p, g) in enumerate(zip(pred_labels, gt_labels)):
            p_set = {tuple(ix) for ix in np.argwhere(p == c)}
            g_set = {tuple(ix) for ix in np.argwhere(g == c)}
            size = len(p_set) + len(g_set)
            out[c - 1, i] = both_empty if size == 0 else 2 * len(p_set & g_set) / size
    return out


def random_labels(rng: np.random.Generator, n: int, num_classes: int, shape: tuple[int, ...]) -> np.ndarray:
    """Label maps where some images miss a class (or all of them) in prediction, ground truth or both."""
    labels = rng.integers(0, num_classes, (n, *shape))
    for i in range(n):
        labels[i][np.isin(labels[i], rng.choice(num_classes, rng.integers(0, num_classes), replace=False))] = 0
    labels[0] = 0  # an image with no foreground at all
    return labels


@pytest.mark.parametrize("both_empty", [1.0, 0.0])
@pytest.mark.parametrize(("num_classes", "shape"), [(2, (9, 11)), (4, (7, 8)), (3, (3, 5, 6))])
def test_equals_a_computation_written_apart(both_empty: float, num_classes: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(num_classes)
    pred = random_labels(rng, 12, num_classes, shape)
    gt = random_labels(rng, 12, num_classes, shape)
    gt[0] = pred[0]  # both empty in every class
    pred[1], gt[2] = 0, 0  # a miss and a false alarm of every class present
    expected = reference_dice(pred, gt, num_classes, both_empty)
    got = dice(class_masks(pred, num_classes), class_masks(gt, num_classes), len(shape), both_empty=both_empty)
    assert got.shape == (num_classes - 1, 12)
    assert got.tolist() == expected.tolist()  # the same divisions, so exactly
    assert (got[:, 0] == both_empty).all()
    for image, other in ((1, gt[1]), (2, pred[2])):  # nothing predicted; nothing to find
        assert got[:, image].tolist() == [0.0 if (other == c).any() else both_empty for c in range(1, num_classes)]
    # Every kind of pair occurs: both empty, one empty, overlapping.
    assert (expected == both_empty).any() and ((expected > 0) & (expected < 1)).any()


def test_one_volume_is_one_case() -> None:
    """The image axes are the last ``image_ndim``: a volume's slices pool into one Dice, not a mean of slices."""
    pred = np.zeros((2, 4, 4), bool)
    gt = np.zeros((2, 4, 4), bool)
    pred[0, :2, :2] = True  # 4 voxels, all right, on slice 0
    gt[0, :2, :2] = True
    gt[1, :, :] = True  # 16 voxels missed on slice 1
    assert float(dice(pred, gt, 3, both_empty=1.0)) == pytest.approx(2 * 4 / (4 + 20))
    assert dice(pred, gt, 2, both_empty=1.0).tolist() == [1.0, 0.0]


def test_class_masks_are_the_foreground_classes() -> None:
    labels = np.array([[0, 1, 2], [2, 2, 0]])
    assert class_masks(labels, 3).tolist() == [
        [[False, True, False], [False, False, False]],
        [[False, False, True], [True, True, False]],
    ]


@pytest.mark.parametrize(
    ("pred", "image_ndim", "text"), [(np.zeros((2, 3)), 2, "differs"), (np.zeros((2, 4)), 3, "image_ndim")]
)
def test_bad_input_is_one_line(pred: np.ndarray, image_ndim: int, text: str) -> None:
    with pytest.raises(KnowsamError, match=text):
        dice(pred, np.zeros((2, 4)), image_ndim, both_empty=1.0)

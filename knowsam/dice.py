"""Dice overlap of masks: the one computation behind every Dice the harness reports.

The test metrics (``knowsam.metrics``), the validation Dice that picks the weights a run keeps
(``knowsam.train``) and the teacher check (``knowsam.teacher_check``) all call ``dice``. It sits
apart from the metric registry because it is training code: it decides which weights ``best.pt``
holds, so it belongs in a run's code fingerprint, where the registry's names and texts do not.
"""

from __future__ import annotations

import numpy as np

from knowsam.errors import KnowsamError


def class_masks(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K-1, *labels.shape) masks of the foreground classes 1..K-1 of a label map (class 0 is background)."""
    labels = np.asarray(labels)
    classes = np.arange(1, num_classes).reshape((-1,) + (1,) * labels.ndim)
    return labels[None] == classes


def dice(pred: np.ndarray, gt: np.ndarray, image_ndim: int, *, both_empty: float) -> np.ndarray:
    """2 |P ∩ G| / (|P| + |G|) over the last ``image_ndim`` axes: one value per index of the axes before them.

    ``pred`` and ``gt`` have one shape, non-zero is foreground: (K-1, N, H, W) masks with
    ``image_ndim`` 2 give Dice per class and image, the masks of one volume (D, H, W) with 3 its
    Dice. A pair whose two masks are both empty scores ``both_empty`` (the test metrics' empty-mask
    policy gives 1, the official KnowSAM validation 0); one empty mask against a non-empty one scores 0.
    """
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise KnowsamError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if not 1 <= image_ndim <= pred.ndim:
        raise KnowsamError(f"image_ndim {image_ndim} must be between 1 and the masks' {pred.ndim} axes")
    axes = tuple(range(pred.ndim - image_ndim, pred.ndim))
    inter = np.count_nonzero(pred & gt, axis=axes)
    total = np.count_nonzero(pred, axis=axes) + np.count_nonzero(gt, axis=axes)
    return dice_of_counts(inter, total, both_empty=both_empty)


def dice_of_counts(inter, total, *, both_empty: float) -> np.ndarray:
    """The formula itself, from |P ∩ G| and |P| + |G|: for callers that have counted them already."""
    return np.where(total > 0, 2.0 * np.asarray(inter) / np.maximum(total, 1), float(both_empty))

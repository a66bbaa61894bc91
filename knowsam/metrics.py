"""Per-case segmentation metrics with one explicit empty-mask policy.

Definitions follow ``medpy.metric.binary`` (what most semi-supervised medical
segmentation code reports), computed faster and made total:

* surfaces are the foreground voxels with a face-neighbour (connectivity 1) in
  the background, voxels outside the array counting as background, exactly
  ``mask ^ binary_erosion(mask)`` as medpy does;
* ``hd95`` is the 95th percentile (numpy's linear interpolation) of BOTH
  directed surface-distance sets pooled, not the larger of two percentiles;
* ``asd`` is medpy's ``asd``: the mean distance from the predicted surface to
  the ground-truth surface (directed, so it does not see missed parts of the
  ground truth); ``assd`` is the symmetric mean over both sets pooled;
* ``hd`` is the symmetric Hausdorff distance of the surfaces and
  ``hd_x095_paper`` is ``0.95 * hd`` (empty masks included): the formula the
  official KnowSAM code labels "HD95", applied to true surface distances (that
  code measures between image rows instead, so its values are not reproduced
  bit for bit). It is offered only to compare with the paper's tables.

medpy returns 0 Dice for two empty masks and raises for distances on an empty
mask; callers then drop or patch those cases. Here every case gets a finite
value under ``EMPTY_MASK_POLICY``.

``METRICS`` is the one registry of metrics: each one's per-case key, summary name, label,
definition, unit, direction, the tables that show it and its values on empty masks. Evaluation,
the leaderboard, ``compare``, ``score`` and ``publish`` read them from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from knowsam.dice import dice_of_counts
from knowsam.errors import ConfigError, KnowsamError

EMPTY_MASK_POLICY = (
    "Empty masks: when prediction and ground truth are both empty, Dice = IoU = precision = recall = 1 "
    "and all distances are 0; when exactly one is empty (a miss or a false alarm), Dice = IoU = "
    "precision = recall = 0 and every distance equals the image diagonal (shape x spacing), "
    "so such cases are penalised, never dropped."
)

PERCENT, DISTANCE = "percent", "distance"  # table units: fractions x 100; pixels, or a volume's spacing units
# The tables a metric can be shown in.
LEADERBOARD_2D = "leaderboard-2d"  # the leaderboard of a 2D (polyp) dataset, headed by summary names
LEADERBOARD_VOLUME = "leaderboard-volume"  # the leaderboards of a volume dataset, headed by labels
DVC_METRICS = "dvc-metrics"  # reports/metrics (``evaluate.headline_metrics``), what ``dvc metrics`` shows
SCORE = "score"  # ``knowsam-bench score``: its per-image CSV, its table and (except paper-only) its --format json


@dataclass(frozen=True)
class Metric:
    """One per-case metric: everything the harness says about it (``METRICS`` holds them all)."""

    key: str  # its per-case column (``binary_metrics``, per_case.csv, score's per-image CSV)
    name: str  # its summary key (``summarize``, summary.json, reports/metrics, leaderboard rows, compare --metric)
    label: str  # the per-image quantity, as volume leaderboards head their columns
    detail: str  # what the label leaves unsaid ("" when it says all)
    unit: str  # PERCENT or DISTANCE, the unit tables show it in
    higher_is_better: bool
    tables: tuple[str, ...]  # the tables that show it
    both_empty: float  # its value when prediction and ground truth are both empty
    one_empty: float  # when exactly one is empty; a distance's value is this many image diagonals
    paper_only: bool = False  # only to compare with the paper's tables: listed last, never a headline

    def definition(self, per: str = "per-image") -> str:
        """What its summary value is: ``mean of per-image Dice``; ``per`` names the case."""
        return f"mean of {per} {self.label}" + (f" ({self.detail})" if self.detail else "")

    @property
    def scale(self) -> float:
        """Table units per per-case unit."""
        return 100.0 if self.unit == PERCENT else 1.0


_EVERY_TABLE = (LEADERBOARD_2D, LEADERBOARD_VOLUME, DVC_METRICS, SCORE)
_ALL_BUT_2D = (LEADERBOARD_VOLUME, DVC_METRICS, SCORE)
# How each kind of metric reads and scores empty masks (``EMPTY_MASK_POLICY``): an overlap is perfect on two
# empty masks and 0 on a miss or a false alarm; a surface distance 0, and the image diagonal.
_OVERLAP = {"unit": PERCENT, "higher_is_better": True, "both_empty": 1.0, "one_empty": 0.0}
_DISTANCE = {"unit": DISTANCE, "higher_is_better": False, "both_empty": 0.0, "one_empty": 1.0}

# The registry, in the order of per-case columns and summaries.
METRICS: tuple[Metric, ...] = (
    Metric("dice", "mDice", "Dice", "", tables=_EVERY_TABLE, **_OVERLAP),
    Metric("iou", "mIoU", "IoU", "", tables=_EVERY_TABLE, **_OVERLAP),
    Metric(
        "hd95",
        "HD95",
        "HD95",
        "95th percentile of both directed surface-distance sets pooled",
        tables=_ALL_BUT_2D,
        **_DISTANCE,
    ),
    Metric(
        "asd",
        "ASD",
        "ASD",
        "mean distance from the predicted to the ground-truth surface",
        tables=_ALL_BUT_2D,
        **_DISTANCE,
    ),
    Metric("assd", "assd", "ASSD", "mean of both directed surface-distance sets pooled", tables=(), **_DISTANCE),
    Metric("hd", "hd", "Hausdorff distance", "largest surface distance", tables=(), **_DISTANCE),
    Metric(
        "hd_x095_paper",
        "hd_x095_paper",
        "0.95 x Hausdorff distance",
        "what the KnowSAM code calls HD95",
        tables=(SCORE,),
        paper_only=True,
        **(_DISTANCE | {"one_empty": 0.95}),
    ),
    Metric("precision", "precision", "precision", "", tables=(SCORE,), **_OVERLAP),
    Metric("recall", "recall", "recall", "", tables=(SCORE,), **_OVERLAP),
)
# Keys of ``binary_metrics``, in order; ``case_metrics`` adds ``<key>_c<class>`` per class.
BINARY_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS)
_BY_KEY = {m.key: m for m in METRICS}


def metric(name: str) -> Metric:
    """The registry's metric with summary name ``name``; a usage error naming the choices for any other."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KnowsamError(f"unknown metric {name!r}; choose one of {', '.join(m.name for m in METRICS)}", 2)


def shown_in(*tables: str) -> tuple[Metric, ...]:
    """The metrics any of ``tables`` shows, in registry order."""
    return tuple(m for m in METRICS if set(tables) & set(m.tables))


SpacingLike = float | Sequence[float] | np.ndarray | None


def _spacing(spacing: SpacingLike, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.full(ndim, values.item())
    if values.shape != (ndim,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise KnowsamError(f"voxel spacing {spacing!r} must be one or {ndim} positive finite numbers")
    return values


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding every foreground voxel of either mask (both non-empty).

    Narrowed one axis at a time, so only the first axis scans the whole array.
    """
    union = pred | gt
    box = [slice(None)] * union.ndim
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union[tuple(box)].any(axis=others))
        box[axis] = slice(int(hits[0]), int(hits[-1]) + 1)
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face-neighbour in the background.

    Padding with zeros makes voxels outside the array background, as
    ``scipy.ndimage.binary_erosion``'s default ``border_value=0`` does in medpy.
    """
    padded = np.pad(mask, 1)
    interior = mask.copy()
    centre = [slice(1, -1)] * mask.ndim
    for axis in range(mask.ndim):
        for shifted in (slice(0, -2), slice(2, None)):
            index = list(centre)
            index[axis] = shifted
            interior &= padded[tuple(index)]
    return mask & ~interior


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances pred-surface -> gt-surface and gt-surface -> pred-surface.

    ``pred`` and ``gt`` arrive cropped to the bounding box B of the union of both
    masks (``_union_box``). The crop is exact, with no margin needed:
    * Surfaces: a voxel's surface status depends on itself and its face-neighbours.
      For a voxel in B, a neighbour is either in B (same value in the crop) or
      outside B. Outside B the full mask is 0 (B holds all foreground) or the
      neighbour is outside the array (background by the erosion's border rule);
      the crop's zero padding gives 0 in both cases. Every surface voxel is a
      foreground voxel, hence in B, so the crop has exactly the full surfaces.
    * Distances: each is from a surface voxel to the NEAREST surface voxel of the
      other mask, an exact Euclidean nearest-neighbour query over point sets that
      lie wholly in B; shifting both sets by B's corner changes no distance.
    A k-d tree over surface points (scaled by spacing) replaces medpy's
    distance transform of the whole image, so the cost follows the surface size.
    """
    pred_points = np.argwhere(_surface(pred)) * spacing
    gt_points = np.argwhere(_surface(gt)) * spacing
    to_gt, _ = cKDTree(gt_points, balanced_tree=False, compact_nodes=False).query(pred_points)
    to_pred, _ = cKDTree(pred_points, balanced_tree=False, compact_nodes=False).query(gt_points)
    return to_gt, to_pred


def _as_mask(array: np.ndarray | Sequence) -> np.ndarray:
    return np.atleast_1d(np.asarray(array)).astype(bool, copy=False)


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike = None) -> dict[str, float]:
    """All ``BINARY_METRICS`` for one case; non-zero voxels are foreground.

    ``pred`` and ``gt`` are arrays of the same shape (2D image or 3D volume);
    ``spacing`` is the voxel size per axis (a scalar applies to all axes), so
    distances are in physical units; without it, in voxels. Every value is
    finite; empty masks follow ``EMPTY_MASK_POLICY``.
    """
    pred, gt = _as_mask(pred), _as_mask(gt)
    if pred.shape != gt.shape:
        raise KnowsamError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    sizes = _spacing(spacing, pred.ndim)
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 or n_gt == 0:
        diagonal = float(np.linalg.norm(np.multiply(pred.shape, sizes)))
        return {
            m.key: (m.both_empty if n_pred == n_gt else m.one_empty) * (diagonal if m.unit == DISTANCE else 1.0)
            for m in METRICS
        }
    box = _union_box(pred, gt)
    pred, gt = pred[box], gt[box]
    tp = int(np.count_nonzero(pred & gt))
    to_gt, to_pred = _surface_distances(pred, gt, sizes)
    pooled = np.concatenate([to_gt, to_pred])
    hd = float(max(to_gt.max(), to_pred.max()))
    return _ordered(
        {
            "dice": float(dice_of_counts(tp, n_pred + n_gt, both_empty=_BY_KEY["dice"].both_empty)),
            "iou": tp / float(n_pred + n_gt - tp),
            "hd95": float(np.percentile(pooled, 95)),
            "asd": float(to_gt.mean()),
            "assd": float(pooled.mean()),
            "hd": hd,
            "hd_x095_paper": 0.95 * hd,
            "precision": tp / float(n_pred),
            "recall": tp / float(n_gt),
        }
    )


def _ordered(values: dict[str, float]) -> dict[str, float]:
    return {key: float(values[key]) for key in BINARY_METRICS}


def case_metrics(
    pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int, spacing: SpacingLike = None
) -> dict[str, float]:
    """Per-class metrics (``dice_c1`` ... for classes 1..K-1) and their foreground mean (``dice`` ...).

    Class 0 is background and is not scored. A class absent from both maps
    scores as "both empty" under ``EMPTY_MASK_POLICY`` and enters the mean.
    With ``num_classes == 2`` the mean keys equal ``binary_metrics``.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    for role, labels in (("prediction", pred_labels), ("ground truth", gt_labels)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise KnowsamError(f"{role} labels must be integer class indices, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise KnowsamError(
                f"{role} labels span {labels.min()}..{labels.max()}, "
                f"outside 0..{num_classes - 1} (num_classes={num_classes})"
            )
    per_class = [binary_metrics(pred_labels == c, gt_labels == c, spacing) for c in range(1, num_classes)]
    result = {key: float(np.mean([m[key] for m in per_class])) for key in BINARY_METRICS}
    for c, values in enumerate(per_class, start=1):
        result.update({f"{key}_c{c}": value for key, value in values.items()})
    return result


def _is_metric_column(column: object) -> bool:
    """A ``BINARY_METRICS`` key or its per-class form ``<key>_c<k>``; ids such as an integer case column are not."""
    name = str(column)
    base, _, suffix = name.rpartition("_c")
    return name in BINARY_METRICS or (base in BINARY_METRICS and suffix.isdigit())


def summarize(per_case: pd.DataFrame) -> dict[str, float | int | None]:
    """Mean and sample standard deviation over cases of every metric column, plus ``n``.

    Means are of per-case values (mDice = mean of per-image Dice, the polyp
    convention, not a dataset-global Dice). A metric's column takes its summary
    name (``dice`` -> ``mDice`` ...), per-class columns keep theirs; each std is
    ``<name>_std`` (ddof=1, None for a single case). Other columns (names, ids)
    are ignored. A NaN is an error, never skipped, so a missing case cannot
    silently improve a mean.
    """
    columns = [column for column in per_case.columns if _is_metric_column(column)]
    if len(per_case) == 0 or not columns:
        raise KnowsamError("no per-case metrics to summarise (empty table or no metric columns)")
    summary: dict[str, float | int | None] = {"n": int(len(per_case))}
    for column in columns:
        values = pd.to_numeric(per_case[column], errors="coerce").to_numpy(dtype=float)
        if not np.all(np.isfinite(values)):
            raise KnowsamError(f"per-case column {column!r} holds NaN, infinite or non-numeric values; not summarised")
        name = _BY_KEY[column].name if column in _BY_KEY else column
        summary[name] = float(values.mean())
        summary[f"{name}_std"] = float(values.std(ddof=1)) if values.size > 1 else None
    return summary

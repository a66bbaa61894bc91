"""Leaderboard figures: an mDice bar chart, training curves and a grid of qualitative overlays (PNG).

Drawn on matplotlib's Agg canvas without pyplot, so no display or global backend state is
involved; the PNG carries no software/date metadata, so unchanged results give
byte-identical files and DVC sees no spurious change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from skimage.segmentation import find_boundaries

from knowsam import fileio
from knowsam.config import Params
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.report.results import STALE_MARK, VARIANT_LABELS, is_upper_bound, ratio_label, row_label, test_set_order
from knowsam.runs import RunId

PNG_METADATA = {"Software": None}
DPI = 100
# Class colours for label overlays (class 0, background, is left transparent).
OUTLINE_COLOUR = "#ffffff"  # the ground truth's outline over each prediction
CLASS_COLOURS = ("#000000", "#ffd400", "#00c853", "#ff3d00", "#2979ff", "#d500f9")


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)
    return path


def bar_chart(agg: pd.DataFrame, path: str | Path) -> Path:
    """mDice per test set (x) and table row (bars), one panel per dataset x ratio; error bars = std over seeds."""
    dice = agg[agg.metric == "mDice"]
    panels = list(dict.fromkeys(zip(dice.dataset, dice.ratio)))
    fig = Figure(figsize=(9.0, 3.2 * len(panels)), layout="constrained")
    for ax, (dataset, ratio) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        part = dice[(dice.dataset == dataset) & (dice.ratio == ratio)]
        test_sets = test_set_order(dataset, part.test_set)
        labels = list(dict.fromkeys(part.label))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            rows = part[part.label == label].set_index("test_set").reindex(test_sets)
            x = np.arange(len(test_sets)) + (i - (len(labels) - 1) / 2) * width
            stale = " " + STALE_MARK if rows["stale"].fillna(False).astype(bool).any() else ""
            ax.bar(
                x,
                rows["mean"].to_numpy(float),
                width,
                yerr=rows["std"].fillna(0.0).to_numpy(float),
                capsize=2,
                label=label + stale,
            )
        ax.set_xticks(np.arange(len(test_sets)), test_sets, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("mDice (%)")
        ax.set_title(f"{dataset}, {ratio_label(ratio)} labeled (error bars: std over seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, Path(path))


def overlay_cases(data: PreparedDataset, count: int) -> list[tuple[str, str]]:
    """(test set, case) rows: the first ``count`` cases taken round-robin over the test sets, in index order.

    Test sets go in table order; round-robin shows every test set once before any shows
    twice, and the choice never depends on results, so the same images appear in every report.
    """
    parts = test_set_order(data.meta.get("dataset", ""), data.eval_parts)
    per_part = {p: list(dict.fromkeys(data.index(p).case))[:count] for p in parts}
    picks = [(p, cases[i]) for i in range(count) for p, cases in per_part.items() if i < len(cases)]
    return picks[:count]


def _case_view(data: PreparedDataset, part: str, case: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Network-input image, original-size ground truth and slice index; a volume's middle slice."""
    index = data.index(part)
    rows = index[index.case == case].sort_values("slice")
    middle = len(rows) // 2
    image = to_float(np.asarray(data.images(part)[rows.index[middle]]))
    image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    with data.ground_truth(part) as gt_all:
        gt = gt_all[case]
    return image, (gt[middle] if gt.ndim == 3 else gt), middle


def _predictions(path: Path, keys: list[str]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return {key: saved[key] for key in keys if key in saved.files}


def overlay_grid(
    params: Params, dataset: str, path: str | Path, eval_root: str | Path, shown: dict[RunId, bool]
) -> Path | None:
    """Rows = ``eval.overlay_images`` fixed test cases; columns = image, ground truth, each method's prediction
    with the ground truth's outline over it (misses and false alarms show against it).

    Predictions come from the first ratio and seed of the params, of the runs the leaderboard
    ``shown`` (True: stale, marked); the others are drawn as missing. Everything is drawn over
    the original image extent (the network-size image is stretched to it). Returns None when
    the prepared dataset is absent.
    """
    data = PreparedDataset(Path(params.data.prepared_root) / dataset)
    if not (data.root / "meta.json").is_file():
        return None
    picks = overlay_cases(data, params.eval.overlay_images)
    keys = [f"{part}/{case}" for part, case in picks]
    ratio, seed = params.ratios[0], params.seeds[0]
    runs = {m: RunId(m, dataset, ratio, seed) for m in params.methods}
    predictions = {
        m: _predictions(run.eval_dir(eval_root) / "predictions.npz", keys) if run in shown else None
        for m, run in runs.items()
    }
    colours = ListedColormap(CLASS_COLOURS[: data.num_classes])
    titles = {m: m + (f" {STALE_MARK}" if shown.get(run) else "") for m, run in runs.items()}
    columns = ["image", "ground truth", *params.methods]
    fig = Figure(figsize=(1.9 * len(columns), 1.9 * max(len(picks), 1) + 0.4), layout="constrained")
    fig.suptitle(f"{dataset}: predictions at {ratio_label(ratio)} labeled, seed {seed}", fontsize=9)
    axes = fig.subplots(max(len(picks), 1), len(columns), squeeze=False)
    for row, (part, case) in enumerate(picks):
        image, gt, middle = _case_view(data, part, case)
        outline = truth_outline(gt)
        extent = (0, gt.shape[1], gt.shape[0], 0)
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles.get(name, name), fontsize=8)
            ax.imshow(image, cmap="gray", extent=extent, interpolation="nearest")
            if col == 0:
                ax.set_ylabel(f"{part}\n{case}", fontsize=6)
                continue
            labels = gt if col == 1 else (predictions[name] or {}).get(f"{part}/{case}")
            if labels is None:
                ax.text(0.5, 0.5, "missing", transform=ax.transAxes, ha="center", va="center", color="red")
                continue
            labels = labels[middle] if labels.ndim == 3 else labels
            ax.imshow(
                np.ma.masked_equal(labels, 0),
                cmap=colours,
                vmin=0,
                vmax=data.num_classes - 1,
                alpha=0.5,
                extent=extent,
                interpolation="nearest",
            )
            if col > 1:
                ax.imshow(
                    np.ma.masked_where(~outline, outline),
                    cmap=ListedColormap([OUTLINE_COLOUR]),
                    extent=extent,
                    interpolation="nearest",
                )
    return _save(fig, Path(path))


def truth_outline(labels: np.ndarray) -> np.ndarray:
    """The pixels of each labelled region that touch another label (4-neighbours), as a boolean map."""
    return find_boundaries(labels, connectivity=1, mode="inner", background=0)


def mean_curve(curves: list[pd.DataFrame], column: str, window: int = 1) -> pd.Series:
    """``column`` against step, averaged over seeds at the steps they share; a trailing mean over
    ``window`` iterations first (per-iteration losses are too noisy to read)."""
    series = [
        c.set_index("step")[column].dropna().rolling(window, min_periods=1).mean()
        for c in curves
        if column in c.columns
    ]
    return pd.concat(series, axis=1, join="inner").mean(axis=1) if series else pd.Series(dtype=float)


def training_curves(
    params: Params, dataset: str, path: str | Path, eval_root: str | Path, shown: dict[RunId, bool]
) -> Path | None:
    """Validation Dice (top) and training loss (bottom) against iteration, one line per method (mean
    over its seeds), one column per labeled ratio; references dashed, a method's teacher (its
    ``val_dice_<variant>`` curve) dotted in the method's colour. Only runs the leaderboard ``shown``
    are drawn (True: stale, marked in the legend). None when no such run has curves."""
    runs = {
        (m, r): [RunId(m, dataset, r, s) for s in params.seeds if RunId(m, dataset, r, s) in shown]
        for r in params.ratios
        for m in params.methods
    }
    curves = {
        key: [pd.read_csv(run.curves_file(eval_root)) for run in found if run.curves_file(eval_root).is_file()]
        for key, found in runs.items()
    }
    if not any(curves.values()):
        return None
    window = max(1, params.train.iterations // 25)
    fig = Figure(figsize=(4.6 * len(params.ratios) + 1.8, 6.0), layout="constrained")
    axes = fig.subplots(2, len(params.ratios), squeeze=False, sharex=True)
    for col, ratio in enumerate(params.ratios):
        dice_ax, loss_ax = axes[0, col], axes[1, col]
        for method in params.methods:
            found = curves[(method, ratio)]
            if not found:
                continue
            style = {"linestyle": "--", "color": "black"} if is_upper_bound(method) else {}
            stale = f" {STALE_MARK}" if any(shown[run] for run in runs[(method, ratio)]) else ""
            label = f"{method} (n={len(found)}){stale}"
            dice = mean_curve(found, "val_dice")
            (line,) = dice_ax.plot(dice.index, dice.to_numpy() * 100.0, marker=".", label=label, **style)
            for column in sorted({c for f in found for c in f.columns if c.startswith("val_dice_")}):
                # Another output of the same runs, in the method's colour: its teacher dotted, a single
                # student (KnowSAM's U-Net and V-Net) dash-dotted.
                variant = column.removeprefix("val_dice_")
                extra = mean_curve(found, column)
                dice_ax.plot(
                    extra.index,
                    extra.to_numpy() * 100.0,
                    linestyle=":" if variant in VARIANT_LABELS else "-.",
                    color=line.get_color(),
                    label=row_label(method, variant),
                )
            loss = mean_curve(found, "loss", window)
            loss_ax.plot(loss.index, loss.to_numpy(), label=label, **style)
        dice_ax.set_title(f"{dataset}, {ratio_label(ratio)} labeled", fontsize=9)
        dice_ax.set_ylim(0, 100)
        dice_ax.set_ylabel("validation Dice (%)")
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels crowd the axis
        loss_ax.set_ylabel("training loss" + (f" (trailing mean, {window} its)" if window > 1 else ""))
        loss_ax.set_xlabel("iteration")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Training curves, mean over n seeds. Loss: each method's own total, so scales differ.", fontsize=9)
    return _save(fig, Path(path))

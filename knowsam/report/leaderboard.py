"""Markdown/CSV leaderboards laid out like the paper's tables, plus their figures.

* 2D (polyp) datasets: rows = method x labeled ratio, columns = test sets x (mDice, mIoU);
* volume datasets (PROMISE12, ACDC): one table per test set, rows = methods, column
  groups = labeled ratios x (Dice, IoU, HD95, ASD).

Cells are mean ± std over seeds with n. The best contender per column is bold; the
upper bound, variant rows and the paper's numbers never compete. The paper's reported
KnowSAM numbers sit in a separate small table per dataset with our difference to them,
so the main table keeps exactly one plain row per method (and ratio).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from knowsam import fileio
from knowsam.config import Params
from knowsam.data.sources import DATASETS
from knowsam.errors import KnowsamError
from knowsam.metrics import (
    DISTANCE,
    EMPTY_MASK_POLICY,
    LEADERBOARD_2D,
    LEADERBOARD_VOLUME,
    PERCENT,
    Metric,
    metric,
    shown_in,
)
from knowsam.report import figures, reference
from knowsam.report.results import (
    STALE_MARK,
    STALE_NOTE,
    Results,
    is_upper_bound,
    load_summaries,
    matrix,
    ratio_label,
    repro_hint,
    row_label,
    test_set_order,
)
from knowsam.runs import code_fingerprint

_KEY = ["dataset", "method", "variant", "ratio", "test_set", "metric"]
WRITER = "knowsam-bench leaderboard"

FAIRNESS_NOTE = (
    "Fairness: every method here uses the same U-Net backbone, input size, iteration budget and batch "
    "composition (labeled and unlabeled images per batch). UCMT's paper used a DeepLabv3+ backbone, so its "
    "published numbers are not comparable with its row here."
)
RESOLUTION_TEXT = {
    "original": "each image's original resolution (probabilities resized back before the argmax; the polyp convention)",
    "training": "training size (masks resized to the network input; the official KnowSAM code's convention)",
}


def is_volume(dataset: str) -> bool:
    return DATASETS[dataset].kind == "3d"


def table_metrics(dataset: str) -> tuple[Metric, ...]:
    return shown_in(LEADERBOARD_VOLUME if is_volume(dataset) else LEADERBOARD_2D)


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, variant, ratio, test set, metric) over seeds, in table units.

    Dice/IoU become percentages, distances stay in the evaluation's units. Adds the row
    label, ``stale`` (a run of the cell is of other params or code), ``best`` and, for plain rows
    with a published value, ``paper`` and ``diff_vs_paper``.
    """
    book = reference.load()
    rows = []
    for (dataset, method, variant, ratio, test_set), group in long.groupby(_KEY[:-1], sort=False):
        for shown in table_metrics(dataset):
            values = group[shown.name].astype(float) * shown.scale
            paper = None if variant else book.lookup(dataset, test_set, method, ratio, shown.name)
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "variant": variant,
                    "label": row_label(method, variant),
                    "ratio": ratio,
                    "test_set": test_set,
                    "metric": shown.name,
                    "unit": "%" if shown.unit == PERCENT else shown.unit,
                    "mean": values.mean(),
                    "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                    "n": len(values),
                    "stale": bool(group["stale"].any()),
                    "paper": paper,
                    "diff_vs_paper": values.mean() - paper if paper is not None else float("nan"),
                }
            )
    agg = pd.DataFrame(rows)
    agg["best"] = _best_flags(agg)
    return agg


def _best_flags(agg: pd.DataFrame) -> pd.Series:
    """Best mean per (dataset, ratio, test set, metric) among at least two contenders; ties at 2 decimals all win.

    A stale cell never competes: it does not stand for the current params."""
    best = pd.Series(False, index=agg.index)
    contenders = agg[(agg.variant == "") & ~agg.method.map(is_upper_bound) & ~agg.stale]
    for (_, _, _, name), group in contenders.groupby(["dataset", "ratio", "test_set", "metric"]):
        if len(group) < 2:
            continue
        shown = group["mean"].round(2)
        target = shown.max() if metric(name).higher_is_better else shown.min()
        best[group.index[shown == target]] = True
    return best


def format_cell(mean: float, std: float, n: int, bold: bool = False, stale: bool = False) -> str:
    """``84.10 ± 0.50 (n=3)``; one seed has no std; bold covers mean and std; ``†`` marks a stale cell."""
    text = f"{mean:.2f}" if n < 2 else f"{mean:.2f} ± {std:.2f}"
    return f"{f'**{text}**' if bold else text} (n={n})" + (f" {STALE_MARK}" if stale else "")


def _md(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_md(cells), "|" + "---|" * len(cells)]


def _rows(part: pd.DataFrame, methods: list[str]) -> list[tuple[str, str]]:
    """(method, variant) in params order, each method's variant rows right under it."""
    rows = []
    for method in methods:
        rows.append((method, ""))
        rows += [(method, v) for v in sorted(set(part.variant[part.method == method]) - {""})]
    return rows


def _cells(part: pd.DataFrame) -> dict[tuple, str]:
    return {
        tuple(r[k] for k in _KEY): format_cell(r["mean"], r["std"], r["n"], r["best"], r["stale"])
        for r in part.to_dict("records")
    }


def polyp_table(part: pd.DataFrame, methods: list[str], ratios: list[float]) -> list[str]:
    dataset = part.dataset.iloc[0]
    test_sets = test_set_order(dataset, part.test_set)
    names = [m.name for m in table_metrics(dataset)]
    lines = _header(["Method", "Labeled", *(f"{t} {m}" for t in test_sets for m in names)])
    cells = _cells(part)
    for ratio in ratios:
        for method, variant in _rows(part, methods):
            labeled = "100%" if is_upper_bound(method) else ratio_label(ratio)
            values = [cells.get((dataset, method, variant, ratio, t, m), "-") for t in test_sets for m in names]
            lines.append(_md([row_label(method, variant), labeled, *values]))
    return lines


def volume_table(part: pd.DataFrame, test_set: str, methods: list[str], ratios: list[float]) -> list[str]:
    dataset = part.dataset.iloc[0]
    shown = table_metrics(dataset)
    lines = _header(["Method", *(f"{ratio_label(r)} {m.label}" for r in ratios for m in shown)])
    cells = _cells(part)
    for method, variant in _rows(part, methods):
        values = [cells.get((dataset, method, variant, r, test_set, m.name), "-") for r in ratios for m in shown]
        lines.append(_md([row_label(method, variant), *values]))
    return lines


def reference_table(part: pd.DataFrame, refs: list[reference.Reference]) -> list[str]:
    """The paper's numbers beside ours (plain rows, same ratio); ``test_set: null`` matches a sole test set."""
    lines = _header(["Method", "Labeled", "Test set", "Metric", "Paper", "Ours", "Ours − paper"])
    for ref in refs:
        ours = part[
            (part.method == ref.method)
            & (part.variant == "")
            & (part.metric == ref.metric)
            & ((part.ratio - ref.ratio).abs() < 1e-9)
        ]
        if ref.test_set is not None:
            ours = ours[ours.test_set == ref.test_set]
        test_set = ref.test_set or "(sole test set)"
        cell, diff = "-", "-"
        if len(ours) == 1:
            row = ours.iloc[0]
            test_set, diff = row.test_set, f"{row['mean'] - ref.value:+.2f}"
            cell = format_cell(row["mean"], row["std"], row["n"], stale=row["stale"])
        lines.append(
            _md(
                [
                    f"{ref.method} (paper)",
                    ratio_label(ref.ratio),
                    test_set,
                    f"{ref.metric} (listed as {ref.listed_as})",
                    f"{ref.value:.2f}",
                    cell,
                    diff,
                ]
            )
        )
    return lines


# How each teacher's image encoder trained (provenance ``sam_encoder``), as the note words it.
ENCODER_NOTES = {"adapters": "encoder adapters trained", "cached": "frozen encoder, embeddings cached"}


def _sam_note(long: pd.DataFrame) -> str:
    """Which SAM teacher (arch, weights, how its encoder trained) each SAM-using method had."""
    plain = long[(long.variant == "") & (long.sam_weights != "")]
    if plain.empty:
        return "SAM teacher: no evaluated run uses one."
    encoder = plain.sam_encoder if "sam_encoder" in plain else pd.Series("", index=plain.index)
    options = plain.sam_options if "sam_options" in plain else pd.Series("", index=plain.index)
    teachers = {}
    for method, arch, weights, mode, option in zip(plain.method, plain.sam_arch, plain.sam_weights, encoder, options):
        how = ", ".join(note for note in (ENCODER_NOTES.get(mode, ""), option) if note)
        teachers.setdefault(f"`{arch}` {weights}" + (f", {how}" if how else ""), set()).add(method)
    random_init = sorted(set(plain.method[plain.sam_weights == "random-init"]))
    lines = []
    if random_init:
        lines.append(
            "**SAM teacher: random initialisation, no pretrained SAM weights** in runs of "
            f"{', '.join(random_init)}; these numbers do not show what a pretrained SAM brings."
        )
    pretrained = {k: v for k, v in teachers.items() if "random-init" not in k}
    if pretrained:
        lines.append(
            "SAM teacher weights: "
            + "; ".join(f"{k} ({', '.join(sorted(v))})" for k, v in sorted(pretrained.items()))
            + "."
        )
    return " ".join(lines)


def _metric_notes() -> list[str]:
    """The tables' metrics: units, definitions and which way is better, as the registry declares them."""
    shown = shown_in(LEADERBOARD_2D, LEADERBOARD_VOLUME)

    def labels(keep) -> str:
        return "/".join(m.label for m in shown if keep(m))

    dice, iou, hd95, asd = (metric(name) for name in ("mDice", "mIoU", "HD95", "ASD"))
    return [
        "Cells: mean ± std over seeds (sample std; none for one seed) with n = seeds evaluated. "
        f"{labels(lambda m: m.unit == PERCENT)} in %; {labels(lambda m: m.unit == DISTANCE)} in pixels for 2D "
        "images, in the volume's voxel-spacing units for volumes.",
        f"{dice.name} = {dice.definition()} (per-volume for volume datasets), not a dataset-global {dice.label}; "
        f"{iou.name} likewise.",
        f'{hd95.name} = {hd95.detail}; the paper\'s "HD95" (0.95 x Hausdorff) is a different quantity and is not '
        f"shown. {asd.name} = {asd.detail}.",
        "Bold: best per column among methods at the same labeled ratio (higher is better for "
        f"{labels(lambda m: m.higher_is_better)}, lower for {labels(lambda m: not m.higher_is_better)}), shown "
        "when at least two compete; ties at two decimals are all bold. Excluded from "
        '"best": fully-supervised (the upper bound, trained on every label), variant rows and the paper\'s numbers.',
    ]


def footnotes(params: Params, long: pd.DataFrame, with_paper: bool, code: str | None = None) -> list[str]:
    resolutions = sorted(set(long.resolution))
    notes = [
        f"Profile `{params.profile}`: images resized to {params.data.image_size}x{params.data.image_size} px for the "
        f"networks, {params.train.iterations} training iterations, seeds {', '.join(map(str, params.seeds))}.",
        "Identity: every run shown was trained and scored under these params and training code "
        f"`{code or code_fingerprint()}` (`runs.code_fingerprint`), except cells marked {STALE_MARK}.",
        *_metric_notes(),
        "Variant rows (`method [... output]`) score another output of the same trained runs, e.g. KnowSAM's "
        "SAM teacher; the plain row is the method's reported prediction.",
        _sam_note(long),
        "Evaluation resolution: "
        + "; ".join(RESOLUTION_TEXT.get(r, r) for r in resolutions)
        + (" (runs differ: not comparable)." if len(resolutions) > 1 else "."),
        EMPTY_MASK_POLICY,
        FAIRNESS_NOTE,
    ]
    if with_paper:
        notes.append(f"Paper rows: {reference.load().source}")
    return [f"- {n}" for n in notes]


def render(
    params: Params,
    results: Results,
    agg: pd.DataFrame,
    total: int,
    figure_lines: list[str],
    produce: str | None = None,
    code: str | None = None,
) -> str:
    book = reference.load()
    lines = [f"# Leaderboard (profile `{params.profile}`)", ""]
    with_paper = False
    for dataset in params.datasets:
        part = agg[agg.dataset == dataset]
        if part.empty:
            continue
        lines += [f"## {dataset}", ""]
        if is_volume(dataset):
            for test_set in test_set_order(dataset, part.test_set):
                lines += [f"### {test_set}", "", *volume_table(part, test_set, params.methods, params.ratios), ""]
        else:
            lines += [*polyp_table(part, params.methods, params.ratios), ""]
        refs = book.for_dataset(dataset)
        if refs:
            with_paper = True
            lines += [
                f"Reported by the paper ({dataset}): {book.protocols.get(dataset, '')}".rstrip(),
                "",
                *reference_table(part, refs),
                "",
            ]
    lines += ["## Notes", "", *footnotes(params, results.table, with_paper, code), "", "## Runs left out", ""]
    if results.left_out:
        lines.append(
            f"{len(results.left_out)} of {total} runs have no current metrics and are not shown: "
            f"{repro_hint(results.left_out, produce)}."
        )
    elif not results.stale:
        lines.append(f"None: all {total} runs of the params matrix are evaluated under the current params and code.")
    if results.stale:
        lines += [
            *([""] if results.left_out else []),
            f"{STALE_MARK} Shown with --allow-stale: {len(results.stale)} "
            f"of {total} runs {STALE_NOTE}: {', '.join(map(str, results.stale))}.",
        ]
    lines += ["", "## Figures", "", *figure_lines]
    return "\n".join(lines) + "\n"


def write_leaderboard(
    params: Params,
    out_dir: str | Path = "reports",
    eval_root: str | Path = "data/eval",
    *,
    overlays: bool = True,
    allow_stale: bool = False,
    runs_root: str | Path | None = "data/runs",
    produce: str | None = None,
    code: str | None = None,
) -> tuple[Path, Results]:
    """Write ``leaderboard.md``/``.csv`` and ``figures/`` (bar chart, training curves and overlays per
    dataset); returns the .md path and what was shown and left out (``results.load_summaries``).

    Figures sit in one folder so the pipeline can declare them as a single output whatever
    the dataset list. ``overlays=False`` leaves out the overlays, which show dataset images.
    Runs of other params or code are left out (named under "Runs left out", with ``produce``, the command
    that makes them: by default their ``dvc repro`` stages); ``allow_stale`` shows them, marked.
    ``runs_root`` None: results alone (``results.load_summaries``); ``code``: the training code the runs
    must have been trained with (default this checkout's; a publication's pin). An existing file of these names is
    replaced only if the leaderboard wrote it there and it is unchanged since (``out_dir``'s record,
    ``fileio.claim_files``); anything else is refused first.
    """
    out_dir = Path(out_dir)
    names = [
        "leaderboard.md",
        "leaderboard.csv",
        "figures/leaderboard.png",
        *(f"figures/curves_{dataset}.png" for dataset in params.datasets),
        *(f"figures/overlays_{dataset}.png" for dataset in params.datasets if overlays),
    ]
    inputs = [eval_root, params.data.prepared_root]
    fileio.check_folder(out_dir, WRITER, inputs)
    fileio.claim_files(out_dir, names, WRITER, inputs)
    runs = matrix(params)
    results = load_summaries(params, runs, eval_root, runs_root, allow_stale=allow_stale, code=code)
    if results.table.empty:
        left = f" ({repro_hint(results.left_out, produce)})" if results.left_out else ""
        raise KnowsamError(
            f"{eval_root}: no evaluated run of the params matrix under the current params and "
            f"code{left}; run `{produce or 'dvc repro'}` first"
        )
    shown = results.shown
    agg = aggregate(results.table)
    figures.bar_chart(agg, out_dir / "figures/leaderboard.png")
    figure_lines = ["![mDice per test set](figures/leaderboard.png)", ""]
    for dataset in params.datasets:
        name = f"figures/curves_{dataset}.png"
        if figures.training_curves(params, dataset, out_dir / name, eval_root, shown):
            figure_lines += [f"![{dataset} training curves]({name})", ""]
        else:
            figure_lines += [f"{name}: not drawn, no evaluated run of {dataset} has training curves.", ""]
    for dataset in params.datasets if overlays else []:
        name = f"figures/overlays_{dataset}.png"
        if figures.overlay_grid(params, dataset, out_dir / name, eval_root, shown):
            figure_lines += [f"![{dataset} predictions]({name})", ""]
        else:
            figure_lines += [f"{name}: not drawn, {Path(params.data.prepared_root) / dataset} is missing.", ""]
    path = out_dir / "leaderboard.md"
    fileio.write_text(path, render(params, results, agg, len(runs), figure_lines[:-1], produce, code))
    columns = [
        "dataset",
        "method",
        "variant",
        "label",
        "ratio",
        "test_set",
        "metric",
        "unit",
        "mean",
        "std",
        "n",
        "stale",
        "best",
        "paper",
        "diff_vs_paper",
    ]
    fileio.write_text(out_dir / "leaderboard.csv", agg[columns].to_csv(index=False, float_format="%.4f"))
    fileio.record_files(out_dir, [name for name in names if (out_dir / name).is_file()], WRITER)
    return path, results

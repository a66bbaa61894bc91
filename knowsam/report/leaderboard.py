"""Markdown/CSV leaderboards laid out like the paper's tables.

Polyp-style 2D benchmarks: rows = method x labeled ratio, columns = test sets (mDice, mIoU).
Values are mean +- std over seeds with n; mDice is the mean of per-image Dice.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from knowsam import io
from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.report.results import load_summaries, matrix


def _cell(values: pd.Series) -> str:
    values = values.dropna() * 100
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f} (n=1)"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={len(values)})"


def aggregate(long: pd.DataFrame, metrics: tuple[str, ...] = ("mDice", "mIoU")) -> pd.DataFrame:
    """Mean/std/n over seeds for each (dataset, method, ratio, test set, metric)."""
    out = []
    for (dataset, method, ratio, test_set), group in long.groupby(["dataset", "method", "ratio", "test_set"], sort=False):
        for metric in metrics:
            values = group[metric].dropna()
            out.append({"dataset": dataset, "method": method, "ratio": ratio, "test_set": test_set, "metric": metric,
                        "mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                        "n": len(values), "cell": _cell(group[metric])})
    return pd.DataFrame(out)


def polyp_table(agg: pd.DataFrame, dataset: str, methods: list[str], ratios: list[float]) -> str:
    part = agg[agg.dataset == dataset]
    test_sets = list(dict.fromkeys(part.test_set))
    header = ["Method", "Labeled"] + [f"{t} {m}" for t in test_sets for m in ("mDice", "mIoU")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        for ratio in ratios:
            cells = [method, f"{ratio:.0%}" if ratio * 100 == int(ratio * 100) else f"{ratio * 100:g}%"]
            for t in test_sets:
                for m in ("mDice", "mIoU"):
                    row = part[(part.method == method) & (part.ratio == ratio) & (part.test_set == t) & (part.metric == m)]
                    cells.append(row.cell.iloc[0] if len(row) else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_leaderboard(params: Params, out_dir: str | Path = "reports",
                      metrics_root: str | Path = "reports/metrics") -> Path:
    runs = matrix(params)
    long, missing = load_summaries(runs, metrics_root)
    if long.empty:
        raise KnowsamError(f"{metrics_root}: no evaluated runs of the params matrix; run `dvc repro` first")
    agg = aggregate(long)
    sections = [f"# Leaderboard (profile `{params.profile}`)", ""]
    for dataset in params.datasets:
        if dataset not in set(agg.dataset):
            continue
        sections += [f"## {dataset}", "", polyp_table(agg, dataset, params.methods, params.ratios), ""]
    sections += [
        f"Values in %: mean ± std over seeds (n = seeds). mDice / mIoU = mean over images of per-image Dice / IoU. "
        f"Image size {params.data.image_size}, {params.train.iterations} iterations, "
        f"evaluation at {params.eval.resolution} resolution.",
    ]
    if missing:
        sections += ["", f"Missing runs ({len(missing)}): " + ", ".join(r.stage_name for r in missing)]
    out_dir = Path(out_dir)
    path = out_dir / "leaderboard.md"
    io.write_text(path, "\n".join(sections) + "\n")
    io.write_text(out_dir / "leaderboard.csv", agg.drop(columns="cell").to_csv(index=False, float_format="%.6f"))
    return path

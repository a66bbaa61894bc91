"""Collecting evaluated runs: the one reader of ``reports/metrics`` and ``data/eval`` for reports."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import pandas as pd

from knowsam.config import Params
from knowsam.runs import RunId


def matrix(params: Params) -> list[RunId]:
    """Every run of the params matrix, in table order (dataset, method, ratio, seed)."""
    return [RunId(method=m, dataset=d, ratio=r, seed=s)
            for d, m, r, s in product(params.datasets, params.methods, params.ratios, params.seeds)]


def load_summaries(runs: list[RunId], metrics_root: str | Path = "reports/metrics") -> tuple[pd.DataFrame, list[RunId]]:
    """Long table (one row per run x test set) of summary metrics, and the runs with no metrics file."""
    rows, missing = [], []
    for run in runs:
        path = run.metrics_file(metrics_root)
        if not path.is_file():
            missing.append(run)
            continue
        summary = json.loads(path.read_text())
        provenance = summary.get("provenance", {})
        for test_set, metrics in summary["test_sets"].items():
            rows.append({"dataset": run.dataset, "method": run.method, "ratio": run.ratio, "seed": run.seed,
                         "test_set": test_set, "resolution": summary.get("evaluation_resolution"),
                         "sam_weights": provenance.get("sam_weights", ""), **metrics})
    return pd.DataFrame(rows), missing


def load_per_case(run: RunId, eval_root: str | Path = "data/eval") -> pd.DataFrame:
    return pd.read_csv(run.eval_dir(eval_root) / "per_case.csv", dtype={"case": str})

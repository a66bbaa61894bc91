"""Collecting evaluated runs: the one reader of ``data/eval`` for reports.

Leaderboard, figures and ``compare`` all go through here, so a run counts as present or
missing by one rule everywhere, and missing runs are named by the DVC stage that makes them.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import pandas as pd

from knowsam.config import Params
from knowsam.methods.registry import UPPER_BOUNDS
from knowsam.runs import RunId

# How a method's extra outputs (``Method.variants``) are named in tables.
VARIANT_LABELS: dict[str, str] = {"sam": "SAM output"}


def matrix(params: Params) -> list[RunId]:
    """Every run of the params matrix, in table order (dataset, method, ratio, seed)."""
    return [RunId(method=m, dataset=d, ratio=r, seed=s)
            for d, m, r, s in product(params.datasets, params.methods, params.ratios, params.seeds)]


def row_label(method: str, variant: str) -> str:
    """``knowsam`` for the reported output, ``knowsam [SAM output]`` for a variant."""
    return method if not variant else f"{method} [{VARIANT_LABELS.get(variant, variant + ' output')}]"


def is_upper_bound(method: str) -> bool:
    """A method trained on every label (e.g. fully-supervised): a reference, never a contender."""
    return method in UPPER_BOUNDS


def ratio_label(ratio: float) -> str:
    """0.1 -> "10%", 0.05 -> "5%": labeled fractions as the paper's tables write them."""
    return f"{ratio * 100:.6g}%"


def test_set_order(dataset: str, names) -> list[str]:
    """Test sets in the dataset's registry order (the paper's column order), unknown names after, sorted.

    Metrics files store test sets with sorted keys, so their order is not the table order.
    """
    from knowsam.data.sources import DATASETS

    spec = DATASETS.get(dataset)
    order = [p.name for p in spec.parts] if spec else []
    return sorted(set(names), key=lambda n: (order.index(n) if n in order else len(order), n))


def repro_hint(missing: list[RunId]) -> str:
    """Names the missing runs and the one command that produces them (their groups' evaluate stages)."""
    runs = ", ".join(r.stage_name for r in missing)
    stages = " ".join(dict.fromkeys(f"evaluate@{r.group_stage_name}" for r in missing))
    return f"{runs}; produce them with `dvc repro {stages}`"


def _read_summary(run: RunId, eval_root: str | Path) -> dict | None:
    """The run's full summary (the evaluate stage writes it last), or None if not evaluated."""
    path = run.summary_file(eval_root)
    return json.loads(path.read_text()) if path.is_file() else None


def _scored_other_training(run: RunId, summary: dict, runs_root: str | Path) -> bool:
    """The run folder now holds another training than the one the summary scored (restarted since)."""
    path = run.train_dir(runs_root) / "config.json"
    try:
        current = json.loads(path.read_text()).get("config_hash")
    except (OSError, ValueError):
        return False  # no run folder here (e.g. published results): the summary is all there is
    return summary.get("config_hash", current) != current


def load_summaries(runs: list[RunId], eval_root: str | Path = "data/eval", iterations: int | None = None,
                   runs_root: str | Path = "data/runs") -> tuple[pd.DataFrame, list[RunId]]:
    """Long table (one row per run x variant x test set) of summary metrics, and the runs not evaluated.

    With ``iterations``, a summary recording another number of trained iterations counts as not
    evaluated: it never stands for the configured run. Nor does a summary of a training that the
    run folder no longer holds (the run was restarted, e.g. after its code changed, since it was scored).

    ``variant`` is "" for the method's reported output. Provenance (SAM weights) and the
    evaluation resolution are copied onto every row so footnotes can be built from the table.
    """
    rows, missing = [], []
    for run in runs:
        summary = _read_summary(run, eval_root)
        if summary is None or (iterations is not None and summary.get("iterations", iterations) != iterations) \
                or _scored_other_training(run, summary, runs_root):
            missing.append(run)
            continue
        provenance = summary.get("provenance", {})
        common = {"dataset": run.dataset, "method": run.method, "ratio": run.ratio, "seed": run.seed,
                  "resolution": summary.get("evaluation_resolution", ""),
                  "sam_arch": provenance.get("sam_arch", ""), "sam_weights": provenance.get("sam_weights", ""),
                  "sam_encoder": provenance.get("sam_encoder", ""), "sam_options": provenance.get("sam_options", "")}
        outputs = {"": summary["test_sets"], **summary.get("variants", {})}
        for variant, test_sets in outputs.items():
            for test_set, metrics in test_sets.items():
                rows.append({**common, "variant": variant, "test_set": test_set, **metrics})
    return pd.DataFrame(rows), missing


def load_per_case(run: RunId, eval_root: str | Path = "data/eval") -> pd.DataFrame:
    """A run's per-case table; ``variant`` is "" for the reported output (also in files written before variants)."""
    table = pd.read_csv(run.eval_dir(eval_root) / "per_case.csv", dtype={"case": str, "test_set": str, "variant": str})
    if "variant" not in table.columns:
        table.insert(0, "variant", "")
    table["variant"] = table["variant"].fillna("")  # an empty CSV field reads as NaN
    return table


def missing_evaluations(runs: list[RunId], eval_root: str | Path = "data/eval") -> list[RunId]:
    """Runs lacking the summary or the per-case table (both come from the evaluate stage)."""
    return [r for r in runs
            if not (r.summary_file(eval_root).is_file() and (r.eval_dir(eval_root) / "per_case.csv").is_file())]

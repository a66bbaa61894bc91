"""Collecting evaluated runs: the one reader of ``data/eval`` for reports.

Leaderboard, figures, ``compare`` and ``publish`` all go through here, so a run counts as shown,
stale or missing by one rule everywhere. A run is shown when its summary scored the training the
current params and code make (``summaries.stale_reason``) and its run folder, if here, still holds
that training. Every other run is named with the reason and the DVC stage that makes it; with
``allow_stale`` a summary of other params or code is shown too, flagged ``stale``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.methods.registry import UPPER_BOUNDS
from knowsam.runs import RunId
from knowsam.summaries import identity, read_summary, redo_hint, stale_reason

# How a method's extra outputs (``Method.variants``) are named in tables.
VARIANT_LABELS: dict[str, str] = {"sam": "SAM output"}


def matrix(params: Params) -> list[RunId]:
    """Every run of the params matrix, in table order (dataset, method, ratio, seed)."""
    return [
        RunId(method=m, dataset=d, ratio=r, seed=s)
        for d, m, r, s in product(params.datasets, params.methods, params.ratios, params.seeds)
    ]


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


@dataclass(frozen=True)
class LeftOut:
    """A run of the matrix whose numbers are not current: ``reason`` says why."""

    run: RunId
    reason: str
    scored: bool  # it has a summary (of other params or code, or of a training since replaced): allow_stale shows it

    def __str__(self) -> str:
        return f"{self.run.stage_name} ({self.reason})"


@dataclass
class Results:
    """``table``: one row per shown run x variant x test set (``stale`` marks runs shown by ``allow_stale``);
    ``summaries``: the shown runs' summaries; ``left_out``: runs not shown; ``stale``: runs shown though stale."""

    table: pd.DataFrame
    summaries: dict[RunId, dict] = field(default_factory=dict)
    left_out: list[LeftOut] = field(default_factory=list)
    stale: list[LeftOut] = field(default_factory=list)

    @property
    def shown(self) -> dict[RunId, bool]:
        """Every run in the table, True for a stale one."""
        stale = {item.run for item in self.stale}
        return {run: run in stale for run in self.summaries}


MISSING = "missing"  # a run without results where only results are read (``load_summaries`` without run folders)
STALE_MARK = "†"
STALE_NOTE = (
    "scored under other params or code than the params file's (or a training since replaced); "
    "these numbers do not stand for the current params"
)


def repro_hint(left_out: list[LeftOut], produce: str | None = None) -> str:
    """Names the runs and why, and the one command that produces them: ``produce``, by default their groups'
    evaluate stages (``dvc repro evaluate@...``)."""
    stages = " ".join(dict.fromkeys(f"evaluate@{item.run.group_stage_name}" for item in left_out))
    hint = f"{', '.join(map(str, left_out))}; produce them with `{produce or f'dvc repro {stages}'}`"
    if all(item.scored for item in left_out):
        hint += " (--allow-stale shows them, marked as stale)"
    return hint


def _run_folder_hash(run: RunId, runs_root: str | Path) -> str | None:
    """The configuration hash of the training the run folder holds, None without a readable one (e.g. published
    results, or evaluation folders copied without their runs: the summary is all there is)."""
    try:
        recorded = json.loads((run.train_dir(runs_root) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded.get("config_hash") if isinstance(recorded, dict) else None


def _why_not_scored(params: Params, run: RunId, runs_root: str | Path, current_hash: str) -> str:
    """A run without a summary: not trained (under these params and code), unfinished, or trained, not evaluated."""
    if _run_folder_hash(run, runs_root) != current_hash:
        return "not trained"
    try:
        trained = json.loads((run.train_dir(runs_root) / "train_log.json").read_text())["summary"]["iterations"]
    except (OSError, ValueError, KeyError, TypeError):  # written when a training ends: absent while unfinished
        return "unfinished"
    return "not evaluated" if trained >= params.train.iterations else "unfinished"


def load_summaries(
    params: Params,
    runs: list[RunId],
    eval_root: str | Path = "data/eval",
    runs_root: str | Path | None = "data/runs",
    *,
    allow_stale: bool = False,
    per_case: bool = False,
    code: str | None = None,
) -> Results:
    """The summaries of ``runs`` as a long table (one row per run x variant x test set), and the runs left out.

    A run is left out when it has no summary (``per_case``: or no per-case table), when its summary
    scored other params or code than ``params`` and the code here, or when its run folder now holds
    another training than the one scored (restarted since). ``allow_stale`` shows the runs that have a
    summary anyway, flagged ``stale``. A damaged summary is a KnowsamError naming the file.
    ``runs_root`` None reads results alone (a publication's ``runs/``): no run folder is consulted, and a
    run without a summary is ``missing``, so the outcome depends on the results and the code only.
    ``code``: the training-code fingerprint the summaries must record (default this checkout's;
    a publication passes its pin).

    ``variant`` is "" for the method's reported output. Provenance (SAM weights) and the
    evaluation resolution are copied onto every row so footnotes can be built from the table.
    """
    out = Results(table=pd.DataFrame())
    rows = []
    for run in runs:
        summary = read_summary(run, eval_root)
        current = identity(params, run, code)
        if summary is None or (per_case and not (run.eval_dir(eval_root) / "per_case.csv").is_file()):
            reason = (
                "not evaluated"
                if summary is not None
                else (MISSING if runs_root is None else _why_not_scored(params, run, runs_root, current["config_hash"]))
            )
            out.left_out.append(LeftOut(run, reason, scored=False))
            continue
        reason = stale_reason(summary, current)
        folder = None if runs_root is None else _run_folder_hash(run, runs_root)
        if reason is None and folder is not None and folder != current["config_hash"]:
            reason = "retrained since scored"
        if reason is not None:
            (out.stale if allow_stale else out.left_out).append(LeftOut(run, reason, scored=True))
            if not allow_stale:
                continue
        out.summaries[run] = summary
        provenance = summary.get("provenance") or {}
        common = {
            "dataset": run.dataset,
            "method": run.method,
            "ratio": run.ratio,
            "seed": run.seed,
            "stale": reason is not None,
            "resolution": summary.get("evaluation_resolution", ""),
            "sam_arch": provenance.get("sam_arch", ""),
            "sam_weights": provenance.get("sam_weights", ""),
            "sam_encoder": provenance.get("sam_encoder", ""),
            "sam_options": provenance.get("sam_options", ""),
        }
        outputs = {"": summary["test_sets"], **summary.get("variants", {})}
        for variant, test_sets in outputs.items():
            for test_set, metrics in test_sets.items():
                rows.append({**common, "variant": variant, "test_set": test_set, **metrics})
    out.table = pd.DataFrame(rows)
    return out


ID_COLUMNS = ("variant", "test_set", "case")


def load_per_case(
    run: RunId, eval_root: str | Path = "data/eval", summary: dict | None = None, key: str = "dice"
) -> pd.DataFrame:
    """A run's per-case table, which must hold the metric column ``key``; ``variant`` is "" for the reported
    output (also in files written before variants).

    Read strictly: a file cut short, a NaN or a non-number (the empty-mask policy gives every case a
    finite value) is a KnowsamError naming the file, and with the run's ``summary`` so is a case count
    that differs from the summary's (a file cut at a line end).
    """
    path = run.eval_dir(eval_root) / "per_case.csv"
    redo = redo_hint(run, eval_root)
    try:
        raw = path.read_bytes()
        if not raw.endswith(b"\n"):  # evaluate ends every row with a newline: anything else was cut short
            raise ValueError("empty" if not raw.strip() else "truncated: no newline at the end")
        table = pd.read_csv(io.BytesIO(raw), dtype={"case": str, "test_set": str, "variant": str})
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise KnowsamError(f"{path}: unreadable per-case table ({' '.join(str(exc).split())}); {redo}") from None
    if "variant" not in table.columns:
        table.insert(0, "variant", "")
    table["variant"] = table["variant"].fillna("")  # an empty CSV field reads as NaN
    absent = [c for c in ("test_set", "case", key) if c not in table.columns]
    if absent:
        raise KnowsamError(f"{path}: unreadable per-case table (no column {absent[0]!r}); {redo}")
    for column in [c for c in table.columns if c not in ID_COLUMNS]:
        bad = ~np.isfinite(pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float))
        if bad.any():
            row = table[bad].iloc[0]
            raise KnowsamError(
                f"{path}: column {column!r} is {row[column]} for case {row['case']} of "
                f"{row['test_set']}, where every value is a finite number (see the empty-mask "
                f"policy); {redo}"
            )
    if summary is not None:
        _check_case_counts(path, table, summary, redo)
    return table


def _check_case_counts(path: Path, table: pd.DataFrame, summary: dict, redo: str) -> None:
    outputs = {"": summary["test_sets"], **summary.get("variants", {})}
    for variant, parts in outputs.items():
        for test_set, metrics in parts.items():
            found = int(((table.variant == variant) & (table.test_set == test_set)).sum())
            if found != metrics["n"]:
                output = f"{test_set} ({variant} output)" if variant else test_set
                raise KnowsamError(
                    f"{path}: {found} cases of {output} where summary.json counts {metrics['n']} "
                    f"(truncated, or not from the same evaluation); {redo}"
                )

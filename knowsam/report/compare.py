"""``knowsam-bench compare``: methods side by side with a paired significance test.

For every dataset x labeled ratio selected: each method's summary metric (mDice unless
``--metric`` names another of the registry, ``knowsam.metrics.METRICS``) per test set as mean ±
std over seeds, its difference to the first method named (the baseline), a two-sided
Wilcoxon signed-rank test against the baseline over the per-case values, and the paper's value
where one is published.

Pairing: each method's per-case values are first averaged over its seeds, then cases are
paired by (test set, case). Seeds share the test cases, so pooling seed x case pairs
would count one image several times and make p-values too small; averaging keeps one
pair per independent test case.

Two more p-values answer other questions (Markdown and JSON; the terminal table keeps 80 columns):
- **over seeds**: a paired t-test of the test-set metric per seed, paired by seed (same split, same
  initial draw), where both methods have at least 3 seeds in common. The case test says whether
  the seed-averaged predictions differ on these images; the seed test whether the difference
  outlives training noise. With 3 seeds it needs a large, consistent effect.
- **Holm**: the case p-values of every non-baseline row of the comparison (all datasets, ratios,
  test sets and methods) adjusted together by Holm's step-down method, which bounds the chance of
  any false positive in the family (family-wise error rate) without assuming independence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from scipy.stats import ttest_rel, wilcoxon

from knowsam import validation
from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.metrics import PERCENT, Metric, metric
from knowsam.report import reference
from knowsam.report.results import (
    STALE_MARK,
    STALE_NOTE,
    load_per_case,
    load_summaries,
    ratio_label,
    repro_hint,
    test_set_order,
)
from knowsam.runs import RunId

FORMATS = ("table", "md", "json")
DEFAULT_METRIC = "mDice"
MIN_SEEDS_FOR_SEED_TEST = 3


def pairing(compared: Metric) -> str:
    return (
        f"per case: each method's {compared.label} averaged over its seeds, then paired by (test set, case); "
        "two-sided Wilcoxon signed-rank test (scipy, zero differences dropped; all differences zero gives p = 1)"
    )


@dataclass(frozen=True)
class CompareRow:
    """One method on one test set; values in the metric's table unit (% for Dice), ``diff`` vs the baseline."""

    dataset: str
    ratio: float
    test_set: str
    method: str
    mean: float
    std: float | None
    n_seeds: int
    n_cases: int
    diff: float | None
    p_value: float | None  # Wilcoxon over cases
    paper: float | None
    p_holm: float | None = None  # p_value adjusted over the comparison's rows (Holm)
    p_seeds: float | None = None  # paired t-test over common seeds (>= MIN_SEEDS_FOR_SEED_TEST)
    stale: bool = False  # a seed of it scored other params or code (shown by --allow-stale)


@dataclass(frozen=True)
class Comparison:
    metric: Metric
    baseline: str
    methods: list[str]
    rows: list[CompareRow]
    stale_runs: list[str] = dataclasses.field(default_factory=list)  # "<run> (<reason>)", shown by --allow-stale
    left_out: list[str] = dataclasses.field(default_factory=list)  # "<run> (<reason>)", not in the numbers (incomplete)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric.name,
            "unit": self.metric.unit,
            "baseline": self.baseline,
            "methods": self.methods,
            "pairing": pairing(self.metric),
            "seed_test": SEED_TEST,
            "correction": CORRECTION,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "stale_runs": self.stale_runs,
            "left_out": self.left_out,
        }

    def stale_note(self) -> str | None:
        return f"{STALE_MARK} {STALE_NOTE}: {', '.join(self.stale_runs)}." if self.stale_runs else None

    def incomplete_note(self) -> str | None:
        return (
            f"Incomplete: {len(self.left_out)} run(s) of the comparison are not in these numbers (the Seeds column "
            f"shows what each row holds): {', '.join(self.left_out)}."
            if self.left_out
            else None
        )

    def groups(self) -> dict[tuple[str, float], list[CompareRow]]:
        out: dict[tuple[str, float], list[CompareRow]] = {}
        for row in self.rows:
            out.setdefault((row.dataset, row.ratio), []).append(row)
        return out


SEED_TEST = (
    f"paired t-test (scipy ttest_rel) of the test-set value per seed, paired by seed; only where both methods "
    f"have >= {MIN_SEEDS_FOR_SEED_TEST} seeds in common"
)
CORRECTION = "Holm step-down over the case p-values of every non-baseline row of the comparison (family-wise)"


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest times (m - i + 1), made monotone, at most 1.

    Written here rather than taken from statsmodels (not a dependency) for one short formula;
    tests check it against the step-down definition.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_seeds(baseline: pd.Series, other: pd.Series) -> float | None:
    """Two-sided paired t-test over the seeds both have (index: seed); None below MIN_SEEDS_FOR_SEED_TEST.

    Identical values on every seed return 1 (no evidence of a difference; scipy would return NaN).
    """
    common = sorted(set(baseline.index) & set(other.index))
    if len(common) < MIN_SEEDS_FOR_SEED_TEST:
        return None
    a, b = other.loc[common].to_numpy(), baseline.loc[common].to_numpy()
    if np.allclose(a - b, (a - b)[0]):  # constant differences: t undefined (zero variance)
        return 1.0 if np.allclose(a, b) else 0.0
    return float(ttest_rel(a, b).pvalue)


def parse_methods(values: str | list[str]) -> list[str]:
    """``"ucmt,knowsam"`` or ``["ucmt", "knowsam"]`` (or a mix) -> ``["ucmt", "knowsam"]``."""
    items = [values] if isinstance(values, str) else list(values)
    return [name.strip() for item in items for name in item.split(",") if name.strip()]


def paired_wilcoxon(baseline: pd.Series, other: pd.Series, what: str) -> float:
    """Two-sided p-value of per-case scores paired by index (case); both must hold the same cases.

    All-zero differences return 1 directly: scipy would warn and divide by zero there.
    """
    if set(baseline.index) != set(other.index):
        odd = sorted(set(baseline.index) ^ set(other.index))[0]
        raise KnowsamError(
            f"{what}: the methods were scored on different cases (e.g. {odd}); re-run their evaluate stages"
        )
    other = other.reindex(baseline.index)
    if not np.any(other.to_numpy() - baseline.to_numpy()):
        return 1.0
    return float(wilcoxon(other.to_numpy(), baseline.to_numpy()).pvalue)


def _case_values(runs: list[RunId], eval_root: str | Path, summaries: dict[RunId, dict], compared: Metric) -> pd.Series:
    """Per-case values of the reported output in table units, averaged over the runs (seeds); index (test_set, case)."""
    tables = []
    for run in runs:
        table = load_per_case(run, eval_root, summaries[run], compared.key)
        tables.append(table[table.variant == ""][["test_set", "case", compared.key]])
    grouped = pd.concat(tables).groupby(["test_set", "case"], sort=False)[compared.key]
    counts = grouped.size()
    if (counts != len(runs)).any():
        raise KnowsamError(
            f"{runs[0].method} on {runs[0].dataset}: seeds were scored on different cases "
            f"(e.g. {counts[counts != len(runs)].index[0]}); re-run their evaluate stages"
        )
    return grouped.mean() * compared.scale


def _check_selection(params: Params, methods: list[str], dataset: str | None, ratio: float | None) -> list[float]:
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise KnowsamError(f"compare needs two or more different methods, got {methods}", 2)
    params.require("methods", *methods)
    if dataset is not None:
        params.require("datasets", dataset)
    if ratio is None:
        return list(params.ratios)
    chosen = [r for r in params.ratios if math.isclose(r, ratio)]
    if not chosen:
        known = ", ".join(f"{r:g}" for r in params.ratios)
        raise KnowsamError(f"ratio {ratio:g} is not in params 'ratios' ({known})", 2)
    return chosen


def compare(
    params: Params,
    methods: list[str],
    dataset: str | None = None,
    ratio: float | None = None,
    eval_root: str | Path = "data/eval",
    *,
    metric_name: str = DEFAULT_METRIC,
    allow_stale: bool = False,
    runs_root: str | Path | None = "data/runs",
    incomplete: bool = False,
    code: str | None = None,
) -> Comparison:
    """Compare ``methods`` (the first is the baseline) by the summary metric ``metric_name`` on every
    selected dataset x ratio of the params.

    Every run of the selection (all seeds) must be evaluated under the current params and code;
    otherwise a KnowsamError (exit 1) names each run with the reason, and the ``dvc repro`` command
    that makes them. ``allow_stale`` compares runs scored under other params or code, marked.
    ``incomplete`` compares the runs there are instead (a publication still accumulating): each method
    with the seeds it has, a dataset x ratio only where every method has one; ``left_out`` names the others.
    ``code``: the training code the runs must have been trained with (``results.load_summaries``).
    """
    compared = metric(metric_name)
    ratios = _check_selection(params, methods, dataset, ratio)
    datasets = [dataset] if dataset is not None else list(params.datasets)
    runs = [RunId(m, d, r, s) for d in datasets for r in ratios for m in methods for s in params.seeds]
    results = load_summaries(params, runs, eval_root, runs_root, allow_stale=allow_stale, per_case=True, code=code)
    if results.left_out and not incomplete:
        raise KnowsamError(f"runs not evaluated under the current params and code: {repro_hint(results.left_out)}", 1)
    long = results.table[results.table.variant == ""]
    rows: list[CompareRow] = []
    for d in datasets:
        for r in ratios:
            found = {m: [run for s in params.seeds if (run := RunId(m, d, r, s)) in results.summaries] for m in methods}
            if not all(found.values()):  # a method without any run here: nothing to pair (left_out names it)
                continue
            cases = {m: _case_values(found[m], eval_root, results.summaries, compared) for m in methods}
            here = long[(long.dataset == d) & (long.ratio == r)]
            for test_set in test_set_order(d, here.test_set):
                rows += _test_set_rows(here[here.test_set == test_set], cases, compared, (d, r, test_set), methods)
    tested = [i for i, row in enumerate(rows) if row.p_value is not None]
    for i, adjusted in zip(tested, holm([rows[i].p_value for i in tested])):
        rows[i] = dataclasses.replace(rows[i], p_holm=adjusted)
    return Comparison(
        metric=compared,
        baseline=methods[0],
        methods=list(methods),
        rows=rows,
        stale_runs=[str(item) for item in results.stale],
        left_out=[str(item) for item in results.left_out],
    )


def _test_set_rows(
    summaries: pd.DataFrame,
    cases: dict[str, pd.Series],
    compared: Metric,
    cell: tuple[str, float, str],
    methods: list[str],
) -> list[CompareRow]:
    """Rows of one (dataset, ratio, test set) ``cell``: seed statistics from the summaries, the test from the
    per-case values."""
    dataset, ratio, test_set = cell
    where = f"{dataset} {ratio_label(ratio)} {test_set}"
    for m in methods:
        if m not in set(summaries.method) or test_set not in cases[m].index.get_level_values("test_set"):
            raise KnowsamError(f"{where}: {m} has no results on this test set; re-run its evaluate stages")
    own = {m: cases[m].xs(test_set, level="test_set") for m in methods}
    seeds = {
        m: summaries[summaries.method == m].set_index("seed")[compared.name].astype(float) * compared.scale
        for m in methods
    }
    baseline = methods[0]
    return [
        CompareRow(
            dataset=dataset,
            ratio=ratio,
            test_set=test_set,
            method=m,
            mean=float(seeds[m].mean()),
            std=float(seeds[m].std(ddof=1)) if len(seeds[m]) > 1 else None,
            n_seeds=len(seeds[m]),
            n_cases=len(own[m]),
            diff=None if m == baseline else float(seeds[m].mean() - seeds[baseline].mean()),
            p_value=None if m == baseline else paired_wilcoxon(own[baseline], own[m], f"{where}: {m} vs {baseline}"),
            paper=reference.lookup(dataset, test_set, m, ratio, compared.name),
            p_seeds=None if m == baseline else paired_seeds(seeds[baseline], seeds[m]),
            stale=bool(summaries[summaries.method == m]["stale"].any()),
        )
        for m in methods
    ]


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _texts(row: CompareRow, more_tests: bool = False) -> list[str]:
    """A row's cells; ``more_tests``: with the Holm-adjusted and the over-seeds p-values (Markdown)."""
    mean = f"{row.mean:.2f}" if row.std is None else f"{row.mean:.2f} ± {row.std:.2f}"
    p = "-" if row.p_value is None else f"{row.p_value:.3g} (n={row.n_cases})"
    return [
        row.test_set,
        row.method + (f" {STALE_MARK}" if row.stale else ""),
        mean,
        str(row.n_seeds),
        "-" if row.diff is None else f"{row.diff:+.2f}",
        p,
        *([_p(row.p_holm), _p(row.p_seeds)] if more_tests else []),
        "-" if row.paper is None else f"{row.paper:.2f}",
    ]


def _value_headers(compared: Metric) -> tuple[str, str]:
    """The value and difference columns' short headers: ``mDice %`` and ``Δ pp`` for a percentage."""
    percent = compared.unit == PERCENT
    return f"{compared.name}{' %' if percent else ''}", "Δ pp" if percent else "Δ"


def _headers(result: Comparison) -> list[str]:
    value, _ = _value_headers(result.metric)
    return [
        "Test set",
        "Method",
        f"{value} (mean ± std over seeds)",
        "Seeds",
        f"Δ vs {result.baseline}" + (" (pp)" if result.metric.unit == PERCENT else ""),
        "Wilcoxon p (cases)",
        "Holm p",
        "t-test p (seeds)",
        "Paper",
    ]


def _short_headers(compared: Metric) -> list[str]:
    """The terminal table says the same in 80 columns (pipes and CI logs get no more): short headers, one legend."""
    value, delta = _value_headers(compared)
    return ["Test set", "Method", value, "Seeds", delta, "p (cases)", "Paper"]


def _legend(result: Comparison) -> str:
    value, delta = _value_headers(result.metric)
    lower = "" if result.metric.higher_is_better else " (lower is better)"
    return (
        f"{value}: mean ± std over seeds{lower}. {delta}: difference to {result.baseline}. "
        f"p (cases): {pairing(result.metric)}."
    )


def render_markdown(result: Comparison) -> str:
    lines = []
    headers = _headers(result)
    for (dataset, ratio), rows in result.groups().items():
        lines += [
            f"### {dataset}, {ratio_label(ratio)} labeled",
            "",
            "| " + " | ".join(headers) + " |",
            "|" + "---|" * len(headers),
            *("| " + " | ".join(_texts(r, more_tests=True)) + " |" for r in rows),
            "",
        ]
    for note in (result.stale_note(), result.incomplete_note()):
        if note:
            lines += [note, ""]
    compared = result.metric
    lines.append(
        f"Pairing: {pairing(compared)}. Holm p: {CORRECTION}. t-test p (seeds): {SEED_TEST}. "
        f"{compared.name} = {compared.definition('per-image (per-volume)')}."
        + ("" if compared.higher_is_better else " Lower is better.")
    )
    return "\n".join(lines) + "\n"


def render_tables(result: Comparison) -> list[Table]:
    tables = []
    for (dataset, ratio), rows in result.groups().items():
        caption = " ".join(filter(None, [_legend(result), result.stale_note()]))
        table = Table(
            title=f"{dataset}, {ratio_label(ratio)} labeled",
            caption=caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for header in _short_headers(result.metric):
            text = header in ("Test set", "Method")
            table.add_column(header, justify="left" if text else "right", no_wrap=text)
        for row in rows:
            table.add_row(*_texts(row))
        tables.append(table)
    return tables


def compare_command(
    params_file: str | Path,
    methods: str | list[str],
    dataset: str | None = None,
    ratio: float | None = None,
    fmt: str = "table",
    allow_stale: bool = False,
    metric_name: str = DEFAULT_METRIC,
) -> int:
    """CLI body of ``compare``: prints the comparison in ``fmt`` and returns 0; failures raise KnowsamError."""
    if fmt not in FORMATS:
        raise KnowsamError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", 2)
    result = compare(
        validation.load(params_file),
        parse_methods(methods),
        dataset,
        ratio,
        metric_name=metric_name,
        allow_stale=allow_stale,
    )
    if fmt == "json":
        print(json.dumps(result.to_dict(), indent=2))
    elif fmt == "md":
        print(render_markdown(result), end="")
    else:
        console = Console(file=sys.stdout)
        for table in render_tables(result):
            console.print(table)
    return 0

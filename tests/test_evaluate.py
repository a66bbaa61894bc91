"""Group evaluation: one process scores every method of a (dataset, ratio, seed) group; one metrics file per group."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest

from knowsam import fileio
from knowsam.data.dataset import PreparedDataset
from knowsam.data.splits import split_path, write_split
from knowsam.errors import KnowsamError
from knowsam.evaluate import evaluate_group
from knowsam.metrics import summarize
from knowsam.runs import RunId
from knowsam.train import train_run
from tests.conftest import small_params

METHODS = ["labeled-only", "fully-supervised"]


@pytest.fixture(scope="module")
def trained(demo_prepared, tmp_path_factory):
    """Two 3-iteration runs of one group; returns (params, runs root)."""
    params = dataclasses.replace(small_params(demo_prepared, iterations=3, eval_every=3), methods=METHODS)
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(params.data.splits_root, "demo", 0.1, 0), 0.1, 0, 0.1)
    runs = tmp_path_factory.mktemp("runs")
    for method in METHODS:
        train_run(params, RunId(method, "demo", 0.1, 0), runs_root=runs, progress=False)
    return params, runs


def _evaluate(params, runs, out, methods=None):
    return evaluate_group(
        params, "demo", 0.1, 0, methods, runs_root=runs, eval_root=out / "eval", metrics_root=out / "metrics"
    )


def test_summaries_per_run_and_headline_metrics_per_group(trained, tmp_path):
    params, runs = trained
    seen = []
    summaries = evaluate_group(
        params,
        "demo",
        0.1,
        0,
        runs_root=runs,
        eval_root=tmp_path / "eval",
        metrics_root=tmp_path / "metrics",
        on_result=lambda m, s: seen.append(m),
    )
    assert seen == METHODS
    headline = json.loads((tmp_path / "metrics/demo/ratio-0.1_seed-0.json").read_text())
    assert sorted(headline) == sorted(METHODS)
    for method in METHODS:
        run = RunId(method, "demo", 0.1, 0)
        summary = json.loads((run.eval_dir(tmp_path / "eval") / "summary.json").read_text())
        assert summary == summaries[method] and summary["run"] == dataclasses.asdict(run)
        # The summary is the summary of the run's own per-case table.
        per_case = pd.read_csv(run.eval_dir(tmp_path / "eval") / "per_case.csv", dtype={"case": str})
        for test_set, metrics in summary["test_sets"].items():
            expected = summarize(per_case[per_case.test_set == test_set].drop(columns=["variant"]))
            assert metrics == pytest.approx(expected, abs=1e-6)
            # The DVC metrics file holds the headline columns of the same numbers, nothing else.
            assert headline[method][test_set] == {k: metrics[k] for k in ("mDice", "mIoU", "HD95", "ASD")}
        # The training curves travel with the evaluation: the run's dvclive curves, row for row.
        live = run.live_dir(runs) / "plots/metrics"
        logged_loss = pd.read_csv(live / "train/loss.tsv", sep="\t")
        logged_dice = pd.read_csv(live / "val/dice.tsv", sep="\t")
        curves = pd.read_csv(run.curves_file(tmp_path / "eval"))
        assert list(curves.step) == [1, 2, 3] and curves.loss.tolist() == logged_loss.loss.round(6).tolist()
        assert curves.val_dice.isna().tolist() == [True, True, False]
        assert logged_dice.step.tolist() == [2] and curves.val_dice.iloc[2] == logged_dice.dice.iloc[0]


def test_evaluating_some_methods_keeps_the_others(trained, tmp_path):
    params, runs = trained
    _evaluate(params, runs, tmp_path)
    path = tmp_path / "metrics/demo/ratio-0.1_seed-0.json"
    before = json.loads(path.read_text())
    (tmp_path / "eval/demo/ratio-0.1_seed-0/fully-supervised/summary.json").unlink()
    _evaluate(params, runs, tmp_path, ["fully-supervised"])
    assert json.loads(path.read_text()) == before  # same runs, same numbers; labeled-only kept
    assert (tmp_path / "eval/demo/ratio-0.1_seed-0/fully-supervised/summary.json").is_file()
    # A method dropped from params loses its entry at the next evaluation of the group.
    only = dataclasses.replace(params, methods=["fully-supervised"])
    _evaluate(only, runs, tmp_path)
    assert list(json.loads(path.read_text())) == ["fully-supervised"]


def test_a_missing_run_stops_the_group_before_any_scoring(trained, tmp_path):
    params, runs = trained
    with_mt = dataclasses.replace(params, methods=[*METHODS, "mt"])
    with pytest.raises(
        KnowsamError,
        match=r"ratio-0.1_seed-0/mt/best.pt: trained weights not found; "
        r"run the train stage for mt-demo-0.1-0",
    ):
        _evaluate(with_mt, runs, tmp_path)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "metrics").exists()


def test_a_run_without_curves_gets_none(trained, tmp_path):
    params, runs = trained
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    shutil.rmtree(RunId("labeled-only", "demo", 0.1, 0).live_dir(copy))
    stale = RunId("labeled-only", "demo", 0.1, 0).curves_file(tmp_path / "eval")
    fileio.write_text(stale, "step,loss\n1,9.0\n")  # from an earlier training of the same run
    _evaluate(params, copy, tmp_path)
    assert not stale.exists()
    assert RunId("fully-supervised", "demo", 0.1, 0).curves_file(tmp_path / "eval").is_file()

"""Every table shows only results of the current params and code, and reads its inputs strictly.

Tables (``leaderboard``, ``compare``, ``publish``, the DVC metrics files) leave out runs scored
under other params or code and name them with the reason; ``--allow-stale`` shows them marked.
Damaged summaries and per-case tables, and a run without a readable configuration, give one line
naming the file. Stages refuse to run another checkout's code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from knowsam import config, runs
from knowsam.runs import RunId
from knowsam.summaries import identity, stale_reason
from tests.conftest import REPO
from tests.test_catalogue import EVAL, RUN_DIR, cli, one_line, train_ws, train_ws_base  # noqa: F401
from tests.test_leaderboard import case_rows, make_params, write_run

SEEDS = (0, 1)
CASES = {"Kvasir": 6, "CVC-ClinicDB": 5}
METHODS = ("ucmt", "knowsam")


def fabricated_dice() -> dict[tuple[str, str, int], np.ndarray]:
    rng = np.random.default_rng(3)
    return {(m, t, s): rng.uniform(0.4, 0.9, n) for m in METHODS for t, n in CASES.items() for s in SEEDS}


def write_group(ws: Path, params: config.Params, methods, dice) -> None:
    """Evaluation outputs of ``methods`` (every seed) as evaluate writes them when scoring under ``params``."""
    for method in methods:
        for seed in SEEDS:
            rows = [r for t in CASES for r in case_rows(t, list(dice[method, t, seed]))]
            write_run(ws, RunId(method, "polyp", 0.1, seed), rows, params=params)


def save_params(ws: Path, params: config.Params) -> None:
    (ws / "params.yaml").write_text(yaml.safe_dump(config.to_dict(params)))


def other_lr(params: config.Params) -> config.Params:
    return dataclasses.replace(params, train=dataclasses.replace(params.train, lr=params.train.lr * 2))


def seed_mean(dice, method: str, test_set: str) -> float:
    return float(np.mean([100 * dice[method, test_set, s].mean() for s in SEEDS]))


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """First Markdown table after ``heading``: first cell -> the other cells."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def stale_params_ws(tmp_path) -> tuple[Path, dict]:
    """knowsam scored under the params file's params; ucmt under another train.lr (the file changed since)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    params = make_params(ws, "polyp", list(METHODS), [0.1], list(SEEDS))
    dice = fabricated_dice()
    write_group(ws, params, ["knowsam"], dice)
    write_group(ws, other_lr(params), ["ucmt"], dice)
    save_params(ws, params)
    return ws, dice


STALE_UCMT = [f"ucmt-polyp-0.1-{s} (other params: train.lr)" for s in SEEDS]


@pytest.fixture
def cli_out(cli, capsys):
    """The CLI in a workspace; returns (exit status, stdout, stderr)."""
    from knowsam.cli import main

    def run(ws: Path, *args: str) -> tuple[int, str, str]:
        cli(ws, "--help")  # moves into the workspace
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# --- tables after a params change ------------------------------------------------------------------


def test_leaderboard_after_a_params_change_leaves_the_runs_out_and_names_them(stale_params_ws, cli_out):
    ws, dice = stale_params_ws
    code, out, err = cli_out(ws, "leaderboard")
    assert code == 0 and err == "", err
    assert out.splitlines()[1] == (
        f"left out 2 run(s): {', '.join(STALE_UCMT)}; produce them with `dvc repro "
        "evaluate@polyp-0.1-0 evaluate@polyp-0.1-1` (--allow-stale shows them, marked as "
        "stale)"
    )
    text = (ws / "reports/leaderboard.md").read_text()
    rows = table_rows(text, "## polyp")
    assert (
        rows["ucmt"] == ["10%", "-", "-", "-", "-"]
        and rows["knowsam"][1]
        == f"{seed_mean(dice, 'knowsam', 'Kvasir'):.2f} ± "
        f"{np.std([100 * dice['knowsam', 'Kvasir', s].mean() for s in SEEDS], ddof=1):.2f} (n=2)"
    )
    assert (
        f"2 of 4 runs have no current metrics and are not shown: {', '.join(STALE_UCMT)}; produce them with "
        "`dvc repro evaluate@polyp-0.1-0 evaluate@polyp-0.1-1` (--allow-stale shows them, marked as stale)."
    ) in text
    assert "†" not in text.split("## Runs left out")[0].replace("except cells marked †", "")
    csv = pd.read_csv(ws / "reports/leaderboard.csv")
    assert set(csv.method) == {"knowsam"} and not csv.stale.any()


def test_leaderboard_allow_stale_shows_them_marked(stale_params_ws, cli):
    ws, dice = stale_params_ws
    code, err = cli(ws, "leaderboard", "--allow-stale")
    assert code == 0, err
    text = (ws / "reports/leaderboard.md").read_text()
    rows = table_rows(text, "## polyp")
    ucmt_kvasir = rows["ucmt"][1]
    assert ucmt_kvasir.startswith(f"{seed_mean(dice, 'ucmt', 'Kvasir'):.2f} ± ") and ucmt_kvasir.endswith("(n=2) †")
    assert not rows["knowsam"][1].endswith("†")
    assert "**" not in ucmt_kvasir  # a stale cell never competes for best
    assert "† Shown with --allow-stale: 2 of 4 runs scored under other params or code" in text
    assert ", ".join(STALE_UCMT) in text
    csv = pd.read_csv(ws / "reports/leaderboard.csv")
    assert set(csv[csv.stale].method) == {"ucmt"} and not csv[csv.method == "knowsam"].stale.any()


def test_compare_after_a_params_change_refuses_and_allow_stale_marks(stale_params_ws, cli, cli_out):
    ws, dice = stale_params_ws
    line = one_line(
        *cli(ws, "compare", "--methods", "ucmt,knowsam", "--format", "json"),
        1,
        r"runs not evaluated under the current params and code: ucmt-polyp-0\.1-0 \(other params: "
        r"train\.lr\), ucmt-polyp-0\.1-1 \(other params: train\.lr\); produce them with `dvc repro "
        r"evaluate@polyp-0\.1-0 evaluate@polyp-0\.1-1` \(--allow-stale shows them",
    )
    assert "knowsam-polyp" not in line
    code, out, err = cli_out(ws, "compare", "--methods", "ucmt,knowsam", "--format", "json", "--allow-stale")
    assert code == 0, err
    result = json.loads(out)
    assert result["stale_runs"] == STALE_UCMT
    rows = {(r["test_set"], r["method"]): r for r in result["rows"]}
    assert rows["Kvasir", "ucmt"]["stale"] and not rows["Kvasir", "knowsam"]["stale"]
    ucmt = np.mean([dice["ucmt", "Kvasir", s] for s in SEEDS], axis=0)
    knowsam = np.mean([dice["knowsam", "Kvasir", s] for s in SEEDS], axis=0)
    # per_case.csv rounds nothing here (fabricated at full precision): the test's own Wilcoxon.
    assert rows["Kvasir", "knowsam"]["p_value"] == pytest.approx(scipy.stats.wilcoxon(knowsam, ucmt).pvalue)
    code, md, err = cli_out(ws, "compare", "--methods", "ucmt,knowsam", "--format", "md", "--allow-stale")
    assert code == 0, err
    assert "| Kvasir | ucmt † |" in md and "| Kvasir | knowsam |" in md
    assert "† scored under other params or code than the params file's" in md


def test_publish_after_a_params_change_refuses_and_allow_stale_marks(stale_params_ws, cli):
    ws, _ = stale_params_ws
    one_line(
        *cli(ws, "publish", "pub", "--compare", "ucmt,knowsam"),
        1,
        r"runs not evaluated under the current params and code: ucmt-polyp-0\.1-0 \(other params: train\.lr\)",
    )
    assert not (ws / "pub").exists()
    code, err = cli(ws, "publish", "pub", "--compare", "ucmt,knowsam", "--allow-stale")
    assert code == 0, err
    assert table_rows((ws / "pub/leaderboard.md").read_text(), "## polyp")["ucmt"][1].endswith("†")
    assert "| Kvasir | ucmt † |" in (ws / "pub/compare.md").read_text()
    assert json.loads((ws / "pub/compare.json").read_text())["stale_runs"] == STALE_UCMT


# --- tables after a code change ----------------------------------------------------------------------


@pytest.fixture
def edited_code(tmp_path, monkeypatch):
    """A copy of the package that training-code fingerprints are taken from; returns a function that edits it."""
    root = tmp_path / "source"
    shutil.copytree(runs.SOURCE_ROOT / "knowsam", root / "knowsam")
    monkeypatch.setattr(runs, "SOURCE_ROOT", root)

    def edit() -> None:
        with open(root / "knowsam/losses.py", "a") as fh:
            fh.write("\n# an edit to the training code\n")

    return edit


def test_tables_after_a_code_change(tmp_path, cli, edited_code):
    ws = tmp_path / "ws"
    ws.mkdir()
    params = make_params(ws, "polyp", list(METHODS), [0.1], list(SEEDS))
    save_params(ws, params)
    dice = fabricated_dice()
    write_group(ws, params, ["ucmt"], dice)
    edited_code()
    write_group(ws, params, ["knowsam"], dice)  # scored after the edit: current
    assert cli(ws, "leaderboard")[0] == 0
    text = (ws / "reports/leaderboard.md").read_text()
    assert table_rows(text, "## polyp")["ucmt"] == ["10%", "-", "-", "-", "-"]
    assert "ucmt-polyp-0.1-0 (other code), ucmt-polyp-0.1-1 (other code)" in text
    assert f"training code `{runs.code_fingerprint()}`" in text
    one_line(*cli(ws, "compare", "--methods", "ucmt,knowsam"), 1, r"ucmt-polyp-0\.1-0 \(other code\)")
    code, err = cli(ws, "leaderboard", "--allow-stale")
    assert code == 0, err
    assert table_rows((ws / "reports/leaderboard.md").read_text(), "## polyp")["ucmt"][1].endswith("†")


def test_every_run_stale_is_one_line(tmp_path, cli, edited_code):
    ws = tmp_path / "ws"
    ws.mkdir()
    params = make_params(ws, "polyp", ["ucmt"], [0.1], [0])
    save_params(ws, params)
    write_run(ws, RunId("ucmt", "polyp", 0.1, 0), case_rows("Kvasir", [0.5, 0.6]), params=params)
    edited_code()
    one_line(
        *cli(ws, "leaderboard"),
        1,
        r"data/eval: no evaluated run of the params matrix under the current "
        r"params and code \(ucmt-polyp-0\.1-0 \(other code\); produce them with",
    )
    assert not (ws / "reports").exists()


def test_summaries_without_a_full_identity():
    """Summaries written before they recorded their configuration (only its hash), or with no identity at all."""
    params = make_params(Path("/x"), "polyp", ["ucmt"], [0.1], [0])
    run = RunId("ucmt", "polyp", 0.1, 0)
    current = identity(params, run)
    assert stale_reason({"config_hash": current["config_hash"]}, current) is None  # an older, current summary
    assert (
        stale_reason({"config_hash": identity(other_lr(params), run)["config_hash"]}, current) == "other params or code"
    )
    assert stale_reason({}, current) == "no recorded identity"
    # Speed settings are not part of the identity; the keys named are those that are.
    threads = dataclasses.replace(params, train=dataclasses.replace(params.train, threads=7, lr=0.5))
    assert stale_reason(identity(threads, run), current) == "other params: train.lr"


def test_metrics_file_holds_only_current_runs(train_ws, cli):
    from knowsam import validation
    from knowsam.evaluate import headline_metrics

    assert cli(train_ws, "evaluate", *EVAL)[0] == 0
    metrics = json.loads((train_ws / "reports/metrics/demo/ratio-0.1_seed-0.json").read_text())
    # The summary records what it scored: the run's configuration and hash, as the run folder has them.
    summary = json.loads((train_ws / "data/eval/demo/ratio-0.1_seed-0/labeled-only/summary.json").read_text())
    trained = json.loads((train_ws / RUN_DIR / "config.json").read_text())
    assert summary["config_hash"] == trained["config_hash"] and summary["config"]["code"] == trained["code"]
    assert list(metrics) == ["labeled-only", "left_out"] and metrics["left_out"] == {"knowsam": "not evaluated"}
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["train"]["lr"] = 0.5
    (train_ws / "params.yaml").write_text(yaml.safe_dump(raw))
    group = [RunId(m, "demo", 0.1, 0) for m in ("labeled-only", "knowsam")]
    assert headline_metrics(validation.load("params.yaml"), group) == {
        "left_out": {"labeled-only": "other params: train.lr", "knowsam": "not evaluated"}
    }


# --- evaluate needs the run's configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "content, what",
    [(None, "missing"), (b'{"code": "ab', r"unreadable, JSONDecodeError"), (b"[1, 2]", r"unreadable, ValueError")],
)
def test_evaluate_without_a_readable_run_configuration(train_ws, cli, content, what):
    path = train_ws / RUN_DIR / "config.json"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        rf"ratio-0.1_seed-0/labeled-only/config.json: run configuration {what}, so \S+/best.pt cannot be "
        r"matched to the params; re-run the train stage for labeled-only-demo-0.1-0",
    )
    assert not (train_ws / "data/eval").exists() and not (train_ws / "reports").exists()


# --- damaged evaluation files ----------------------------------------------------------------------------


@pytest.fixture
def current_ws(tmp_path) -> tuple[Path, dict]:
    ws = tmp_path / "ws"
    ws.mkdir()
    params = make_params(ws, "polyp", list(METHODS), [0.1], list(SEEDS))
    dice = fabricated_dice()
    write_group(ws, params, METHODS, dice)
    save_params(ws, params)
    return ws, dice


COMMANDS = {
    "leaderboard": ["leaderboard"],
    "compare": ["compare", "--methods", "ucmt,knowsam"],
    "publish": ["publish", "pub", "--compare", "ucmt,knowsam"],
}
SUMMARY = "data/eval/polyp/ratio-0.1_seed-1/knowsam/summary.json"
PER_CASE = "data/eval/polyp/ratio-0.1_seed-1/knowsam/per_case.csv"


def nothing_written(ws: Path) -> None:
    assert not (ws / "reports").exists() and not (ws / "pub").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], r"unreadable evaluation summary \(truncated or not JSON\)"),
        (lambda b: b"", r"unreadable evaluation summary \(empty\)"),
        (lambda b: b"{}", r"not an evaluation summary \(no test sets with n, mDice, mIoU, HD95, ASD\)"),
        (
            lambda b: b.replace(b'"mDice": 0.', b'"mDice": NaN, "x": 0.', 1),
            r"holds NaN where every metric is finite \(see the empty-mask policy\)",
        ),
    ],
)
def test_damaged_summary_is_one_line(current_ws, cli, command, damage, message):
    ws, _ = current_ws
    path = ws / SUMMARY
    path.write_bytes(damage(path.read_bytes()))
    one_line(
        *cli(ws, *COMMANDS[command]), 1, rf"{re.escape(SUMMARY)}: {message}; re-run `dvc repro evaluate@polyp-0\.1-1`"
    )
    nothing_written(ws)


@pytest.mark.parametrize("command", ["compare", "publish"])
def test_truncated_per_case_table_is_one_line(current_ws, cli, command):
    ws, _ = current_ws
    path = ws / PER_CASE
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # cut inside the last row
    one_line(
        *cli(ws, *COMMANDS[command]),
        1,
        rf"{re.escape(PER_CASE)}: unreadable per-case table \(truncated: no "
        r"newline at the end\); re-run `dvc repro evaluate@polyp-0\.1-1`",
    )
    nothing_written(ws)
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])  # cut at the end of a row: one case fewer
    one_line(
        *cli(ws, *COMMANDS[command]),
        1,
        rf"{re.escape(PER_CASE)}: 4 cases of CVC-ClinicDB where summary.json "
        r"counts 5 \(truncated, or not from the same evaluation\)",
    )
    nothing_written(ws)


@pytest.mark.parametrize("command", ["compare", "publish"])
@pytest.mark.parametrize("value", ["nan", "", "inf", "abc"])
def test_non_finite_per_case_value_is_one_line(current_ws, cli, command, value):
    ws, _ = current_ws
    path = ws / PER_CASE
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[2, "dice"] = value
    path.write_text(table.to_csv(index=False))
    case = table.loc[2, "case"]
    one_line(
        *cli(ws, *COMMANDS[command]),
        1,
        rf"{re.escape(PER_CASE)}: column 'dice' is {value or 'nan'} for case "
        rf"{case} of Kvasir, where every value is a finite number \(see the empty-mask policy\)",
    )
    nothing_written(ws)


# --- stages run this repository's code ------------------------------------------------------------------


def test_stage_refuses_a_knowsam_from_another_checkout(tmp_path):
    checkout = tmp_path / "second-checkout"
    (checkout / "stages").mkdir(parents=True)
    for name in ("_entry.py", "split.py"):
        shutil.copy(REPO / "stages" / name, checkout / "stages" / name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # an environment whose knowsam is the first checkout's
    proc = subprocess.run(
        [sys.executable, str(checkout / "stages/split.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (
        f"error: {checkout / 'stages/split.py'} runs in {checkout} but {sys.executable} imports "
        f"knowsam from {REPO / 'knowsam'}; install this checkout into its environment "
        f"(`pip install -e .` from {checkout})\n"
    )
    # The same environment runs the first checkout's own stages.
    own = subprocess.run(
        [sys.executable, str(REPO / "stages/split.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert own.returncode == 0 and "--ratio" in own.stdout, own.stderr
    # With an environment of its own (.venv), the stage re-runs itself there, as without any knowsam.
    venv_python = checkout / ".venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/bin/sh\necho "re-run by the checkout\'s python: $*"\n')
    venv_python.chmod(0o755)
    rerun = subprocess.run(
        [sys.executable, str(checkout / "stages/split.py"), "--help"], env=env, capture_output=True, text=True
    )
    assert (
        rerun.returncode == 0
        and rerun.stdout == f"re-run by the checkout's python: {checkout / 'stages/split.py'} --help\n"
    ), rerun.stderr

"""A publication whose results accumulate in Git run by run: status, storing, the runner, the report.

Two parts. On fabricated evaluation outputs (numbers worked out by hand): each run's state (done,
missing, stale with the reason), storing that is whole or nothing, a comparison of the runs there are.
On the built-in demo dataset, trained for real (2 iterations): sittings of `publication run` that
store each run as it is evaluated, skip what is done, commit each run alone and start nothing past
`--max-minutes`; and a copy of the workspace without data/ that rebuilds the report byte for byte.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml

from knowsam import config
from knowsam.errors import KnowsamError
from knowsam.report import publication
from knowsam.report.compare import compare
from knowsam.report.publication import Publication, remove_leftovers, status, store_run
from knowsam.report.publication_build import build
from knowsam.runs import RunId
from tests.test_catalogue import cli, one_line, tree  # noqa: F401
from tests.test_leaderboard import case_rows, make_params, write_run

CASES = {"Kvasir": 6, "CVC-ClinicDB": 5}


def dice(method: str, seed: int, test_set: str) -> list[float]:
    """Case i scores base + 0.03 x seed + 0.01 x i (knowsam 0.1 above ucmt)."""
    base = {"ucmt": 0.6, "knowsam": 0.7}[method]
    return [round(base + 0.03 * seed + 0.01 * i, 6) for i in range(CASES[test_set])]


def write_eval(ws: Path, params: config.Params, method: str, seed: int) -> RunId:
    run = RunId(method, "polyp", 0.1, seed)
    write_run(ws, run, [r for t in CASES for r in case_rows(t, dice(method, seed, t))], params=params)
    return run


def save(pub: Publication, params: config.Params) -> None:
    pub.folder.mkdir(parents=True, exist_ok=True)
    pub.params_file.write_text(yaml.safe_dump(config.to_dict(params)))


RECORD = {
    "wall_seconds": {"train": 720.0, "evaluate": 36.0},
    "resumed_at_step": 0,
    "side_by_side": 2,
    "threads": 1,
    "machine": {"cpu": "test cpu"},
    "packages": {"torch": "2.0"},
}


@pytest.fixture
def fabricated(tmp_path) -> tuple[Path, Publication, config.Params]:
    """ucmt seeds 0 and 1 and knowsam seed 0 evaluated and stored; knowsam seed 1 never made."""
    ws = tmp_path / "ws"
    params = make_params(ws, "polyp", ["ucmt", "knowsam"], [0.1], [0, 1])
    pub = Publication(ws / "pub")
    save(pub, params)
    for method, seed in (("ucmt", 0), ("ucmt", 1), ("knowsam", 0)):
        store_run(pub, params, write_eval(ws, params, method, seed), RECORD, ws / "data/eval", ws / "data/runs")
    return ws, pub, params


def states(pub: Publication, params: config.Params) -> dict[str, tuple[str, str | None]]:
    return {s.run.stage_name: (s.state, s.reason) for s in status(pub, params)}


def test_status_names_done_missing_and_stale_runs_with_the_reason(fabricated):
    ws, pub, params = fabricated
    assert states(pub, params) == {
        "ucmt-polyp-0.1-0": ("done", None),
        "ucmt-polyp-0.1-1": ("done", None),
        "knowsam-polyp-0.1-0": ("done", None),
        "knowsam-polyp-0.1-1": ("missing", "missing"),
    }
    faster = dataclasses.replace(params, train=dataclasses.replace(params.train, lr=0.02, threads=1))
    save(pub, faster)  # the matrix's params changed: every stored run is of other params; threads is speed only
    assert states(pub, pub.params()) == {
        "ucmt-polyp-0.1-0": ("stale", "other params: train.lr"),
        "ucmt-polyp-0.1-1": ("stale", "other params: train.lr"),
        "knowsam-polyp-0.1-0": ("stale", "other params: train.lr"),
        "knowsam-polyp-0.1-1": ("missing", "missing"),
    }


def test_stored_run_holds_the_evaluation_files_and_the_record(fabricated):
    ws, pub, params = fabricated
    run = RunId("ucmt", "polyp", 0.1, 1)
    stored = tree(run.eval_dir(pub.runs_root))
    assert sorted(stored) == [".knowsam-output", "per_case.csv", "run.json", "summary.json"]
    for name in ("summary.json", "per_case.csv"):
        assert stored[name] == (run.eval_dir(ws / "data/eval") / name).read_bytes()
    assert json.loads(stored["run.json"]) == RECORD
    assert publication.run_seconds(RECORD) == 756.0
    assert publication.recorded_seconds(status(pub, params)) == {("polyp", "ucmt"): 756.0, ("polyp", "knowsam"): 756.0}


def test_store_refuses_results_of_other_params(fabricated):
    ws, pub, params = fabricated
    other = dataclasses.replace(params, train=dataclasses.replace(params.train, iterations=400))
    run = write_eval(ws, other, "knowsam", 1)
    with pytest.raises(
        KnowsamError,
        match=r"summary\.json: stale for .*pub/params\.yaml \(other params: "
        r"train\.iterations\); train and evaluate knowsam-polyp-0\.1-1 again$",
    ):
        store_run(pub, params, run, RECORD, ws / "data/eval", ws / "data/runs")
    assert not run.eval_dir(pub.runs_root).exists()


def code_repo(tmp_path: Path) -> Path:
    """A Git checkout holding a copy of the training sources, committed (what a pin records)."""
    from knowsam.runs import SOURCE_ROOT, TRAINING_SOURCES

    repo = tmp_path / "code"
    for source in TRAINING_SOURCES:
        path = SOURCE_ROOT / source
        if path.is_dir():
            shutil.copytree(path, repo / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, repo / source)
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=T", "-c", "user.email=t@example.org", "add", ".")
    git(repo, "-c", "user.name=T", "-c", "user.email=t@example.org", "commit", "-q", "-m", "code")
    return repo


def test_a_pin_keeps_stored_runs_done_while_the_training_code_changes(fabricated, monkeypatch, tmp_path, cli):
    from knowsam import runs

    ws, pub, params = fabricated
    repo = code_repo(tmp_path)
    monkeypatch.setattr(runs, "SOURCE_ROOT", repo)
    fingerprint = runs.code_fingerprint()
    assert fingerprint == runs.code_fingerprint(Path(publication.__file__).parents[2])  # same bytes
    code, _ = cli(ws, "publication", "pin", "pub")
    assert code == 0
    pin = json.loads(pub.pin_file.read_text())
    assert pin["fingerprint"] == fingerprint and pin["commit"] == git(repo, "rev-parse", "HEAD").strip()

    train_py = repo / "knowsam/train.py"
    train_py.write_text(train_py.read_text() + "\n# an edit\n")
    one_line(
        *cli(ws, "publication", "pin", "pub", "--replace"),
        2,
        r"^error: training code has uncommitted changes \(M knowsam/train\.py\); commit them first",
    )
    edited = runs.code_fingerprint()
    assert edited != fingerprint
    # Pinned: the runs stored with the pinned code stay done; this checkout may not add runs to them.
    assert {state for state, _ in states(pub, params).values()} == {"done", "missing"}
    one_line(
        *cli(ws, "publication", "run", "pub"),
        2,
        rf"^error: pub/training-code\.json: the runs are made with training code {fingerprint} "
        rf"\(commit {pin['commit'][:12]}\), this checkout's is {edited}; run the sitting from a checkout of that "
        rf"commit \(`git worktree add --detach \.\./knowsam-pinned {pin['commit'][:12]} && cd",
    )
    # Unpinned, the same runs are judged by this checkout's code: all stale.
    pinned = pub.pin_file.read_bytes()
    pub.pin_file.unlink()
    assert states(pub, params)["ucmt-polyp-0.1-0"] == ("stale", "other code")
    pub.pin_file.write_bytes(pinned)

    git(repo, "-c", "user.name=T", "-c", "user.email=t@example.org", "commit", "-q", "-am", "edit")
    one_line(
        *cli(ws, "publication", "pin", "pub"),
        2,
        rf"^error: pub/training-code\.json: pins training code {fingerprint} \(commit {pin['commit']}\), this "
        rf"checkout's is {edited}; add --replace",
    )
    code, _ = cli(ws, "publication", "pin", "pub", "--replace")
    assert code == 0 and json.loads(pub.pin_file.read_text())["fingerprint"] == edited
    assert states(pub, params)["ucmt-polyp-0.1-0"] == ("stale", "other code")


def test_quiet_leaves_out_the_sitting_s_notes(fabricated, monkeypatch, capsys):
    from knowsam.cli import main

    ws, pub, params = fabricated
    monkeypatch.chdir(ws)
    for quiet, expected in ((["-q"], ""), ([], "pub: no run to make (3 of 4 done)\n")):
        capsys.readouterr()
        assert main([*quiet, "publication", "run", "pub", "--methods", "ucmt"]) == 0
        assert capsys.readouterr().err == expected  # notes are log messages: stderr, as every progress line


def test_a_damaged_pin_is_one_line(fabricated, cli):
    ws, pub, _ = fabricated
    pub.pin_file.write_text("{}")
    one_line(
        *cli(ws, "publication", "status", "pub"),
        1,
        r"^error: pub/training-code\.json: has no 'fingerprint'; write it with `knowsam-bench publication pin pub`$",
    )


def test_a_damaged_stored_summary_names_the_file_and_how_to_get_it_back(fabricated, cli):
    ws, pub, _ = fabricated
    summary = RunId("ucmt", "polyp", 0.1, 1).summary_file(pub.runs_root)
    summary.write_text(summary.read_text()[:40])
    one_line(
        *cli(ws, "publication", "status", "pub"),
        1,
        r"^error: pub/runs/polyp/ratio-0\.1_seed-1/ucmt/summary\.json: unreadable evaluation summary \(truncated or "
        r"not JSON\); restore it from Git \(`git checkout -- pub/runs/polyp/ratio-0\.1_seed-1/ucmt`\) or delete "
        r"that folder and run `knowsam-bench publication run pub`$",
    )


class Stopped(BaseException):
    """What SIGINT/SIGTERM raise in the harness (not an Exception: nothing may swallow it)."""


def stop_after(monkeypatch, files: int) -> None:
    real = shutil.copyfile
    copied = []

    def copy(source, target):
        if len(copied) == files:
            raise Stopped()
        copied.append(source)
        return real(source, target)

    monkeypatch.setattr(publication.shutil, "copyfile", copy)


def test_a_store_stopped_half_way_leaves_the_earlier_results_or_none(fabricated, monkeypatch):
    ws, pub, params = fabricated
    stored = RunId("ucmt", "polyp", 0.1, 0)
    before = tree(stored.eval_dir(pub.runs_root))
    write_run(ws, stored, [r for t in CASES for r in case_rows(t, [0.5] * CASES[t])], params=params)  # new results
    new = write_eval(ws, params, "knowsam", 1)
    stop_after(monkeypatch, files=1)
    for run in (stored, new):
        with pytest.raises(Stopped):
            store_run(pub, params, run, RECORD, ws / "data/eval", ws / "data/runs")
    assert tree(stored.eval_dir(pub.runs_root)) == before
    assert not new.eval_dir(pub.runs_root).exists()
    assert sorted(p.name for p in stored.eval_dir(pub.runs_root).parent.iterdir()) == ["knowsam", "ucmt"]
    assert states(pub, params)["knowsam-polyp-0.1-1"] == ("missing", "missing")


def test_leftovers_of_a_killed_store_are_removed_and_never_read(fabricated):
    ws, pub, params = fabricated
    run = RunId("knowsam", "polyp", 0.1, 1)
    staging = run.eval_dir(pub.runs_root).with_name(".knowsam.x1y2.tmp")  # what a SIGKILL mid-store leaves
    staging.mkdir()
    (staging / "summary.json").write_text('{"test_sets": {')
    assert states(pub, params)["knowsam-polyp-0.1-1"] == ("missing", "missing")
    assert remove_leftovers(pub) == [staging] and not staging.exists()


def test_compare_of_an_incomplete_publication_uses_the_runs_there_are(fabricated):
    ws, pub, params = fabricated
    with pytest.raises(KnowsamError, match=r"knowsam-polyp-0\.1-1 \(missing\)"):
        compare(params, ["ucmt", "knowsam"], eval_root=pub.runs_root, runs_root=None)
    result = compare(params, ["ucmt", "knowsam"], eval_root=pub.runs_root, runs_root=None, incomplete=True)
    assert result.left_out == ["knowsam-polyp-0.1-1 (missing)"]
    rows = {(r.test_set, r.method): r for r in result.rows}
    ucmt, knowsam = rows["Kvasir", "ucmt"], rows["Kvasir", "knowsam"]
    # ucmt: seeds 0 and 1, Kvasir means 0.625 and 0.655; knowsam: seed 0 only, 0.725.
    assert (ucmt.n_seeds, knowsam.n_seeds) == (2, 1)
    assert ucmt.mean == pytest.approx(64.0) and ucmt.std == pytest.approx(np.std([62.5, 65.5], ddof=1))
    assert knowsam.mean == pytest.approx(72.5) and knowsam.std is None and knowsam.diff == pytest.approx(8.5)
    paired = scipy.stats.wilcoxon(
        np.array(dice("knowsam", 0, "Kvasir")), np.mean([dice("ucmt", s, "Kvasir") for s in (0, 1)], axis=0)
    ).pvalue
    assert knowsam.p_value == pytest.approx(paired)


def test_build_of_an_incomplete_publication_marks_it(fabricated, monkeypatch):
    ws, pub, params = fabricated
    monkeypatch.chdir(ws)
    pub = Publication(Path("pub"))
    build(pub, [["ucmt", "knowsam"]])
    readme = (pub.report_dir / "README.md").read_text()
    assert (
        "3 of 4 runs done, 1 missing, 0 stale. **Incomplete**: continue with `knowsam-bench publication run pub`"
        in readme
    )
    assert "| polyp | 10% | knowsam | 1/2 | done | missing |" in readme
    assert "| polyp | 3 of 3 done | 0.60 h | 0.03 h | 0.63 h |" in readme  # 3 x 720 s and 3 x 36 s
    assert "| torch | 2.0 (3) |" in readme
    board = (pub.report_dir / "leaderboard.md").read_text()
    assert (
        "1 of 4 runs have no current metrics and are not shown: knowsam-polyp-0.1-1 (missing); produce them with "
        "`knowsam-bench publication run pub`."
    ) in board
    assert "| knowsam | 10% | **72.50** (n=1) |" in board  # Kvasir: 0.70 + 0.01 x (0..5), seed 0 alone
    assert (
        "Incomplete: 1 run(s) of the comparison are not in these numbers"
        in (pub.report_dir / "compare-ucmt-vs-knowsam.md").read_text()
    )


# --- the demo, trained for real --------------------------------------------------------------------

SEEDS = [0, 1]
METHODS = ["labeled-only", "fully-supervised"]


def demo_params(**train) -> dict:
    from tests.test_catalogue import params_dict

    raw = params_dict(prepared_root="data/prepared")
    raw.update(methods=METHODS, seeds=SEEDS)
    raw["train"].update(iterations=2, eval_every=1, checkpoint_every=1, threads=1, **train)
    return raw


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ws), *args], check=True, capture_output=True, text=True).stdout


def sitting(ws: Path, monkeypatch, **options):
    from knowsam.run_missing import run_missing

    monkeypatch.chdir(ws)
    said = []
    return run_missing("pub", echo=said.append, **options), said


def run_names(runs) -> list[str]:
    return [r.stage_name for r in runs]


@pytest.fixture(scope="module")
def accumulated(demo_prepared, tmp_path_factory):
    """A Git workspace whose publication filled in two sittings: labeled-only first (2 side by side), then the
    rest with --commit; the raw demo data only (each sitting prepares what it needs)."""
    ws = tmp_path_factory.mktemp("accumulate")
    shutil.copytree(demo_prepared / "data/raw", ws / "data/raw")
    (ws / "pub").mkdir()
    (ws / "pub/params.yaml").write_text(yaml.safe_dump(demo_params(), sort_keys=False))
    (ws / ".gitignore").write_text("data/\n")
    git(ws, "init", "-q")
    # A DVC project, as a publication lives in: otherwise dvclive runs `dvc init` in each training
    # process, and two side by side race on it.
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True)
    git(ws, "config", "user.name", "Test")
    git(ws, "config", "user.email", "test@example.org")
    git(ws, "add", ".")
    git(ws, "commit", "-q", "-m", "publication params")
    with pytest.MonkeyPatch.context() as mp:
        first = sitting(ws, mp, jobs=2, methods=["labeled-only"], datasets=["demo"])
        after_first = tree(ws / "pub/runs")
        (ws / "unrelated.txt").write_text("staged, not the runner's\n")
        git(ws, "add", "unrelated.txt")
        second = sitting(ws, mp, jobs=2, commit=True)
    return ws, first, after_first, second


def test_a_sitting_prepares_trains_evaluates_and_stores_each_run(accumulated):
    ws, (outcome, said), _, _ = accumulated
    # two runs side by side: stored in the order they finish, which timing decides
    assert sorted(run_names(outcome.stored)) == ["labeled-only-demo-0.1-0", "labeled-only-demo-0.1-1"]
    assert "demo: preparing at 32 px" in said and not outcome.failed and not outcome.not_started
    for run in outcome.stored:
        folder = run.eval_dir(ws / "pub/runs")
        assert sorted(p.name for p in folder.iterdir()) == [
            ".knowsam-output",
            "config.json",
            "curves.csv",
            "per_case.csv",
            "run.json",
            "summary.json",
            "train_log.json",
        ]  # no weights, no predictions
        for name in ("summary.json", "per_case.csv", "curves.csv"):
            assert (folder / name).read_bytes() == (run.eval_dir(ws / "data/eval") / name).read_bytes()
        assert (folder / "config.json").read_bytes() == (run.train_dir(ws / "data/runs") / "config.json").read_bytes()
        record = json.loads((folder / "run.json").read_text())
        assert record["side_by_side"] == 2 and record["threads"] == 1 and record["resumed_at_step"] == 0
        assert record["wall_seconds"]["train"] > 0 and record["wall_seconds"]["evaluate"] > 0
        assert record["packages"]["torch"] == importlib.metadata.version("torch")
        summary = json.loads((folder / "summary.json").read_text())
        assert 0.0 <= summary["test_sets"]["Demo-Kvasir"]["mDice"] <= 1.0 and summary["iterations"] == 2
        assert len((folder / "curves.csv").read_text().splitlines()) == 3  # header and 2 iterations
        log = (ws / "data/logs/pub" / f"{run.stage_name}.train.log").read_text()  # kept after the sitting
        assert f"{run.stage_name}: step 2/2, validation Dice" in log


def test_the_next_sitting_makes_only_the_missing_runs_and_commits_each_alone(accumulated, monkeypatch):
    ws, _, after_first, (outcome, said) = accumulated
    assert run_names(outcome.todo) == ["fully-supervised-demo-0.1-0", "fully-supervised-demo-0.1-1"]
    assert [line for line in said if line.endswith(": started")] == [f"{r}: started" for r in run_names(outcome.todo)]
    # Two runs side by side are stored, and committed, in the order they finish.
    assert sorted(run_names(outcome.stored)) == run_names(outcome.todo) and not outcome.failed
    now = tree(ws / "pub/runs")
    assert {k: v for k, v in now.items() if "labeled-only" in k} == after_first  # done runs untouched
    log = git(ws, "log", "--format=%s", "-3").splitlines()
    assert sorted(log[:2]) == [
        "pub: results of fully-supervised-demo-0.1-0",
        "pub: results of fully-supervised-demo-0.1-1",
    ]
    assert log[2] == "publication params"
    for commit, subject in (("HEAD", log[0]), ("HEAD~1", log[1])):
        run = f"ratio-0.1_seed-{subject[-1]}"  # each commit holds the files of the run it names
        files = git(ws, "show", "--name-only", "--format=", commit).split()
        assert sorted(files) == sorted(
            f"pub/runs/demo/{run}/fully-supervised/{name}"
            for name in (
                ".knowsam-output",
                "config.json",
                "curves.csv",
                "per_case.csv",
                "run.json",
                "summary.json",
                "train_log.json",
            )
        )
    assert "unrelated.txt" in git(ws, "diff", "--cached", "--name-only").split()  # still staged, not committed
    again, said = sitting(ws, monkeypatch, jobs=2)
    assert again.todo == [] and said == ["pub: no run to make (4 of 4 done)"]


def test_a_fresh_copy_without_data_rebuilds_the_report_byte_for_byte(accumulated, tmp_path, monkeypatch):
    from knowsam.cli import main

    ws = accumulated[0]
    monkeypatch.chdir(ws)
    assert main(["publication", "build", "pub", "--compare", "labeled-only,fully-supervised"]) == 0
    report = tree(ws / "pub/report")
    assert {
        "README.md",
        "leaderboard.md",
        "leaderboard.csv",
        "figures/leaderboard.png",
        "figures/curves_demo.png",
        "compare-labeled-only-vs-fully-supervised.md",
        "compare-labeled-only-vs-fully-supervised.json",
        ".knowsam-output",
    } == set(report)
    assert "4 of 4 runs done, 0 missing, 0 stale: complete." in report["README.md"].decode()
    clone = tmp_path / "clone"
    shutil.copytree(ws, clone, ignore=shutil.ignore_patterns("data", "report"))
    monkeypatch.chdir(clone)
    assert main(["publication", "build", "pub", "--compare", "labeled-only,fully-supervised"]) == 0
    assert tree(clone / "pub/report") == report
    assert not (clone / "data").exists()


def test_status_after_a_params_change_shows_stale_runs_with_the_reason(accumulated, tmp_path, monkeypatch, capsys):
    from knowsam.cli import main

    ws = tmp_path / "ws"
    shutil.copytree(accumulated[0] / "pub", ws / "pub")
    (ws / "pub/params.yaml").write_text(yaml.safe_dump(demo_params(lr=0.05), sort_keys=False))
    monkeypatch.chdir(ws)
    capsys.readouterr()
    assert main(["publication", "status", "pub", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"done": 0, "missing": 0, "stale": 4}
    assert {r["run"]: r["reason"] for r in result["runs"]} == {
        f"{m}-demo-0.1-{s}": "other params: train.lr" for m in METHODS for s in SEEDS
    }
    assert main(["publication", "status", "pub"]) == 0
    out = capsys.readouterr().out
    assert "stale: fully-supervised-demo-0.1-1 (other params: train.lr)" in out
    # Stale runs' times are of other params, which may cost otherwise: only done runs time the rest.
    assert (
        "0 of 4 runs done, 0 missing, 4 stale; make them with `knowsam-bench publication run pub` (no done run "
        "of their dataset and method to time them by)."
    ) in out


def test_max_minutes_starts_no_run_its_stored_times_say_would_not_finish(accumulated, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(accumulated[0], ws, ignore=shutil.ignore_patterns(".git"))
    (ws / "pub/params.yaml").write_text(yaml.safe_dump({**demo_params(), "seeds": [0, 1, 2]}, sort_keys=False))
    recorded = publication.recorded_seconds(status(Publication(ws / "pub"), config.read(ws / "pub/params.yaml")))
    from knowsam.cli import main

    monkeypatch.chdir(ws)
    capsys.readouterr()
    assert main(["publication", "status", "pub"]) == 0
    assert re.search(
        r"4 of 6 runs done, 2 missing, 0 stale; make them with `knowsam-bench publication run pub` "
        r"\(about \d+ s at the done runs' wall times\)\.",
        capsys.readouterr().out,
    )
    outcome, said = sitting(ws, monkeypatch, max_minutes=min(recorded.values()) / 60 / 2)
    assert run_names(outcome.todo) == ["labeled-only-demo-0.1-2", "fully-supervised-demo-0.1-2"]
    assert outcome.stored == [] and not any(line.endswith("started") for line in said)
    assert [(r.stage_name, s) for r, s in outcome.not_started] == [
        (r.stage_name, recorded[r.dataset, r.method]) for r in outcome.todo
    ]


def test_a_run_finished_in_the_sitting_replaces_the_estimate_of_the_next_of_its_kind(fabricated, monkeypatch):
    """Steps timed alone before a sitting underestimate a run (no neighbour, no validation): once a run of a
    kind has finished, its wall time decides whether the next one of that kind still fits."""
    from knowsam import run_missing

    ws, pub, params = fabricated
    monkeypatch.chdir(ws)
    child = [sys.executable, "-c", "import time; time.sleep(1.0); print('done')"]
    monkeypatch.setattr(run_missing.Sitting, "commands", lambda self, run: [("train", child), ("evaluate", child)])
    monkeypatch.setattr(run_missing, "store_run", lambda pub, params, run, record: ws / "stored")
    (ws / "logs").mkdir()
    said: list[str] = []
    record = {"threads": 1}
    sitting = run_missing.Sitting(pub, params, ws / "params.yaml", ws / "logs", 1, False, None, record, said.append)
    runs = [RunId("knowsam", "polyp", 0.1, seed) for seed in (1, 2)]
    outcome = run_missing.Outcome(todo=list(runs))
    # Timed alone, each run would take 0.2 s; the first takes over 2 s, so the second no longer fits in 3 s.
    sitting.make(outcome, {r: 0.2 for r in runs}, time.monotonic() + 3.0)
    assert outcome.stored == runs[:1], said
    assert [r for r, _ in outcome.not_started] == runs[1:]
    assert outcome.not_started[0][1] == sitting.finished[("polyp", "knowsam")] >= 2.0


# --- one line for what is refused ------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["run"], ["build", "--compare", "ucmt,knowsam"]])
def test_a_folder_without_params_is_refused(tmp_path, cli, command):
    (tmp_path / "pub").mkdir()
    one_line(
        *cli(tmp_path, "publication", command[0], "pub", *command[1:]),
        1,
        r"^error: pub/params\.yaml: not found; a publication folder starts with its params file, e\.g\. "
        r"`knowsam-bench profile cpu --params pub/params\.yaml`$",
    )


def test_run_refuses_an_unknown_method_a_commit_outside_git_and_a_second_sitting(fabricated, cli):
    from knowsam.run_missing import hold

    ws, pub, params = fabricated
    one_line(
        *cli(ws, "publication", "run", "pub", "--methods", "mt"),
        2,
        r"^error: method 'mt' is not in pub/params\.yaml 'methods' \(ucmt, knowsam\)$",
    )
    one_line(
        *cli(ws, "publication", "run", "pub", "--datasets", "polyp,acdc"),
        2,
        r"^error: dataset 'acdc' is not in pub/params\.yaml 'datasets' \(polyp\)$",
    )
    one_line(
        *cli(ws, "publication", "run", "pub", "--commit"),
        2,
        r"^error: pub: not inside a Git working tree; --commit commits each run there$",
    )
    with hold(pub):  # a sitting at work on it
        one_line(
            *cli(ws, "publication", "run", "pub"),
            1,
            r"^error: pub: another `publication run` is making its runs; wait for it to end or stop it first$",
        )
    assert states(pub, params)["knowsam-polyp-0.1-1"] == ("missing", "missing")


def test_failed_runs_are_named_and_the_others_go_on(accumulated, tmp_path, cli):
    ws = tmp_path / "ws"
    shutil.copytree(accumulated[0], ws, ignore=shutil.ignore_patterns(".git"))
    (ws / "pub/params.yaml").write_text(yaml.safe_dump(demo_params(lr=0.05), sort_keys=False))
    before = tree(ws / "pub/runs")
    # data/runs holds the trainings of the old lr: without --restart-stale each train child refuses its folder.
    line = one_line(
        *cli(ws, "-q", "publication", "run", "pub", "--methods", "labeled-only", "--jobs", "2"),
        1,
        r"^error: 2 run\(s\) failed: labeled-only-demo-0\.1-[01] \(train: data/runs/demo/ratio-0\.1_seed-[01]/"
        r"labeled-only/checkpoint\.pt: checkpoint from a different configuration or version; delete ",
    )
    # The two runs fail side by side, named in the order they fail.
    for seed in (0, 1):
        assert (
            f"labeled-only-demo-0.1-{seed} (train: data/runs/demo/ratio-0.1_seed-{seed}/labeled-only/checkpoint.pt"
            in line
        )
    assert tree(ws / "pub/runs") == before  # the stale results stay until new ones replace them

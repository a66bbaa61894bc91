"""Reliability: a run killed with SIGKILL at any point resumes to exactly the uninterrupted result;
a non-finite loss stops the run with a clear message; only safe loaders read files; the
pipeline is deterministic down to the bytes of its metrics files."""

from __future__ import annotations

import ast
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from knowsam.data.dataset import PreparedDataset
from knowsam.data.splits import split_path, write_split
from tests.conftest import REPO

RUN = ["demo", "--method", "labeled-only", "--ratio", "0.1", "--seed", "0"]
RUN_DIR = Path("data/runs/demo/ratio-0.1_seed-0/labeled-only")

# Runs the real CLI. With KS_PAUSE > 0 the process pauses (a) inside every checkpoint write,
# after the temporary file is complete but before it is renamed into place, and (b) right
# after best.pt has been renamed into place: wide, deterministic windows to kill it in.
DRIVER = """
import os, sys, time
import torch
pause = float(os.environ.get("KS_PAUSE", "0"))
real_save, real_replace = torch.save, os.replace
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if ".checkpoint.pt." in str(f):
        time.sleep(pause)
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if str(dst).endswith("best.pt"):
        time.sleep(pause)
torch.save, os.replace = save, replace
from knowsam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_params(demo_root: Path, ws: Path, **train) -> Path:
    """A params.yaml in ``ws`` reading the shared prepared demo data; splits and runs stay in ``ws``."""
    raw = yaml.safe_load((REPO / "knowsam/profiles/demo.yaml").read_text())
    raw["data"].update(
        raw_root=str(demo_root / "data/raw"),
        prepared_root=str(demo_root / "data/prepared"),
        splits_root=str(ws / "data/splits"),
        image_size=32,
    )
    raw["train"].update(
        {
            "iterations": 30,
            "batch_size": 4,
            "labeled_batch": 2,
            "eval_every": 2,
            "checkpoint_every": 6,
            "threads": 1,
            **train,
        }
    )
    ws.mkdir(parents=True, exist_ok=True)
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    data = PreparedDataset(demo_root / "data/prepared/demo")
    write_split(data, split_path(ws / "data/splits", "demo", 0.1, 0), 0.1, 0, raw["data"]["val_fraction"])
    return path


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("KNOWSAM_MIRROR", None)
    return env


def start(ws: Path, args: list[str], pause: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        cwd=ws,
        env=_env(KS_PAUSE=str(pause)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # absent, or replaced while reading
        return None


def newest_checkpoint_step(run_dir: Path) -> int:
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        step = _step(run_dir / name)
        if step is not None:
            return step
    return 0


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "live/plots/metrics/train/loss.tsv"
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, out, err = finish(proc)
            pytest.fail(f"run ended (exit {proc.returncode}) before the kill point:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_at_three_points_resumes_to_the_uninterrupted_result(demo_prepared, tmp_path):
    ref_ws, ws = tmp_path / "reference", tmp_path / "killed"
    # lr 0.05: validation Dice improves at iterations 22 and 28, between checkpoints (every 6).
    args_ref = ["train", *RUN, "--params", str(write_params(demo_prepared, ref_ws, lr=0.05)), "--no-progress"]
    args = ["train", *RUN, "--params", str(write_params(demo_prepared, ws, lr=0.05)), "--no-progress"]
    code, out, err = finish(start(ref_ws, args_ref))
    assert code == 0, err
    ref_dir, run_dir = ref_ws / RUN_DIR, ws / RUN_DIR
    rng = random.Random(20250101)
    kills = []

    # 1. During a checkpoint write: the temporary file is complete but not yet renamed.
    nth = rng.randint(2, 3)  # the 2nd or 3rd checkpoint: resume from the 1st or 2nd
    seen: set[str] = set()

    def in_checkpoint_write() -> bool:
        current = {p.name for p in run_dir.glob(".checkpoint.pt.*.tmp")}
        seen.update(current)
        return len(seen) >= nth and bool(current)

    kill_when(start(ws, args, pause=0.5), in_checkpoint_write)
    assert any(run_dir.glob(".checkpoint.pt.*.tmp")), "the kill did not land inside the checkpoint write"
    kills.append(("checkpoint write", newest_checkpoint_step(run_dir)))

    # 2. Right after a best.pt save that no checkpoint covers yet: best.pt on disk is newer than
    # the checkpoint the restart resumes from, so the resumed run must rewrite it identically.
    before = (run_dir / "best.pt").stat().st_mtime_ns if (run_dir / "best.pt").exists() else 0
    skip = rng.randint(0, 1)
    hits = []

    def best_ahead_of_checkpoint() -> bool:
        best = run_dir / "best.pt"
        if not best.exists() or best.stat().st_mtime_ns == before:
            return False
        step = _step(best)
        if step is None or step <= newest_checkpoint_step(run_dir) or step in hits:
            return False
        hits.append(step)
        return len(hits) > skip

    kill_when(start(ws, args, pause=0.3), best_ahead_of_checkpoint)
    assert _step(run_dir / "best.pt") > newest_checkpoint_step(run_dir)
    kills.append(("after best.pt, before its checkpoint", _step(run_dir / "best.pt")))

    # 3. At a random iteration past the checkpoint the restart resumes from.
    resume_at = newest_checkpoint_step(run_dir)
    target = rng.randint(resume_at + 2, 27)
    kill_when(start(ws, args), lambda: logged_steps(run_dir) >= target)
    kills.append(("random iteration", target))
    # ... and the newest checkpoint is torn (as on a file system without atomic rename):
    # the restart must report it and fall back to the previous one.
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    code, out, err = finish(start(ws, args))
    assert code == 0, err
    assert "unreadable checkpoint" in err and "checkpoint.pt" in err
    assert len(kills) == 3

    ref_log, log = (json.loads((d / "train_log.json").read_text()) for d in (ref_dir, run_dir))
    for key in ("best_val_dice", "best_step", "iterations", "final_losses"):
        assert log["summary"][key] == ref_log["summary"][key], key
    ref_best, best = (torch.load(d / "best.pt", weights_only=True) for d in (ref_dir, run_dir))
    assert best["step"] == ref_best["step"] == ref_log["summary"]["best_step"]
    for net, weights in ref_best["weights"].items():
        assert weights.keys() == best["weights"][net].keys()
        assert all(torch.equal(weights[k], best["weights"][net][k]) for k in weights), net
    ref_ck, ck = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (ref_dir, run_dir))
    assert ck["best"] == ref_ck["best"] and ck["step"] == ref_ck["step"] == 30
    # dvclive curves: rows logged after the resumed checkpoint were dropped on restart, so every
    # step appears once and the files equal the uninterrupted run's byte for byte.
    assert tree_bytes(run_dir / "live") == tree_bytes(ref_dir / "live")
    loss_steps = [
        int(line.split("\t")[0])
        for line in (run_dir / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    ]
    assert loss_steps == list(range(30))
    assert not list(run_dir.glob(".*.tmp")), "temporary files of the killed writes were not cleaned up"


def test_resume_rewinds_dvclive_curves(demo_prepared, tmp_path):
    """Fast, in-process variant of the dvclive part: a restart from an older checkpoint logs no step twice."""
    from knowsam import validation
    from knowsam.runs import RunId
    from knowsam.train import train_run

    ws = tmp_path / "ws"
    params = validation.load(write_params(demo_prepared, ws, iterations=8, eval_every=2, checkpoint_every=4))
    run, runs = RunId("labeled-only", "demo", 0.1, 0), ws / "runs"
    train_run(params, run, runs_root=tmp_path / "ref", progress=False)
    train_run(params, run, runs_root=runs, progress=False)
    run_dir = run.train_dir(runs)
    (run_dir / "checkpoint.pt").unlink()  # as if killed after step 8's curves but before its checkpoint
    (run_dir / ".checkpoint.pt.x.tmp").write_bytes(b"torn")
    train_run(params, run, runs_root=runs, progress=False)
    assert tree_bytes(run_dir / "live") == tree_bytes(run.train_dir(tmp_path / "ref") / "live")
    assert not (run_dir / ".checkpoint.pt.x.tmp").exists()


def test_nonfinite_loss_stops_with_method_iteration_and_term(demo_prepared, tmp_path, monkeypatch, capsys):
    from knowsam.cli import main
    from knowsam.methods import get_method

    ws = tmp_path / "ws"
    params = write_params(demo_prepared, ws, iterations=12, eval_every=3, checkpoint_every=3)
    cls = get_method("labeled-only")
    original = cls.train_step

    def poisoned(self, batch, step):
        losses = original(self, batch, step)
        return {**losses, "loss": float("nan")} if step == 7 else losses

    monkeypatch.setattr(cls, "train_step", poisoned)
    monkeypatch.chdir(ws)
    capsys.readouterr()
    code = main(["train", *RUN, "--params", str(params), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: labeled-only on demo: loss term 'loss' is nan at iteration 7;"), err
    assert "last good checkpoint kept" in err
    run_dir = ws / RUN_DIR
    assert _step(run_dir / "checkpoint.pt") == 6  # the last checkpoint before the bad step
    assert _step(run_dir / "best.pt") <= 6
    assert not (run_dir / "train_log.json").exists()
    assert not list(run_dir.glob(".*.tmp"))


# --- safe loading ---------------------------------------------------------------------------


def _unsafe_calls(source: str, filename: str) -> list[str]:
    """Loader calls that could execute code from a file: every torch.load must say weights_only=True."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}: {func}"

        def const(name, kwargs=kwargs):
            value = kwargs.get(name)
            return value.value if isinstance(value, ast.Constant) else ("<dynamic>" if value is not None else None)

        if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
            if const("weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
        elif func.split(".")[-1] in ("load", "unsafe_load", "full_load", "load_all") and func.split(".")[0] == "yaml":
            problems.append(f"{where} (use yaml.safe_load)")
        elif func.split(".")[-1] == "YAML" and const("typ") != "safe":  # ruamel.yaml: only its safe loader
            problems.append(f"{where} (use YAML(typ='safe'))")
        elif func.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and func.split(".")[
            -1
        ] in ("load", "loads", "Unpickler", "open"):
            problems.append(where)
        elif func.split(".")[-1] in ("read_pickle", "jit.load") or func.endswith("jit.load"):
            problems.append(where)
        elif (
            func.split(".")[-1] == "load"
            and func.split(".")[0] in ("np", "numpy")
            and const("allow_pickle") not in (None, False)
        ):
            problems.append(f"{where} with allow_pickle")
        elif func in ("eval", "exec"):
            problems.append(where)
    return problems


def test_only_safe_loaders_in_the_package():
    files = sorted((REPO / "knowsam").rglob("*.py")) + sorted((REPO / "stages").glob("*.py"))
    assert files
    problems = [p for f in files for p in _unsafe_calls(f.read_text(), str(f.relative_to(REPO)))]
    assert problems == []


def test_safe_loader_check_catches_unsafe_code():
    bad = (
        "import torch, yaml, pickle, numpy as np\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(s)\nyaml.unsafe_load(s)\n"
        "pickle.loads(b)\nnp.load(p, allow_pickle=True)\nYAML(typ='unsafe').load(s)\nYAML().load(s)\n"
    )
    assert len(_unsafe_calls(bad, "bad.py")) == 8
    good = (
        "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\nnp.load(p, mmap_mode='r')\n"
        "YAML(typ='safe').load(s)\n"
    )
    assert _unsafe_calls(good, "good.py") == []


# --- determinism ------------------------------------------------------------------------------


def _npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


@pytest.mark.slow
def test_train_and_evaluate_twice_give_identical_files(demo_prepared, tmp_path):
    """Two separate processes (different hash seeds), same params: identical metrics files, byte for byte."""
    outputs = []
    for name, hashseed in (("a", "1"), ("b", "987")):
        ws = tmp_path / name
        params = write_params(demo_prepared, ws, iterations=12, eval_every=4, checkpoint_every=6)
        train = ["train", *RUN, "--params", str(params), "--no-progress"]
        evaluate = [
            "evaluate",
            "demo",
            "--ratio",
            "0.1",
            "--seed",
            "0",
            "--methods",
            "labeled-only",
            "--params",
            str(params),
        ]
        code = f"import sys; from knowsam.cli import main; sys.exit(main({train!r}) or main({evaluate!r}))"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ws,
            env=_env(PYTHONHASHSEED=hashseed),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(
            {
                "metrics": (ws / "reports/metrics/demo/ratio-0.1_seed-0.json").read_bytes(),
                "summary": (ws / "data/eval/demo/ratio-0.1_seed-0/labeled-only/summary.json").read_bytes(),
                "per_case": (ws / "data/eval/demo/ratio-0.1_seed-0/labeled-only/per_case.csv").read_bytes(),
                "predictions": _npz(ws / "data/eval/demo/ratio-0.1_seed-0/labeled-only/predictions.npz"),
                "live": tree_bytes(ws / RUN_DIR / "live"),
            }
        )
    a, b = outputs
    for key in a:
        if key == "predictions":  # a zip archive stamps its members with the time: compare contents
            assert a[key].keys() == b[key].keys() and all((a[key][k] == b[key][k]).all() for k in a[key])
        else:
            assert a[key] == b[key], key
    summary = json.loads(a["summary"])
    assert all(math.isfinite(v["mDice"]) for v in summary["test_sets"].values())
    assert json.loads(a["metrics"])["labeled-only"] == {
        part: {k: v[k] for k in ("mDice", "mIoU", "HD95", "ASD")} for part, v in summary["test_sets"].items()
    }

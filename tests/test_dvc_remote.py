"""DVC keeps the results: repro the demo, push to a folder remote, pull in a fresh clone, nothing to re-run.

The project (this checkout's code, dvc.yaml, a 2-method, 6-iteration demo params file) is copied into
a new Git repository whose stages run this checkout's code (``.venv/bin/python``, which the stages
re-run themselves with, puts the copy first on the path). After ``dvc repro``, ``dvc.lock`` is
committed and ``dvc push`` fills a local-folder remote; a ``git clone`` of the repository then
``dvc pull``s and must hold every output, byte for byte, with ``dvc status`` clean; the resume
checkpoints stay behind (``.dvcignore``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml")


def run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{cwd / '.venv/bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("KNOWSAM_MIRROR", None)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=T", "-c", "user.email=t@example.org", *args)


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def own_python(project: Path) -> None:
    """``.venv/bin/python``: this interpreter with the project's own copy of the code first on the path."""
    python = project / ".venv/bin/python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{project}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, Path]:
    project = tmp_path_factory.mktemp("dvc") / "project"
    for folder in ("knowsam", "stages"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        shutil.copyfile(REPO / name, project / name)
    (project / ".gitignore").write_text((REPO / ".gitignore").read_text() + "/.venv/\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["methods"] = ["labeled-only", "mt"]
    params["train"].update(iterations=6, eval_every=3, checkpoint_every=3, threads=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    own_python(project)
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    remote = project.parent / "remote"
    dvc(project, "remote", "add", "-d", "shared", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "project")  # dvclive reads the current commit
    dvc(project, "repro", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "benchmark")
    dvc(project, "push", "-q")
    return project, remote


def test_a_fresh_clone_pulls_the_whole_benchmark_without_running_anything(pushed, tmp_path):
    project, remote = pushed
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    own_python(clone)
    assert not (clone / "data").exists() and not (clone / "reports/leaderboard.md").exists()
    dvc(clone, "pull", "-q")
    assert "Data and pipelines are up to date." in dvc(clone, "status")
    local_only = ("checkpoint.pt", "checkpoint.prev.pt", ".train.lock")  # .dvcignore: the trainer's, not results
    for folder in ("data/runs", "data/eval", "reports/metrics", "reports/figures"):
        assert tree(clone / folder) == {
            k: v for k, v in tree(project / folder).items() if Path(k).name not in local_only
        }, folder
    assert (clone / "reports/leaderboard.md").read_bytes() == (project / "reports/leaderboard.md").read_bytes()
    run_dir = Path("data/runs/demo/ratio-0.1_seed-0/mt")
    assert (clone / run_dir / "best.pt").is_file() and (project / run_dir / "checkpoint.pt").is_file()
    assert not list((clone / "data/runs").rglob("checkpoint*.pt")), "resume checkpoints are not pushed"
    # Nothing to re-run: the stages' outputs are the pulled ones.
    assert "Running stage" not in dvc(clone, "repro", "--dry")


def test_experiments_list_their_params_and_metrics_and_plots_diff_draws_both_curves(pushed, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(pushed[0], project, symlinks=True)
    own_python(project)
    dvc(project, "exp", "run", "-q", "-n", "faster", "-S", "train.lr=0.3")
    rows = list(csv.DictReader(io.StringIO(dvc(project, "exp", "show", "--no-pager", "--csv"))))
    faster = next(row for row in rows if row["Experiment"] == "faster")
    assert faster["train.lr"] == "0.3" and float(faster["mt.Demo-Kvasir.mDice"]) >= 0
    diff = json.loads(dvc(project, "plots", "diff", "HEAD", "faster", "--json"))["data"]
    for method in ("labeled-only", "mt"):
        (plot,) = diff[f"reports/curves/demo/ratio-0.1_seed-0/{method}.csv"]
        values = plot["content"]["data"]["values"]
        assert plot["revisions"] == ["HEAD", "faster"]
        assert [(v["rev"], v["step"]) for v in values] == [
            ("HEAD", "3"),
            ("HEAD", "6"),
            ("faster", "3"),
            ("faster", "6"),
        ]
        curve = project / f"reports/curves/demo/ratio-0.1_seed-0/{method}.csv"  # the experiment's, in the workspace
        assert [float(v["val_dice"]) for v in values if v["rev"] == "faster"] == [
            float(line.split(",")[1]) for line in curve.read_text().splitlines()[1:]
        ]

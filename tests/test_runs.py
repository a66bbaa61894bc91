"""A run's identity: the training code it executes is part of it, and nothing else of the package is."""

from __future__ import annotations

import shutil

import yaml

from knowsam import runs
from tests.conftest import REPO

# The train stage's code deps that only start a run (script, command line, params validation, errors,
# file writing, device choice, dataset registry, downloads): editing them cannot change a trained run.
TRAIN_ENTRY_DEPS = {
    "stages/train.py",
    "stages/_entry.py",
    "knowsam/__init__.py",
    "knowsam/cli.py",
    "knowsam/errors.py",
    "knowsam/fileio.py",
    "knowsam/validation.py",
    "knowsam/data/__init__.py",
    "knowsam/data/sources.py",
    "knowsam/download.py",
    "knowsam/machine.py",
}


def test_fingerprinted_sources_are_the_train_stage_code_deps_minus_its_entry():
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    code = {d for d in deps if d.startswith(("knowsam", "stages/"))}
    assert set(runs.TRAINING_SOURCES) == code - TRAIN_ENTRY_DEPS


def test_fingerprint_follows_training_code_only(tmp_path):
    shutil.copytree(REPO / "knowsam", tmp_path / "knowsam")
    base = runs.code_fingerprint(tmp_path)
    with open(tmp_path / "knowsam/report/leaderboard.py", "a") as fh:
        fh.write("\n# reports cannot change a trained run\n")
    with open(tmp_path / "knowsam/cli.py", "a") as fh:
        fh.write("\n# nor the command line\n")
    assert runs.code_fingerprint(tmp_path) == base
    with open(tmp_path / "knowsam/methods/mt.py", "a") as fh:
        fh.write("\n# a method's code can\n")
    assert runs.code_fingerprint(tmp_path) != base


def test_a_version_bump_keeps_every_run_current(monkeypatch):
    """The code fingerprint already covers what trains; the release number must not retrain everything."""
    import knowsam
    from knowsam import validation

    params = validation.load(REPO / "params.yaml")
    run = runs.RunId(method=params.methods[0], dataset=params.datasets[0], ratio=params.ratios[0], seed=params.seeds[0])
    before = runs.config_hash(runs.run_config(params, run))
    monkeypatch.setattr(knowsam, "__version__", "99.0.0")
    assert runs.config_hash(runs.run_config(params, run)) == before
    assert "99.0.0" not in repr(runs.run_config(params, run))

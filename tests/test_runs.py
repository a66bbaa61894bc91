"""A run's identity: the training code it executes is part of it, and nothing else of the package is."""

from __future__ import annotations

import shutil

from knowsam import pipeline, runs
from tests.conftest import REPO


def _touch(root, source: str) -> None:
    """Append a comment to ``source`` under ``root`` (a folder's first module, when it is a folder)."""
    path = root / source
    path = min(path.rglob("*.py")) if path.is_dir() else path
    with open(path, "a") as fh:
        fh.write("\n# an edit\n")


def test_fingerprint_follows_the_training_sources_of_the_train_stage_and_no_other_code_it_runs(tmp_path):
    """Of the files the train stage runs (its entry in knowsam/pipeline.py), an edit changes the
    fingerprint exactly when the file is one of the training sources."""
    train = pipeline.stage_code("train")
    assert set(runs.TRAINING_SOURCES) < set(train)
    for folder in ("knowsam", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = runs.code_fingerprint(tmp_path)
    for source in train:
        _touch(tmp_path, source)
        after = runs.code_fingerprint(tmp_path)
        assert (after != before) == (source in runs.TRAINING_SOURCES), source
        before = after


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

"""Adding a method takes its module and one registry line: docs/contributing.md's example, trained for a few steps."""

from __future__ import annotations

import re
import sys

import pytest

from knowsam.data.dataset import PreparedDataset
from knowsam.data.splits import split_path, write_split
from knowsam.methods import get_method, registry
from knowsam.run_state import training_history
from knowsam.runs import RunId
from knowsam.train import train_run
from tests.conftest import REPO, small_params


@pytest.fixture
def entmin(tmp_path, monkeypatch):
    """docs/contributing.md's method module in a folder of the methods package, and its registry line."""
    import knowsam.methods

    source = re.search(r"```python\n(.*?)```", (REPO / "docs/contributing.md").read_text(), re.S).group(1)
    (tmp_path / "entmin.py").write_text(source)
    monkeypatch.setattr(knowsam.methods, "__path__", [*knowsam.methods.__path__, str(tmp_path)])
    get_method("mt")  # every listed module registered first: the copy below holds them all
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration ends with the test
    monkeypatch.setitem(registry.METHOD_INDEX, "entmin", "entmin")  # the one registry line
    yield "entmin"
    sys.modules.pop("knowsam.methods.entmin", None)


def test_a_new_method_trains_through_the_shared_loop(entmin, demo_prepared, tmp_path):
    params = small_params(demo_prepared, iterations=4, eval_every=2, checkpoint_every=2)
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(params.data.splits_root, "demo", 0.1, 0), 0.1, 0, 0.1)
    run = RunId(entmin, "demo", 0.1, 0)
    summary = train_run(params, run, runs_root=tmp_path / "runs", progress=False)
    assert get_method(entmin).__module__ == "knowsam.methods.entmin"
    assert summary["iterations"] == 4 and 0.0 <= summary["best_val_dice"] <= 1.0
    curves = training_history(run, tmp_path / "runs")
    assert curves.step.tolist() == [1, 2, 3, 4]
    assert {"loss", "sup", "ent", "w_ent", "val_dice"} <= set(curves.columns)
    assert curves.loss.notna().all() and (curves.loss > 0).all()

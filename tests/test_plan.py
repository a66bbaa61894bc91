"""`knowsam-bench plan`: runs counted from the params, completed runs recognised as evaluate does, and
time estimates that are the measured step time times the iterations."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from knowsam import config
from knowsam.data.dataset import PreparedDataset
from knowsam.data.splits import split_path, write_split
from knowsam.plan import FEASIBLE_SECONDS, make_plan, render
from knowsam.runs import RunId
from knowsam.train import train_run
from tests.conftest import REPO, small_params


@pytest.fixture(scope="module")
def trained(demo_prepared, tmp_path_factory):
    """Params for two methods and a workspace where one of their runs is complete and one stopped halfway."""
    params = dataclasses.replace(small_params(demo_prepared), methods=["labeled-only", "mt"], ratios=[0.1], seeds=[0])
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(params.data.splits_root, "demo", 0.1, 0), 0.1, 0, 0.1)
    runs_root = tmp_path_factory.mktemp("runs")
    train_run(params, RunId("labeled-only", "demo", 0.1, 0), runs_root=runs_root, progress=False)
    halfway = dataclasses.replace(params, train=dataclasses.replace(params.train, iterations=3))
    train_run(halfway, RunId("mt", "demo", 0.1, 0), runs_root=runs_root, progress=False)
    return params, runs_root


def test_counts_runs_and_recognises_complete_ones(trained):
    params, runs_root = trained
    plan = make_plan(params, runs_root, step_seconds={"labeled-only": 0.5, "mt": 2.0})
    assert (plan["runs"], plan["done"], plan["pending"]) == (2, 1, 1)  # mt's 3-iteration run is not a 6-iteration one
    by_method = {m["method"]: m for m in plan["methods"]}
    assert by_method["mt"] == {"method": "mt", "step_s": 2.0, "run_s": 12.0, "runs": 1, "pending": 1}
    assert by_method["labeled-only"]["pending"] == 0
    assert plan["pending_train_s"] == 12.0 and plan["feasible"]


def test_measures_every_pending_method_on_this_machine(trained):
    params, runs_root = trained
    plan = make_plan(params, runs_root, steps=1)
    by_method = {m["method"]: m for m in plan["methods"]}
    assert by_method["mt"]["step_s"] > 0
    # run_s is rounded to 0.1 s, step_s to 0.1 ms
    assert by_method["mt"]["run_s"] == pytest.approx(by_method["mt"]["step_s"] * params.train.iterations, abs=0.06)
    assert by_method["labeled-only"]["step_s"] == 0  # complete: not measured


def test_a_profile_beyond_this_machine_says_it_needs_a_gpu(tmp_path):
    paper = config.parse(yaml.safe_load((REPO / "knowsam/profiles/paper.yaml").read_text()))
    slow = {m: FEASIBLE_SECONDS / 1000 for m in paper.methods}  # a CPU at paper size: hours per thousand steps
    plan = make_plan(paper, tmp_path, step_seconds=slow)
    assert not plan["feasible"] and plan["done"] == 0
    assert any("run this profile on a GPU" in line for line in render(plan))
    fast = make_plan(paper, tmp_path, step_seconds={m: 1e-4 for m in paper.methods})
    assert fast["feasible"] and not any("GPU" in line for line in render(fast))


def test_a_cached_teacher_encoder_adds_the_embed_stage_and_times_steps_without_the_encoder(demo_prepared, tmp_path):
    from knowsam.embed import embed

    params = dataclasses.replace(small_params(demo_prepared), methods=["knowsam"], ratios=[0.1], seeds=[0])
    params = dataclasses.replace(
        params,
        sam=dataclasses.replace(
            params.sam, arch="tiny", checkpoint="none", encoder="cached", embeddings_root=str(tmp_path / "emb")
        ),
    )
    images = 48 + 6 + 6  # the demo's train, Demo-Kvasir and Demo-Colon parts
    plan = make_plan(params, tmp_path / "runs", step_seconds={"knowsam": 1.0}, encoder_seconds=0.5)
    assert plan["embed"] == {
        "image_s": 0.5,
        "datasets": [{"dataset": "demo", "images": images, "pending": images, "seconds": images * 0.5}],
    }
    assert plan["pending_embed_s"] == images * 0.5 and plan["pending_train_s"] == params.train.iterations
    assert any(f"demo {images} of {images} images" in line and "in all about" in line for line in render(plan))
    unprepared = dataclasses.replace(params, data=dataclasses.replace(params.data, prepared_root=str(tmp_path / "no")))
    line = render(make_plan(unprepared, tmp_path / "runs", step_seconds={"knowsam": 1.0}, encoder_seconds=0.5))[0]
    assert "demo not prepared yet" in line and "the prepared ones about 0 s" in line
    embed(params, "demo")
    plan = make_plan(params, tmp_path / "runs", encoder_seconds=0.5)  # steps measured with stand-in embeddings
    assert plan["embed"]["datasets"][0]["pending"] == 0 and plan["pending_embed_s"] == 0
    assert plan["methods"][0]["step_s"] > 0
    adapters = dataclasses.replace(params, sam=dataclasses.replace(params.sam, encoder="adapters"))
    assert make_plan(adapters, tmp_path / "runs", step_seconds={"knowsam": 1.0})["embed"] is None

"""Every module a DVC stage executes is in that stage's code in the table (knowsam/pipeline.py),
and dvc.yaml's deps are written from that table.

The executed modules are measured, not guessed: each stage's command runs for real on a tiny
demo workspace in its own process, and the ``knowsam`` modules loaded when it exits (lazy
imports included) are that stage's code. A module outside every dep means an edit to it
leaves ``dvc status`` clean and the old results marked up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from knowsam import pipeline
from knowsam.cli import main

REPO = Path(__file__).resolve().parents[1]

# Runs a stage script as DVC would (`python stages/<stage>.py ...`) and, at exit, writes the repo-relative
# files of every loaded module of the package or of stages/ (lazily imported ones included) to the file named first.
TRACER = """
import atexit, json, os, runpy, sys
out, repo, script, *args = sys.argv[1:]
def dump():
    files = {os.path.relpath(m.__file__, repo) for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    with open(out, "w") as f:
        json.dump(sorted(f for f in files if f.startswith(("knowsam/", "stages/"))), f)
atexit.register(dump)
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(script))  # as `python stages/<stage>.py` does
runpy.run_path(script, run_name="__main__")
"""


def _run_traced(workspace: Path, script: str, args: list[str], out: Path) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", TRACER, str(out), str(REPO), str(REPO / script), *args],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return set(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, set[str]]:
    """Stage name -> repo-relative files of the knowsam modules its command executed (every method for train)."""
    ws = tmp_path_factory.mktemp("deps-ws")
    params = yaml.safe_load((REPO / "knowsam/profiles/demo.yaml").read_text())
    params["data"]["image_size"] = 32
    params["train"].update(iterations=2, eval_every=1, checkpoint_every=1, threads=1)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dataset, ratio, seed = params["datasets"][0], str(params["ratios"][0]), str(params["seeds"][0])
    # The embed stage also runs as it does for a frozen-encoder teacher (a tiny SAM with a checkpoint
    # file in SAM's format, so it has weights to cache), where it executes the teacher's code.
    from segment_anything.modeling import Sam

    from knowsam.models.sam_teacher import build_sam_parts

    torch.save(Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True)).state_dict(), ws / "tiny_sam.pth")
    cached = {**params, "sam": {**params["sam"], "encoder": "cached", "checkpoint": str(ws / "tiny_sam.pth")}}
    (ws / "params-cached.yaml").write_text(yaml.safe_dump(cached, sort_keys=False))
    calls = {
        "acquire": [[dataset]],
        "prepare": [[dataset]],
        "embed": [[dataset], [dataset, "--params", "params-cached.yaml"]],
        "split": [[dataset, "--ratio", ratio, "--seed", seed]],
        # The train stage is one template for every method: its deps must cover the union.
        "train": [
            [dataset, "--method", m, "--ratio", ratio, "--seed", seed, "--restart-stale"] for m in params["methods"]
        ],
        "evaluate": [[dataset, "--ratio", ratio, "--seed", seed]],
        "leaderboard": [[]],
    }
    result = {}
    for stage, arg_lists in calls.items():
        files: set[str] = set()
        for i, args in enumerate(arg_lists):
            files |= _run_traced(ws, f"stages/{stage}.py", args, ws / f"{stage}-{i}.json")
        result[stage] = files
    return result


def _code_deps() -> dict[str, list[str]]:
    """Stage name -> the code it runs according to the table."""
    return {name: list(pipeline.stage_code(name)) for name in pipeline.STAGES}


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """Files not equal to, nor inside, any dep path."""
    return sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


def test_every_stage_lists_the_code_it_executes(executed):
    deps = _code_deps()
    assert set(executed) == set(deps)
    for stage, files in executed.items():
        assert f"stages/{stage}.py" in deps[stage], f"{stage}: its own script is not a dep"
        assert len(files) > 3, f"{stage}: tracing found almost no modules ({files}); the tracer is broken"
        missing = uncovered(files, deps[stage])
        assert not missing, f"stage '{stage}' executes modules that knowsam/pipeline.py does not list: {missing}"


def test_removing_any_code_dep_is_detected(executed):
    """No dep is decoration: dropping any one of them leaves an executed module uncovered."""
    for stage, deps in _code_deps().items():
        files = executed[stage] | {f"stages/{stage}.py"}
        for dep in deps:
            rest = [d for d in deps if d != dep]
            assert uncovered(files, rest), f"stage '{stage}': '{dep}' (knowsam/pipeline.py) covers no executed module"


def test_training_and_evaluation_code_is_where_the_issue_found_it(executed):
    """The modules whose edits once left results marked up to date are now measured as executed."""
    for f in (
        "knowsam/losses.py",
        "knowsam/data/augment.py",
        "knowsam/data/loader.py",
        "knowsam/config.py",
        "knowsam/runs.py",
        "knowsam/distributed.py",
        "knowsam/models/unet.py",
    ):
        assert f in executed["train"], f
    for f in ("knowsam/metrics.py", "knowsam/evaluate.py"):
        assert f in executed["evaluate"], f


def test_the_committed_dvc_yaml_lists_the_tables_code(capsys):
    assert main(["pipeline", "--check", "--file", str(REPO / "dvc.yaml")]) == 0
    assert capsys.readouterr().out == f"{REPO / 'dvc.yaml'}: code deps of 7 stages agree with knowsam/pipeline.py\n"


def _stage_text(text: str, stage: str) -> tuple[int, int]:
    """Where stage ``stage``'s body lies in dvc.yaml's text (to its next stage, or the end)."""
    start = text.index(f"\n  {stage}:\n")
    following = [text.index(f"\n  {s}:\n") for s in pipeline.STAGES if text.index(f"\n  {s}:\n") > start]
    return start, min(following, default=len(text))


def _edited(text: str, stage: str, old: str, new: str) -> str:
    start, end = _stage_text(text, stage)
    body = text[start:end]
    assert body.count(old) == 1, (stage, old)
    return text[:start] + body.replace(old, new) + text[end:]


@pytest.mark.parametrize(
    "stage, old, new, named",
    [
        ("train", "knowsam/losses.py, ", "", "missing knowsam/losses.py"),
        (
            "split",
            "knowsam/data/splits.py]",
            "knowsam/data/splits.py, knowsam/bench.py]",
            "not in the table: knowsam/bench.py",
        ),
        (
            "evaluate",
            "knowsam/metrics.py, knowsam/models,",
            "knowsam/models, knowsam/metrics.py,",
            "not in the written order",
        ),
    ],
    ids=["file removed", "file added", "files swapped"],
)
def test_a_hand_edit_of_a_stage_code_fails_the_check_naming_it_and_write_restores_the_file(
    tmp_path, capsys, stage, old, new, named
):
    committed = (REPO / "dvc.yaml").read_bytes()
    dvc_file = tmp_path / "dvc.yaml"
    edited = _edited(committed.decode(), stage, old, new)
    dvc_file.write_text(edited)
    assert main(["pipeline", "--check", "--file", str(dvc_file)]) == 1
    assert dvc_file.read_text() == edited
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    if named.startswith(("missing", "not in the table")):
        assert f"stage '{stage}'" in err and err.count("stage '") == 1, err
    assert main(["pipeline", "--write", "--file", str(dvc_file)]) == 0
    assert dvc_file.read_bytes() == committed
    assert main(["pipeline", "--check", "--file", str(dvc_file)]) == 0


def test_write_keeps_each_stages_data_deps_and_everything_outside_deps(tmp_path):
    """dvc.yaml as written by hand before the table (each dep one a line) comes out as committed."""
    committed = (REPO / "dvc.yaml").read_text()
    stages = yaml.safe_load(committed)["stages"]
    by_hand = committed
    for stage, body in stages.items():
        start, end = _stage_text(by_hand, stage)
        head, _, rest = by_hand[start:end].partition("deps: [")
        indent = " " * (len(head) - len(head.rstrip(" ")))
        listed = "".join(f"\n{indent}  - {d}" for d in body.get("do", body)["deps"])
        by_hand = by_hand[:start] + head + "deps:" + listed + rest[rest.index("]") + 1 :] + by_hand[end:]
    assert yaml.safe_load(by_hand) == yaml.safe_load(committed) and by_hand != committed
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(by_hand)
    assert main(["pipeline", "--write", "--file", str(dvc_file)]) == 0
    assert dvc_file.read_text() == committed


def test_write_keeps_a_comment_inside_deps_by_refusing_and_pipeline_takes_one_mode(tmp_path, capsys):
    committed = (REPO / "dvc.yaml").read_text()
    dvc_file = tmp_path / "dvc.yaml"
    commented = _edited(
        committed, "split", "\n      stages/split.py,", "\n      # the splitter\n      stages/split.py,"
    )
    dvc_file.write_text(commented)
    assert main(["pipeline", "--write", "--file", str(dvc_file)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {dvc_file}: stage 'split' has a comment inside its deps, which writing them would drop; move it above `deps:`\n"
    )
    assert dvc_file.read_text() == commented
    for flags in ([], ["--write", "--check"]):
        assert main(["pipeline", *flags, "--file", str(dvc_file)]) == 2
        assert capsys.readouterr().err == "error: give one of --write and --check\n"


def test_stage_started_by_a_python_without_the_harness_reruns_in_the_repository_environment(tmp_path):
    """`.venv/bin/dvc repro` without an activated environment runs stages with the system's python."""
    entry = REPO / "stages" / "_entry.py"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bare = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([bare, "-c", "import knowsam"], env=env, cwd=tmp_path, capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare} imports knowsam itself: no interpreter without the harness to start from")
    if (REPO / ".venv" / "bin" / "python").is_file():
        proc = subprocess.run([bare, str(REPO / "stages/split.py"), "--help"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and "--ratio" in proc.stdout, proc.stderr
    # Without a repository environment to fall back on: one line saying what to do.
    (tmp_path / "stages").mkdir()
    for name in ("_entry.py", "split.py"):
        (tmp_path / "stages" / name).write_text((entry.parent / name).read_text())
    proc = subprocess.run([bare, str(tmp_path / "stages/split.py")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot import 'knowsam': activate the environment knowsam-bench is installed in" in proc.stderr

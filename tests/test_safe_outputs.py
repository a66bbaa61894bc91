"""Outputs never destroy what they did not write: `publish`, `leaderboard --out`, `bench --out`,
`score --out`, `prepare` and `profile`, driven through the real command line. Every refusal is one
line naming the path, and leaves the folder as it was, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from knowsam import config, fileio
from tests.conftest import REPO
from tests.test_catalogue import cli, one_line, params_dict, small_raw, tree, write_params  # noqa: F401 (fixtures)
from tests.test_compare import workspace  # noqa: F401 (a fixture: evaluated runs of ucmt, mt, knowsam)

PUBLISH = ("--compare", "ucmt,knowsam")


@pytest.fixture
def ws(workspace, tmp_path) -> Path:  # noqa: F811
    """A workspace of its own: params.yaml and the evaluated runs under data/eval."""
    root, params, _ = workspace
    ws = tmp_path / "ws"
    shutil.copytree(root / "data", ws / "data")
    (ws / "params.yaml").write_text(yaml.safe_dump(config.to_dict(params)))
    return ws


def files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- publish ------------------------------------------------------------------------------------


def test_publish_refuses_a_folder_it_did_not_write(ws, cli):
    out = ws / "reports/published/cpu"
    out.mkdir(parents=True)
    (out / "analysis.md").write_text("written by hand")
    (out / "figures").mkdir()
    (out / "figures/plot.png").write_bytes(b"\x89PNG not ours")
    before = tree(ws)
    one_line(
        *cli(ws, "publish", "reports/published/cpu", *PUBLISH),
        1,
        r"^error: reports/published/cpu: holds analysis.md, not written by knowsam-bench publish; give a new "
        r"folder, or move that away first$",
    )
    assert tree(ws) == before


def test_publish_replaces_its_own_earlier_publication(ws, cli):
    out = ws / "reports/published/cpu"
    assert cli(ws, "publish", "reports/published/cpu", *PUBLISH, "--wall-seconds", "60")[0] == 0
    first = tree(out)
    assert "wall time 60 s (1 min 00 s)" in (out / "README.md").read_text()
    assert cli(ws, "publish", "reports/published/cpu", "--compare", "ucmt,mt", "--wall-seconds", "125")[0] == 0
    assert "wall time 125 s (2 min 05 s)" in (out / "README.md").read_text()
    assert "`knowsam-bench compare --methods ucmt,mt`" in (out / "README.md").read_text()
    assert tree(out)["compare.json"] != first["compare.json"]
    assert files_below(out) == sorted(first)
    # Nothing of the old folder or of the new one's assembly is left beside it.
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu"]


def test_publish_refuses_its_publication_once_a_file_was_edited_or_added(ws, cli):
    out = ws / "reports/published/cpu"
    assert cli(ws, "publish", "reports/published/cpu", *PUBLISH)[0] == 0
    with open(out / "README.md", "a") as fh:
        fh.write("A note by hand.\n")
    before = tree(ws)
    one_line(
        *cli(ws, "publish", "reports/published/cpu", *PUBLISH),
        1,
        r"^error: reports/published/cpu: holds README.md, changed since knowsam-bench publish wrote it; ",
    )
    assert tree(ws) == before
    (out / "README.md").write_bytes(before["reports/published/cpu/README.md"][: -len(b"A note by hand.\n")])
    (out / "analysis.md").write_text("the reading of these numbers")
    before = tree(ws)
    one_line(
        *cli(ws, "publish", "reports/published/cpu", *PUBLISH),
        1,
        r"^error: reports/published/cpu: holds analysis.md, not written by knowsam-bench publish; ",
    )
    assert tree(ws) == before


@pytest.mark.parametrize(
    "target, pattern",
    [
        (".", r"^error: \.: is the workspace \S+/ws; give a new folder$"),
        ("<workspace>", r"^error: \S+/ws: is the workspace \S+/ws; give a new folder$"),
        ("..", r"^error: \.\.: holds the workspace \S+/ws; give a new folder$"),
        ("data", r"^error: data: holds data/eval, which knowsam-bench publish reads; give a new folder$"),
        ("data/eval/polyp", r"^error: data/eval/polyp: lies inside data/eval, which knowsam-bench publish reads; "),
        ("reports", r"^error: reports: holds leaderboard.md, not written by knowsam-bench publish; "),
        (
            "reports/leaderboard.md",
            r"^error: reports/leaderboard.md: a file, not a folder; knowsam-bench publish "
            r"writes a folder of its own$",
        ),
        ("repo", r"^error: repo: holds a Git repository \(.git\); give a new folder$"),
    ],
)
def test_publish_refuses_the_workspace_its_inputs_a_file_and_a_repository(ws, cli, target, pattern):
    (ws / "reports/metrics/polyp").mkdir(parents=True)
    (ws / "reports/metrics/polyp/ratio-0.1_seed-0.json").write_text("{}\n")
    (ws / "reports/leaderboard.md").write_text("# Leaderboard\n")
    (ws / "repo/.git").mkdir(parents=True)
    (ws / "repo/.git/HEAD").write_text("ref: refs/heads/main\n")
    before = tree(ws.parent)
    target = str(ws) if target == "<workspace>" else target
    one_line(*cli(ws, "publish", target, *PUBLISH, "--params", str(ws / "params.yaml")), 1, pattern)
    assert tree(ws.parent) == before


def test_a_failed_replacement_leaves_the_previous_publication(tmp_path, monkeypatch):
    out = tmp_path / "pub"
    with fileio.atomic_dir(out, writer="w") as tmp:
        (tmp / "a.txt").write_text("first")
    before = tree(out)
    with pytest.raises(RuntimeError, match="stopped half-way"):
        with fileio.atomic_dir(out, writer="w") as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("stopped half-way")
    # The final rename fails: the previous folder is put back.
    real_replace, refused = os.replace, []

    def failing_replace(source, target):
        if Path(source).is_dir() and str(source).endswith(".tmp"):  # the new folder, not a file in it
            refused.append(source)
            raise OSError("rename failed")
        return real_replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        with fileio.atomic_dir(out, writer="w") as tmp:
            (tmp / "a.txt").write_text("third")
    assert len(refused) == 1
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub"]


# --- leaderboard --out, bench --out ----------------------------------------------------------------


def test_leaderboard_replaces_only_what_it_wrote(ws, cli):
    assert cli(ws, "leaderboard")[0] == 0
    record = json.loads((ws / "reports/.knowsam-output").read_text())["files"]
    assert sorted(record) == files_below(ws / "reports")[1:]  # every file but the record itself
    assert {"figures/leaderboard.png", "leaderboard.csv", "leaderboard.md"} <= set(record)
    assert cli(ws, "leaderboard")[0] == 0  # its own files, unchanged since: replaced
    (ws / "reports/leaderboard.md").write_text("# Leaderboard, annotated by hand\n")
    before = tree(ws)
    one_line(
        *cli(ws, "leaderboard"),
        1,
        r"^error: reports/leaderboard.md: changed since knowsam-bench leaderboard wrote it; move it away or "
        r"write elsewhere$",
    )
    assert tree(ws) == before


@pytest.mark.parametrize(
    "target, pattern",
    [
        (".", r"^error: \.: is the workspace \S+; give a new folder$"),
        ("data", r"^error: data: holds data/eval, which knowsam-bench leaderboard reads; give a new folder$"),
        (
            "params.yaml",
            r"^error: params.yaml: a file, not a folder; knowsam-bench leaderboard writes a folder of its own$",
        ),
        (
            "mine",
            r"^error: mine/leaderboard.md: not written by knowsam-bench leaderboard; move it away or write elsewhere$",
        ),
        (
            "reports/published/cpu",
            r"^error: reports/published/cpu/leaderboard.md: written by knowsam-bench publish, "
            r"not by knowsam-bench leaderboard; ",
        ),
    ],
)
def test_leaderboard_out_refuses_what_is_not_its_own(ws, cli, target, pattern):
    (ws / "mine").mkdir()
    (ws / "mine/leaderboard.md").write_text("my own table\n")
    assert cli(ws, "publish", "reports/published/cpu", *PUBLISH)[0] == 0
    before = tree(ws)
    one_line(*cli(ws, "leaderboard", "--out", target, "--params", "params.yaml"), 1, pattern)
    assert tree(ws) == before


def test_bench_out_refuses_a_file_it_did_not_write_before_measuring(tmp_path, cli):
    write_params(tmp_path, params_dict())
    before = tree(tmp_path)
    one_line(
        *cli(tmp_path, "bench", "--quick", "--out", "params.yaml"),
        1,
        r"^error: params.yaml: not written by knowsam-bench bench; move it away or write elsewhere$",
    )
    (tmp_path / "reports").mkdir()
    one_line(
        *cli(tmp_path, "bench", "--quick", "--out", "reports"),
        1,
        r"^error: reports: --out names a folder; give the path of the Markdown report to write$",
    )
    assert tree(tmp_path) == before


# --- score --out ------------------------------------------------------------------------------------


@pytest.fixture
def score_folders(tmp_path) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder in (pred, gt):
        folder.mkdir()
    for stem in ("a", "b"):
        mask = np.zeros((20, 30), np.uint8)
        mask[4:12, 5:20] = 255
        Image.fromarray(mask).save(gt / f"{stem}.png")
        Image.fromarray(np.roll(mask, 2, axis=1)).save(pred / f"{stem}.png")
    return pred, gt


@pytest.mark.parametrize(
    "out, pattern",
    [
        ("gt/a.png", r"^error: gt/a.png: lies inside gt, which knowsam-bench score reads; write elsewhere$"),
        ("gt/scores.csv", r"^error: gt/scores.csv: lies inside gt, which knowsam-bench score reads; write elsewhere$"),
        ("pred/b.png", r"^error: pred/b.png: lies inside pred, which knowsam-bench score reads; write elsewhere$"),
        ("notes.csv", r"^error: notes.csv: not written by knowsam-bench score; move it away or write elsewhere$"),
    ],
)
def test_score_out_never_overwrites_an_input_or_a_foreign_file(score_folders, tmp_path, cli, out, pattern):
    (tmp_path / "notes.csv").write_text("my own notes\n")
    before = tree(tmp_path)
    one_line(*cli(tmp_path, "score", "pred", "gt", "--out", out), 1, pattern)
    assert tree(tmp_path) == before


def test_score_out_replaces_its_own_csv(score_folders, tmp_path, cli):
    assert cli(tmp_path, "score", "pred", "gt", "--out", "scores.csv")[0] == 0
    first = (tmp_path / "scores.csv").read_text()
    assert cli(tmp_path, "score", "pred", "gt", "--out", "scores.csv", "--threshold", "0.9")[0] == 0
    assert (tmp_path / "scores.csv").read_text() == first  # binary masks: the same values, rewritten
    record = json.loads((tmp_path / ".knowsam-output").read_text())["files"]
    assert record["scores.csv"]["written_by"] == "knowsam-bench score"


# --- prepare ------------------------------------------------------------------------------------------


def test_prepare_replaces_only_a_folder_it_prepared(tmp_path, cli, small_raw):
    ws = tmp_path / "ws"
    shutil.copytree(small_raw, ws / "data/raw/demo")
    write_params(ws, params_dict())
    assert cli(ws, "prepare", "demo")[0] == 0
    assert cli(ws, "prepare", "demo")[0] == 0
    (ws / "data/prepared/demo/my_notes.txt").write_text("mine")
    before = tree(ws)
    one_line(
        *cli(ws, "prepare", "demo"),
        1,
        r"^error: data/prepared/demo: holds my_notes.txt, not written by knowsam-bench prepare; ",
    )
    assert tree(ws) == before
    # prepared_root pointed at the raw data: refused, the raw data kept.
    (ws / "data/prepared/demo/my_notes.txt").unlink()
    write_params(ws, params_dict(prepared_root="data/raw"))
    before = tree(ws)
    one_line(
        *cli(ws, "prepare", "demo"), 1, r"^error: data/raw/demo: holds \S+, not written by knowsam-bench prepare; "
    )
    assert tree(ws) == before


# --- profile --------------------------------------------------------------------------------------------


def test_profile_keeps_every_edited_params_file(tmp_path, monkeypatch, capsys):
    from knowsam.cli import main

    def profile(name: str) -> str:
        capsys.readouterr()
        assert main(["profile", name]) == 0
        return capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    demo = (REPO / "knowsam/profiles/demo.yaml").read_text()
    first, second = demo.replace("iterations: 80", "iterations: 81"), demo.replace("iterations: 80", "iterations: 82")
    (tmp_path / "params.yaml.bak.1").write_text("a backup kept by someone else\n")
    write_params(tmp_path, first)
    assert "params.yaml: differs from every profile; kept as params.yaml.bak.2" in profile("cpu")
    write_params(tmp_path, second)
    assert "params.yaml: differs from every profile; kept as params.yaml.bak.3" in profile("demo")
    write_params(tmp_path, first)
    assert "params.yaml: differs from every profile; already kept as params.yaml.bak.2" in profile("demo")
    assert (tmp_path / "params.yaml.bak.1").read_text() == "a backup kept by someone else\n"
    assert (tmp_path / "params.yaml.bak.2").read_text() == first
    assert (tmp_path / "params.yaml.bak.3").read_text() == second
    assert (tmp_path / "params.yaml").read_text() == demo
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "params.yaml",
        "params.yaml.bak.1",
        "params.yaml.bak.2",
        "params.yaml.bak.3",
    ]

"""``compare``: means over seeds, differences, the paired Wilcoxon test, formats and missing runs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from knowsam import config
from knowsam.errors import KnowsamError
from knowsam.report.compare import compare, compare_command, holm, paired_seeds, paired_wilcoxon, parse_methods
from knowsam.runs import RunId
from tests.test_leaderboard import case_rows, make_params, write_run

SEEDS = (0, 1, 2)
N_CASES = {"Kvasir": 12, "CVC-ClinicDB": 9}


def fabricated_dice() -> dict[tuple[str, str, int], np.ndarray]:
    """(method, test set, seed) -> per-case Dice; mt equals ucmt case by case (all-zero differences)."""
    rng = np.random.default_rng(7)
    dice = {}
    for test_set, n in N_CASES.items():
        for seed in SEEDS:
            ucmt = rng.uniform(0.5, 0.9, n)
            dice["ucmt", test_set, seed] = ucmt
            dice["mt", test_set, seed] = ucmt.copy()
            dice["knowsam", test_set, seed] = np.clip(ucmt + rng.normal(0.03, 0.05, n), 0, 1)
    return dice


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, config.Params, dict]:
    """ucmt, mt, knowsam evaluated for 3 seeds at 10%; cps in the params but never evaluated."""
    root = tmp_path_factory.mktemp("cmp")
    params = make_params(root, "polyp", ["ucmt", "mt", "knowsam", "cps"], [0.1], list(SEEDS))
    dice = fabricated_dice()
    for method in ("ucmt", "mt", "knowsam"):
        for seed in SEEDS:
            rows = [r for t in N_CASES for r in case_rows(t, list(dice[method, t, seed]))]
            write_run(root, RunId(method, "polyp", 0.1, seed), rows, params=params)
    return root, params, dice


def seed_mean(dice: dict, method: str, test_set: str) -> tuple[float, float]:
    per_seed = [100 * dice[method, test_set, s].mean() for s in SEEDS]
    return float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))


def test_means_differences_and_wilcoxon(workspace) -> None:
    root, params, dice = workspace
    result = compare(params, ["ucmt", "knowsam"], eval_root=root / "data/eval")
    rows = {(r.test_set, r.method): r for r in result.rows}
    assert [(r.test_set, r.method) for r in result.rows] == [
        ("Kvasir", "ucmt"),
        ("Kvasir", "knowsam"),
        ("CVC-ClinicDB", "ucmt"),
        ("CVC-ClinicDB", "knowsam"),
    ]
    for test_set, n in N_CASES.items():
        base_mean, base_std = seed_mean(dice, "ucmt", test_set)
        mean, std = seed_mean(dice, "knowsam", test_set)
        base, row = rows[test_set, "ucmt"], rows[test_set, "knowsam"]
        assert (base.mean, base.std) == (pytest.approx(base_mean), pytest.approx(base_std))
        assert (base.n_seeds, base.n_cases) == (3, n)
        assert (base.diff, base.p_value) == (None, None)
        assert (row.mean, row.std) == (pytest.approx(mean), pytest.approx(std))
        assert row.diff == pytest.approx(mean - base_mean)
        # Independent: average each case over seeds, pair by case, scipy on the raw arrays.
        ours = np.mean([dice["knowsam", test_set, s] for s in SEEDS], axis=0)
        theirs = np.mean([dice["ucmt", test_set, s] for s in SEEDS], axis=0)
        assert row.p_value == pytest.approx(scipy.stats.wilcoxon(ours, theirs).pvalue, rel=1e-9)
        assert 0.0 < row.p_value < 1.0
        # Over seeds: each seed's test-set mean, paired by seed.
        per_seed = {m: [100 * dice[m, test_set, s].mean() for s in SEEDS] for m in ("knowsam", "ucmt")}
        assert row.p_seeds == pytest.approx(scipy.stats.ttest_rel(per_seed["knowsam"], per_seed["ucmt"]).pvalue)
        assert base.p_seeds is None and base.p_holm is None
    # Holm over the two tested rows: the smaller p doubled, the larger kept (monotone), at most 1.
    small, large = sorted(rows[t, "knowsam"].p_value for t in N_CASES)
    assert sorted(rows[t, "knowsam"].p_holm for t in N_CASES) == [
        pytest.approx(min(1.0, 2 * small)),
        pytest.approx(max(min(1.0, 2 * small), large)),
    ]
    assert rows["Kvasir", "knowsam"].paper == 86.64
    assert rows["CVC-ClinicDB", "knowsam"].paper == 82.54
    assert rows["Kvasir", "ucmt"].paper is None


def test_holm_step_down_by_hand() -> None:
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == []


def test_seed_test_needs_three_common_seeds() -> None:
    base = pd.Series([60.0, 62.0, 61.0], index=[0, 1, 2])
    assert paired_seeds(base, pd.Series([65.0, 66.0], index=[0, 1])) is None
    assert paired_seeds(base, base.copy()) == 1.0
    assert paired_seeds(base, base + 4.0) == 0.0  # the same gain on every seed: t is infinite
    other = pd.Series([64.0, 63.5, 66.0, 70.0], index=[0, 1, 2, 3])  # seed 3 has no partner
    assert paired_seeds(base, other) == pytest.approx(scipy.stats.ttest_rel([64.0, 63.5, 66.0], base).pvalue)


def test_identical_scores_give_p_one(workspace) -> None:
    root, params, _ = workspace
    result = compare(params, ["ucmt", "mt"], "polyp", 0.1, root / "data/eval")
    mt = [r for r in result.rows if r.method == "mt"]
    assert [(r.diff, r.p_value) for r in mt] == [(0.0, 1.0), (0.0, 1.0)]


def test_paired_wilcoxon_requires_same_cases() -> None:
    a = pd.Series([0.5, 0.6, 0.7], index=["c1", "c2", "c3"])
    b = pd.Series([0.6, 0.5, 0.9], index=["c3", "c2", "c1"])  # paired by case, not by position
    assert paired_wilcoxon(a, b, "x") == pytest.approx(scipy.stats.wilcoxon([0.9, 0.5, 0.6], [0.5, 0.6, 0.7]).pvalue)
    with pytest.raises(KnowsamError, match="different cases"):
        paired_wilcoxon(a, b.rename({"c1": "c9"}), "Kvasir: knowsam vs ucmt")


def test_missing_runs_name_stages_and_command(workspace) -> None:
    root, params, _ = workspace
    with pytest.raises(KnowsamError) as err:
        compare(params, ["ucmt", "cps"], eval_root=root / "data/eval")
    runs = ", ".join(f"cps-polyp-0.1-{s} (not trained)" for s in SEEDS)
    stages = " ".join(f"evaluate@polyp-0.1-{s}" for s in SEEDS)
    assert err.value.exit_code == 1
    assert str(err.value) == (
        f"runs not evaluated under the current params and code: {runs}; produce them with `dvc repro {stages}`"
    )


@pytest.mark.parametrize(
    "methods, dataset, ratio, message",
    [
        (["ucmt"], None, None, "two or more"),
        (["ucmt", "ucmt"], None, None, "two or more"),
        (["ucmt", "unet"], None, None, "'unet' is not in params 'methods'"),
        (["ucmt", "mt"], "acdc", None, "'acdc' is not in params 'datasets'"),
        (["ucmt", "mt"], None, 0.3, "ratio 0.3 is not in params 'ratios'"),
    ],
)
def test_bad_selection_is_usage_error(workspace, methods, dataset, ratio, message) -> None:
    _, params, _ = workspace
    with pytest.raises(KnowsamError, match=message) as err:
        compare(params, methods, dataset, ratio)
    assert err.value.exit_code == 2


@pytest.fixture
def in_workspace(workspace, monkeypatch) -> tuple[Path, dict]:
    """cwd = the workspace with a params.yaml, as the CLI runs."""
    root, params, dice = workspace
    (root / "params.yaml").write_text(yaml.safe_dump(config.to_dict(params)))
    monkeypatch.chdir(root)
    monkeypatch.setenv("COLUMNS", "200")
    return root, dice


def test_json_format(in_workspace, capsys) -> None:
    _, dice = in_workspace
    assert compare_command("params.yaml", "ucmt,knowsam", None, None, "json") == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["metric"], out["unit"], out["baseline"]) == ("mDice", "percent", "ucmt")
    assert out["methods"] == ["ucmt", "knowsam"]
    assert "averaged over its seeds" in out["pairing"]
    knowsam = out["rows"][1]
    assert (knowsam["dataset"], knowsam["ratio"], knowsam["test_set"], knowsam["method"], knowsam["n_seeds"]) == (
        "polyp",
        0.1,
        "Kvasir",
        "knowsam",
        3,
    )
    assert knowsam["mean"] == pytest.approx(seed_mean(dice, "knowsam", "Kvasir")[0])
    assert out["rows"][0]["p_value"] is None and out["rows"][0]["std"] > 0


def test_markdown_format(in_workspace, capsys) -> None:
    _, dice = in_workspace
    assert compare_command("params.yaml", ["ucmt", "mt,knowsam"], "polyp", 0.1, "md") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "### polyp, 10% labeled"
    table = [line for line in lines if line.startswith("|")]
    cells = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in table]
    assert cells[0] == [
        "Test set",
        "Method",
        "mDice % (mean ± std over seeds)",
        "Seeds",
        "Δ vs ucmt (pp)",
        "Wilcoxon p (cases)",
        "Holm p",
        "t-test p (seeds)",
        "Paper",
    ]
    assert all(len(row) == 9 for row in cells)
    mean, std = seed_mean(dice, "ucmt", "Kvasir")
    assert cells[2] == ["Kvasir", "ucmt", f"{mean:.2f} ± {std:.2f}", "3", "-", "-", "-", "-", "-"]
    assert cells[3][:2] == ["Kvasir", "mt"] and cells[3][4:8] == ["+0.00", "1 (n=12)", "1", "1"]
    assert cells[4][:2] == ["Kvasir", "knowsam"] and cells[4][8] == "86.64"
    assert lines[-1].startswith("Pairing: per case")


def test_table_format_and_bad_format(in_workspace, capsys) -> None:
    assert compare_command("params.yaml", "ucmt,knowsam", None, None, "table") == 0
    out = capsys.readouterr().out
    assert "polyp, 10% labeled" in out and "knowsam" in out and "Δ pp: difference to ucmt" in out
    # Piped output gets 80 columns: no line longer, no name cut short.
    assert max(len(line) for line in out.splitlines()) <= 80 and "…" not in out
    assert re.search(r"Kvasir\s+knowsam\s+[\d.]+ ± [\d.]+\s+3\s+[+-][\d.]+\s+[\d.]+ \(n=12\)\s+86\.64", out)
    with pytest.raises(KnowsamError, match="unknown format 'csv'") as err:
        compare_command("params.yaml", "ucmt,knowsam", None, None, "csv")
    assert err.value.exit_code == 2


def test_another_metric_by_its_summary_name(workspace) -> None:
    """HD95 (a distance: no percent, lower is better) from the summaries and the per-case files."""
    root, params, dice = workspace
    result = compare(params, ["ucmt", "knowsam"], eval_root=root / "data/eval", metric_name="HD95")
    hd95 = {key: 20.0 * (1.0 - values) for key, values in dice.items()}  # what case_rows writes
    for test_set in N_CASES:
        base, row = (r for r in result.rows if r.test_set == test_set)
        seeds = {m: [hd95[m, test_set, s].mean() for s in SEEDS] for m in ("ucmt", "knowsam")}
        assert row.mean == pytest.approx(np.mean(seeds["knowsam"]))
        assert row.std == pytest.approx(np.std(seeds["knowsam"], ddof=1))
        assert row.diff == pytest.approx(np.mean(seeds["knowsam"]) - np.mean(seeds["ucmt"]))
        ours = np.mean([hd95["knowsam", test_set, s] for s in SEEDS], axis=0)
        theirs = np.mean([hd95["ucmt", test_set, s] for s in SEEDS], axis=0)
        assert row.p_value == pytest.approx(scipy.stats.wilcoxon(ours, theirs).pvalue, rel=1e-9)
        assert (base.paper, row.paper) == (None, None)  # the paper's numbers are Dice only
    saved = result.to_dict()
    assert (saved["metric"], saved["unit"]) == ("HD95", "distance") and "HD95 averaged" in saved["pairing"]


def test_metric_option_headers_and_unknown_names(in_workspace, capsys) -> None:
    from knowsam.cli import main

    assert main(["compare", "--methods", "ucmt,knowsam", "--format", "md", "--metric", "ASD"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "| Test set | Method | ASD (mean ± std over seeds) | Seeds | Δ vs ucmt | Wilcoxon p (cases) | Holm p | "
        "t-test p (seeds) | Paper |"
    )
    assert lines[-1].endswith(
        "ASD = mean of per-image (per-volume) ASD (mean distance from the predicted to the ground-truth surface). "
        "Lower is better."
    )
    assert main(["compare", "--methods", "ucmt,knowsam", "--metric", "mIoU"]) == 0
    out = capsys.readouterr().out
    assert "mIoU %" in out and "Δ pp" in out and "lower is better" not in out
    assert main(["compare", "--methods", "ucmt,knowsam", "--metric", "dice"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: unknown metric 'dice'; choose one of mDice, mIoU, HD95, ASD, assd, hd, hd_x095_paper, precision, "
        "recall\n"
    )


def test_parse_methods() -> None:
    assert parse_methods("ucmt, knowsam") == ["ucmt", "knowsam"]
    assert parse_methods(["ucmt", "mt,knowsam", ""]) == ["ucmt", "mt", "knowsam"]


def test_publish_freezes_leaderboard_comparison_params_and_versions(workspace, tmp_path) -> None:
    from knowsam.report.publish import publish

    root, params, dice = workspace
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(config.to_dict(params)))
    out = tmp_path / "published/cpu"
    (out.parent).mkdir()
    publish(
        params_file, out, ["ucmt", "knowsam"], wall_seconds=3725.4, command="dvc repro", eval_root=root / "data/eval"
    )
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        ".knowsam-output",
        "README.md",
        "compare.json",
        "compare.md",
        "figures/leaderboard.png",
        "leaderboard.csv",
        "leaderboard.md",
        "params.yaml",
        "versions.json",
    ]
    # The record vouches for every other file, so that a later publish may replace exactly these.
    record = json.loads((out / ".knowsam-output").read_text())["files"]
    assert sorted(record) == names[1:]
    assert {entry["written_by"] for entry in record.values()} == {"knowsam-bench publish"}
    assert record["params.yaml"]["sha256"] == hashlib.sha256(params_file.read_bytes()).hexdigest()
    assert (out / "params.yaml").read_bytes() == params_file.read_bytes()
    versions = json.loads((out / "versions.json").read_text())
    assert versions["packages"]["torch"].startswith("2.") and int(versions["machine"]["cores"]) >= 1
    # The comparison equals the one `compare` makes from the same runs.
    saved = json.loads((out / "compare.json").read_text())
    fresh = compare(params, ["ucmt", "knowsam"], eval_root=root / "data/eval")
    assert saved == json.loads(json.dumps(fresh.to_dict()))
    readme = (out / "README.md").read_text()
    assert "wall time 3725 s (62 min 05 s)" in readme and "`knowsam-bench compare --methods ucmt,knowsam`" in readme
    # The leaderboard lists the missing cps runs rather than hiding them.
    assert "cps" in (out / "leaderboard.md").read_text()
    # A failed publication (a method that is not evaluated) leaves the previous one untouched.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(KnowsamError, match="runs not evaluated under the current params and code"):
        publish(params_file, out, ["ucmt", "cps"], eval_root=root / "data/eval")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

"""benchmarks/knowsam_study.py: the stability verdict and the loss-term windows of KnowSAM study arms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def study():
    with benchmark_script("knowsam_study") as module:
        yield module


def write_arm(root: Path, fused: list[float], mixed: float, publication: bool = False) -> Path:
    """A knowsam run of 400 iterations validated every 50 (``fused``: the 8 validation Dice values)."""
    runs = root / "runs" if publication else root
    folder = runs / "polyp" / "ratio-0.1_seed-0" / "knowsam"
    folder.mkdir(parents=True)
    if publication:
        (root / "params.yaml").write_text("profile: cpu\n")
    steps = np.arange(1, 401)
    curves = pd.DataFrame({"step": steps, "unet_sup": 1.0 / steps, "unet_kd": steps / 100.0})
    for column in ("val_dice", "val_dice_unet", "val_dice_vnet", "val_dice_sam"):
        curves[column] = np.nan
        curves.loc[curves.step % 50 == 0, column] = fused
    curves.to_csv(folder / "curves.csv", index=False)
    summary = {
        "config": {"train": {"iterations": 400}, "method_params": {"mixed_iterations": mixed}},
        "test_sets": {"Kvasir": {"mDice": 0.5}},
        "variants": {"sam": {"Kvasir": {"mDice": 0.6}}},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return root


def run(study, capsys, *arms: str) -> str:
    assert study.main([*arms, "--window", "100"]) == 0
    return capsys.readouterr().out


def arm_row(out: str, label: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith(f"| {label} | ") and "(" in line)
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_a_dip_below_half_the_best_after_mixing_fails_and_one_before_it_does_not(study, capsys, tmp_path):
    dips_after = write_arm(tmp_path / "a", [0.1, 0.0, 0.3, 0.4, 0.19, 0.3, 0.35, 0.36], 0.5)  # mixing from 200
    dips_before = write_arm(tmp_path / "b", [0.4, 0.0, 0.05, 0.4, 0.21, 0.3, 0.35, 0.36], 0.5, publication=True)
    out = run(study, capsys, f"after={dips_after}", f"before={dips_before}")
    assert arm_row(out, "after")[1:5] == ["200", "0.400 (200)", "0.190", "no"]
    assert arm_row(out, "before")[1:5] == ["200", "0.400 (50)", "0.210", "yes"]
    assert arm_row(out, "after")[5:] == ["50.00", "60.00"]


def test_a_run_that_never_mixes_has_no_verdict(study, capsys, tmp_path):
    never = write_arm(tmp_path / "n", [0.1] * 8, 1.0)
    assert arm_row(run(study, capsys, f"never={never}"), "never")[1:5] == ["never", "0.100 (50)", "nan", "-"]


def test_terms_are_window_means(study, capsys, tmp_path):
    out = run(study, capsys, f"x={write_arm(tmp_path / 'x', [0.1] * 8, 0.5)}")
    kd = next(line for line in out.splitlines() if line.startswith("| x | unet_kd |"))
    expected = [np.arange(a, a + 100).mean() / 100 for a in (1, 101, 201, 301)]
    assert [float(v) for v in kd.strip("|").split("|")[2:]] == pytest.approx(expected, abs=5e-4)
    assert "| arm | term | 1-100 | 101-200 | 201-300 | 301-400 |" in out


def test_an_unreadable_arm_is_one_line(study, capsys, tmp_path):
    assert study.main([f"gone={tmp_path}"]) == 1
    assert capsys.readouterr().out.startswith(f"error: {tmp_path}: no readable knowsam run")

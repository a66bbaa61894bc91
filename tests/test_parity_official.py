"""The parity check against the official KnowSAM code (``benchmarks/parity_official.py``).

Runs where ``KNOWSAM_OFFICIAL`` names a checkout of https://github.com/taozh2017/KnowSAM
(docs/contributing.md), skipped otherwise. Each run is a process of its own: the script imports the
official code, whose top-level packages (``utils``, ``Model``) would shadow others', and makes
``.cuda()`` a no-op. About 4 minutes for the whole check and 2 for the one with faults, on one CPU
thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

OFFICIAL = os.environ.get("KNOWSAM_OFFICIAL", "")
pytestmark = pytest.mark.skipif(
    not (OFFICIAL and Path(OFFICIAL, "Model", "model.py").is_file()),
    reason="KNOWSAM_OFFICIAL does not name a checkout of the official KnowSAM code "
    "(git clone https://github.com/taozh2017/KnowSAM; see docs/contributing.md)",
)
SCRIPT = REPO / "benchmarks" / "parity_official.py"
# Runs the script's main() after ``fault`` (Python source) has changed our side.
DRIVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("parity_official", {script!r})
parity = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(parity)
{fault}
sys.exit(parity.main(sys.argv[1:]))
"""
# Two faults on our side only, each invisible to one kind of comparison:
# the U-Net's logits enter the fusion module detached: every output and loss value is unchanged,
# but L_F and L_F,mix no longer reach the U-Net; and the networks' SGD momentum is 0.8, not 0.9:
# every gradient is unchanged, and a first step (no momentum buffer yet) is too.
FAULTS = """
from knowsam.methods import base
from knowsam.methods.knowsam import KnowSam
KnowSam._fuse = lambda self, u, v: self.nets["fusion"](u.detach(), v).float()
sgd = base.Method.sgd
def wrong_momentum(self, name, params):
    sgd(self, name, params)
    self.optimizers[name].param_groups[0]["momentum"] = 0.8
base.Method.sgd = wrong_momentum
"""
LAST_LINE = re.compile(
    r"parity: (\d+)/(\d+) \(outputs (\d+)/(\d+), terms (\d+)/(\d+), gradients (\d+)/(\d+), "
    r"updates (\d+)/(\d+)\) in (\d+) configurations?"
)


def run_parity(fault: str, *configs: str) -> subprocess.CompletedProcess:
    code = DRIVER.format(script=str(SCRIPT), fault=fault)
    args = ["--official", OFFICIAL, *(["--configs", *configs] if configs else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )


def last_counts(out: str) -> list[int]:
    match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
    assert match, out[-2000:]
    return [int(n) for n in match.groups()]


def test_ours_matches_the_official_code_in_both_configurations():
    done = run_parity("")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    n = last_counts(done.stdout)
    assert n[0] == n[1] and n[2:10:2] == n[3:10:2] and n[10] == 2, done.stdout.splitlines()[-1]
    assert min(n[3], n[5], n[7], n[9]) > 0
    assert "FAILED" not in done.stdout


@pytest.fixture(scope="module")
def with_faults() -> str:
    done = run_parity(FAULTS, "2")
    assert done.returncode == 1 and LAST_LINE.search(done.stdout), done.stdout[-5000:] + done.stderr[-3000:]
    return done.stdout


def _failed_groups(out: str) -> set[str]:
    """The group of each failure named before the last line (``FAILED <config>: <group>: <tensor> ...``)."""
    return {line.split(": ")[1] for line in out.splitlines() if line.startswith("FAILED ")}


def test_a_detached_fusion_input_fails_the_u_net_gradients_only(with_faults: str):
    n = last_counts(with_faults)
    assert n[2:6] == [n[3], n[3], n[5], n[5]]  # every output and loss term still agrees
    groups = _failed_groups(with_faults)
    gradient_failures = {g for g in groups if ", gradients, " in g}
    assert gradient_failures == {f"iteration {t}, gradients, U-Net" for t in range(3)}
    assert re.search(
        r"^FAILED 2 classes: iteration 0, gradients, U-Net: unet\.\S+ \(relative difference", with_faults, re.M
    )


def test_a_wrong_momentum_fails_the_network_updates_after_the_first_step(with_faults: str):
    groups = _failed_groups(with_faults)
    update_failures = {g for g in groups if ", updates" in g}
    assert update_failures == {
        f"iteration {t}, updates (official rule, our gradient), {net}"
        for t in (1, 2)
        for net in ("U-Net", "V-Net", "fusion")
    }

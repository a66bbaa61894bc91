"""Dependencies: pyproject.toml declares ranges, constraints.txt the tested versions; they agree.

The README's commands and CI install with ``-c constraints.txt``: a constraint outside a declared
range would make pip fail on a clean machine, and a dependency without a constraint would float.
"""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["test"])]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_dependency_is_constrained_within_its_range(requirement):
    pins = constraints()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement.name} has no line in constraints.txt"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement.specifier}"
    )
    assert requirement.specifier, f"{requirement.name} has no version range in pyproject.toml"


def test_readme_and_ci_install_with_the_constraints():
    readme = (REPO / "README.md").read_text()
    installs = re.findall(r"pip install [^\n`&]*-e [^\n`&]*", readme)
    quick_start = [line for line in installs if "slurm" not in line]
    assert len(quick_start) >= 2 and all("-c constraints.txt" in line for line in quick_start), quick_start
    ci = (REPO / ".ci/run").read_text()
    assert ci.count("pip install -q -c constraints.txt -e") == 2

"""The code style is checked with the tests: ruff's lint rules and its formatter (pyproject.toml), and a
length limit on functions."""

from __future__ import annotations

import ast
import shutil
import subprocess

import pytest

from tests.conftest import REPO

RUFF = shutil.which("ruff", path=str(REPO / ".venv" / "bin")) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    done = subprocess.run([RUFF, *command], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


MAX_FUNCTION_LINES = 80


def test_no_function_in_the_package_is_longer_than_80_lines():
    """A function that does not fit on a screen does several jobs; split it (docs/contributing.md)."""
    long = []
    for path in sorted((REPO / "knowsam").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)

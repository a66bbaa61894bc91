"""What every stage script does: run its ``knowsam-bench`` command in the harness's environment.

DVC runs ``python stages/<stage>.py`` with whatever ``python`` comes first on PATH. Started as
``.venv/bin/dvc repro`` without activating the environment, that is a Python without the
harness: such a stage re-runs itself with the repository's ``.venv`` interpreter when there is
one, and otherwise stops with one line saying what to do.
"""

import os
import sys
from pathlib import Path

VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"


def run(command: str) -> None:
    try:
        from knowsam.cli import main
    except ModuleNotFoundError as exc:
        # sys.prefix, not the executable: a venv's python is a link to the very interpreter that failed.
        if VENV_PYTHON.is_file() and Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve():
            os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
        sys.exit(f"error: {sys.executable} cannot import {exc.name!r}: activate the environment knowsam-bench "
                 "is installed in (e.g. `. .venv/bin/activate`) before `dvc repro`")
    sys.exit(main([command, *sys.argv[1:]]))

"""What every stage script does: run its ``knowsam-bench`` command in the harness's environment.

DVC runs ``python stages/<stage>.py`` with whatever ``python`` comes first on PATH. Started as
``.venv/bin/dvc repro`` without activating the environment, that is a Python without the
harness: such a stage re-runs itself with the repository's ``.venv`` interpreter when there is
one, and otherwise stops with one line saying what to do.

The same holds for a Python whose ``knowsam`` is another checkout's (one environment shared by
two checkouts, with an editable install of the first): the stage would run that code while DVC
records this repository's files, so a code edit here would retrain with unchanged code.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPOSITORY / ".venv" / "bin" / "python"


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def die_with_parent() -> None:
    """Get SIGTERM when the process that started this stage (DVC) ends, so a stopped ``dvc repro``
    leaves no orphaned trainer behind to race the next one on the same run folder. Only stages do
    this: a command started by hand (e.g. under nohup) outlives its shell as users expect.
    The setting survives the ``execv`` below; SIGTERM stops training cleanly (``knowsam.train``)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _rerun_in_repository_venv() -> None:
    """Replace this process by the same stage under the repository's ``.venv`` Python, if that is another one."""
    # sys.prefix, not the executable: a venv's python is a link to the very interpreter that failed.
    if VENV_PYTHON.is_file() and Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])


def run(command: str) -> None:
    die_with_parent()
    spec = importlib.util.find_spec("knowsam")  # where it would come from, before importing anything of it
    package = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if package is not None and package != REPOSITORY / "knowsam":
        _rerun_in_repository_venv()
        sys.exit(
            f"error: {Path(sys.argv[0])} runs in {REPOSITORY} but {sys.executable} imports knowsam from "
            f"{package}; install this checkout into its environment (`pip install -e .` from {REPOSITORY})"
        )
    try:
        from knowsam.cli import main
    except ModuleNotFoundError as exc:
        _rerun_in_repository_venv()
        sys.exit(
            f"error: {sys.executable} cannot import {exc.name!r}: activate the environment knowsam-bench "
            "is installed in (e.g. `. .venv/bin/activate`) before `dvc repro`"
        )
    sys.exit(main([command, *sys.argv[1:]]))

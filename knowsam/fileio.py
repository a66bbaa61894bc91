"""Atomic file output: every file the harness writes appears whole or not at all.

Named ``fileio``, not ``io``, so that it never shadows the standard library's module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from knowsam.errors import KnowsamError, is_disk_full


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success.

    The temporary file lives in the same directory so the final ``os.replace`` is
    atomic on POSIX file systems. On any exception the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give outputs the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _out_of_space(exc, target.parent):
            free_mb = shutil.disk_usage(target.parent).free // 2**20
            raise KnowsamError(f"{target}: no space left on device ({free_mb} MB free in {target.parent}); "
                               "free some space and rerun") from exc
        raise


# torch's archive writer reports a full disk as a short write ("unexpected pos ...", chained to an
# iostream error) without errno; below this much free space such a failure is taken for a full disk.
_NEARLY_FULL_BYTES = 64 * 2**20


def _out_of_space(exc: Exception, folder: Path) -> bool:
    if is_disk_full(exc):
        return True
    return "inline_container" in str(exc) and shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces ``path``, on failure it is removed."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Stable JSON (sorted keys, fixed indent) so identical results are identical bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")

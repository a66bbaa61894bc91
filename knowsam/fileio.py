"""Atomic file output: every file the harness writes appears whole or not at all, and replaces
only what the harness wrote itself (each output folder keeps a record of its files).

Named ``fileio``, not ``io``, so that it never shadows the standard library's module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
            raise KnowsamError(
                f"{target}: no space left on device ({free_mb} MB free in {target.parent}); free some space and rerun"
            ) from exc
        raise


# torch's archive writer reports a full disk as a short write ("unexpected pos ...", chained to an
# iostream error) without errno; below this much free space such a failure is taken for a full disk.
_NEARLY_FULL_BYTES = 64 * 2**20


def _out_of_space(exc: Exception, folder: Path) -> bool:
    if is_disk_full(exc):
        return True
    return "inline_container" in str(exc) and shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Stable JSON (sorted keys, fixed indent) so identical results are identical bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_new(path: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` at ``path`` whole, only if nothing is there; False (nothing written) if something is."""
    target = Path(path)
    staged = target.with_name(f".{target.name}.{os.getpid()}.new")
    write_bytes(staged, data)
    try:
        os.link(staged, target)  # unlike a rename, a link never replaces an existing file
    except FileExistsError:
        return False
    finally:
        staged.unlink(missing_ok=True)
    return True


def keep_copy(path: str | os.PathLike, data: bytes) -> tuple[Path, bool]:
    """Keep ``data`` (what ``path`` holds) as the first free ``<path>.bak.<n>``, n = 1, 2, ...; a backup is
    never overwritten. Returns (the backup, True), or (an earlier backup with the same bytes, False)."""
    path = Path(path)
    for earlier in sorted(path.parent.glob(glob.escape(path.name) + ".bak*")):
        if earlier.is_file() and earlier.read_bytes() == data:
            return earlier, False
    n = 1
    while not write_new(path.with_name(f"{path.name}.bak.{n}"), data):
        n += 1
    return path.with_name(f"{path.name}.bak.{n}"), True


# --- outputs that never destroy what they did not write ------------------------------------------

# A folder's record of the files the harness wrote into it: relative path -> the command that
# wrote it and the sha256 it had then. A command replaces a file (or a whole folder) only when
# the record vouches for it, so nothing a person wrote or edited, and nothing another command
# wrote, is ever overwritten.
OUTPUT_RECORD = ".knowsam-output"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record(folder: Path) -> dict[str, dict]:
    """The record of ``folder``: {relative path: {"written_by", "sha256"}}; {} without a readable one."""
    try:
        files = json.loads((folder / OUTPUT_RECORD).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _refusal(path: Path, entry: dict | None, writer: str) -> str | None:
    """Why ``writer`` may not replace the file ``path`` (``entry``: its record), or None when it may."""
    other = entry.get("written_by") if isinstance(entry, dict) else None
    if other != writer:
        return f"written by {other}, not by {writer}" if other else f"not written by {writer}"
    if path.is_symlink() or not path.is_file() or file_sha256(path) != entry.get("sha256"):
        return f"changed since {writer} wrote it"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_inputs(target: Path, inputs: Iterable[str | os.PathLike], writer: str, *, holds: bool) -> None:
    """Refuse a ``target`` that is an input or lies inside one (with ``holds``: or holds one, the
    workspace or a Git repository)."""
    resolved = target.resolve()
    if holds:
        workspace = Path.cwd().resolve()
        if _inside(workspace, resolved):
            where = "is" if resolved == workspace else "holds"
            raise KnowsamError(f"{target}: {where} the workspace {workspace}; give a new folder")
        if (target / ".git").exists():
            raise KnowsamError(f"{target}: holds a Git repository (.git); give a new folder")
    for item in inputs:
        source = Path(item).resolve()
        if _inside(resolved, source):
            where = "is" if resolved == source else "lies inside"
            raise KnowsamError(f"{target}: {where} {item}, which {writer} reads; write elsewhere")
        if holds and _inside(source, resolved):
            raise KnowsamError(f"{target}: holds {item}, which {writer} reads; give a new folder")


def claim_files(
    folder: str | os.PathLike, names: Iterable[str], writer: str, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Refuse, before anything is written, to write ``names`` (paths relative to ``folder``) unless each
    is new or was written there by ``writer`` and is unchanged since; and any that is, or lies inside,
    one of ``inputs``."""
    folder = Path(folder)
    record = _record(folder)
    for name in names:
        path = folder / name
        _check_inputs(path, inputs, writer, holds=False)
        if path.exists() or path.is_symlink():
            reason = _refusal(path, record.get(name), writer)
            if reason:
                raise KnowsamError(f"{path}: {reason}; move it away or write elsewhere")


def record_files(folder: str | os.PathLike, names: Iterable[str], writer: str) -> None:
    """Add ``names`` (written by ``writer``, relative to ``folder``) to ``folder``'s record."""
    folder = Path(folder)
    record = _record(folder)
    record.update({name: {"written_by": writer, "sha256": file_sha256(folder / name)} for name in names})
    write_json(folder / OUTPUT_RECORD, {"files": record})


def check_folder(path: str | os.PathLike, writer: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a folder ``writer`` may not write into: a file, the workspace or a folder holding it,
    a Git repository, one of ``inputs``, or a folder holding or inside one of them."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise KnowsamError(f"{target}: a file, not a folder; {writer} writes a folder of its own")
    _check_inputs(target, inputs, writer, holds=True)


def _foreign_file(target: Path, writer: str) -> str | None:
    """Why ``target`` is not ``writer``'s to replace (a file it did not write, or one changed since), or None."""
    if not target.is_dir():
        return None
    record = _record(target)
    for root, dirs, files in os.walk(target):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # never entered, never replaced
        for name in sorted(files) + links:
            rel = Path(root, name).relative_to(target).as_posix()
            if rel != OUTPUT_RECORD:
                reason = _refusal(Path(root, name), record.get(rel), writer)
                if reason:
                    return f"{target}: holds {rel}, {reason}"
    return None


def check_replaceable(path: str | os.PathLike, writer: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a folder ``writer`` may not replace: one ``check_folder`` refuses, or one holding anything
    but files ``writer`` wrote there and nobody changed since."""
    check_folder(path, writer, inputs)
    reason = _foreign_file(Path(path), writer)
    if reason:
        raise KnowsamError(f"{reason}; give a new folder, or move that away first")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, writer: str, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty sibling folder; on success it replaces ``path``, on failure it is removed.

    ``path`` must be new, empty, or hold only files ``writer`` wrote there and nobody changed
    since (its record says so): ``check_replaceable``, before the body runs. The new folder's
    record lists every file in it, for ``writer``.
    The previous folder is set aside, not deleted, until the new one is in place.
    """
    target = Path(path)
    check_replaceable(target, writer, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; give it what a plain mkdir would
    try:
        yield tmp
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        record_files(tmp, [name for name in written if name != OUTPUT_RECORD], writer)
        swap_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_dir(staging: Path, target: Path) -> None:
    """Rename folder ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted last,
    and put back if the rename fails."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    retired.rmdir()  # os.replace needs the name free (or an empty dir) to move ``target`` there
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on the open file ``fd`` without waiting; False if another holds it.

    The lock belongs to the open file, so the kernel releases it when the holder closes it or dies.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return False
    return True

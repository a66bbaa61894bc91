"""Extract zip and tar archives without trusting their member names.

Policy (dataset archives hold only folders and regular files, so anything else is
refused rather than interpreted):

* absolute names (``/x``, ``C:/x``) and names with a ``..`` component are refused;
  backslashes count as separators, so a Windows-made ``..\\x`` is caught too;
* every link is refused, symbolic or hard, wherever it points: a link inside the
  destination can still be redirected by a later member, and checking targets is
  where extraction bugs live;
* device files, FIFOs and other special members are refused, as are encrypted zip
  members;
* truncated or corrupt archives are detected: zip CRCs are checked on read, a tar must
  end with its end-of-archive block, and a compressed tar is read to the end of its
  stream so the decompressor's own integrity check runs.

Members are written into a hidden temporary folder next to ``dest`` that is renamed
to ``dest`` only when every member is in: a refused or failed archive leaves nothing.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from knowsam.errors import KnowsamError

_CHUNK = 1 << 20
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_DRIVE = re.compile(r"[A-Za-z]:")
_S_IFMT = 0o170000
_S_IFREG, _S_IFDIR, _S_IFLNK = 0o100000, 0o040000, 0o120000
# What a damaged archive raises while being read (gzip/bz2 report bad data as OSError).
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


class _Refused(Exception):
    """A member that will not be extracted; ``str()`` completes "member <name> ..."."""

    def __init__(self, member: str, reason: str):
        super().__init__(reason)
        self.member = member


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract ``archive`` (zip, tar, tar.gz/.bz2/.xz) to ``dest``; return the extracted files.

    ``dest`` must not exist or be an empty folder.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise KnowsamError(f"cannot extract {archive}: destination {dest} exists and is not empty")
    try:
        with open(archive, "rb") as fh:
            is_zip = fh.read(4) in _ZIP_MAGIC
    except OSError as exc:
        raise KnowsamError(f"cannot read archive {archive}: {exc.strerror or exc}") from None

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    try:
        files = _extract_zip(archive, tmp) if is_zip else _extract_tar(archive, tmp)
        os.replace(tmp, dest)  # rename(2) may replace an empty folder
    except _Refused as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KnowsamError(f"cannot extract {archive}: member {exc.member!r} {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [dest / rel for rel in files]


def _relative(name: str) -> PurePosixPath:
    """The member's path relative to the destination; refuse anything that could leave it."""
    if "\0" in name:
        raise _Refused(name, "has a NUL byte in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise _Refused(name, "has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(name, "has a '..' component that would leave the destination")
    return PurePosixPath(*parts)


def _local(action: str, path: Path, exc: OSError) -> KnowsamError:
    """A failure on our side (disk full, permissions), not damage in the archive."""
    return KnowsamError(f"cannot {action} {path}: {exc.strerror or exc}")


def _mkdir(root: Path, rel: PurePosixPath) -> None:
    path = root.joinpath(*rel.parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _local("create", path, exc) from None


def _write_member(src: IO[bytes], root: Path, rel: PurePosixPath, size: int, name: str) -> None:
    _mkdir(root, rel.parent)
    target = root.joinpath(*rel.parts)
    written = 0
    try:
        out = open(target, "wb")
    except OSError as exc:
        raise _local("write", target, exc) from None
    with out:
        while True:
            try:
                block = src.read(_CHUNK)
            except _READ_ERRORS as exc:
                raise _Refused(name, f"is corrupt or truncated ({type(exc).__name__}: {exc})") from None
            if not block:
                break
            try:
                out.write(block)
            except OSError as exc:
                raise _local("write", target, exc) from None
            written += len(block)
    if written != size:
        raise _Refused(name, f"is truncated ({written} of {size} bytes)")


def _extract_zip(archive: Path, root: Path) -> list[PurePosixPath]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _Refused("(central directory)", f"cannot be read: corrupt or truncated zip ({exc})") from None
    with zf:
        plan = []
        for info in zf.infolist():  # the listing is known up front: refuse before writing anything
            rel = _relative(info.filename)
            mode = (info.external_attr >> 16) & _S_IFMT
            if mode == _S_IFLNK:
                raise _Refused(info.filename, "is a symbolic link (links are not extracted)")
            if mode not in (0, _S_IFREG, _S_IFDIR):
                raise _Refused(info.filename, "is a special file (device, FIFO or socket)")
            if info.flag_bits & 0x1:
                raise _Refused(info.filename, "is encrypted")
            is_dir = info.is_dir() or mode == _S_IFDIR
            if not rel.parts and not is_dir:
                raise _Refused(info.filename, "has an empty name")
            plan.append((info, rel, is_dir))
        files = []
        for info, rel, is_dir in plan:
            if is_dir:
                _mkdir(root, rel)
                continue
            try:
                src = zf.open(info)
            except (zipfile.BadZipFile, NotImplementedError) as exc:
                raise _Refused(info.filename, f"cannot be read ({exc})") from None
            with src:  # zipfile checks the CRC when the member is read to its end
                _write_member(src, root, rel, info.file_size, info.filename)
            files.append(rel)
    return files


def _extract_tar(archive: Path, root: Path) -> list[PurePosixPath]:
    files: list[PurePosixPath] = []
    name = "(first header)"
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # streamed: a damaged header raises here
                name = member.name
                rel = _relative(name)
                if member.isdir():
                    _mkdir(root, rel)
                    continue
                if member.issym() or member.islnk():
                    raise _Refused(name, f"is a link to {member.linkname!r} (links are not extracted)")
                if not member.isreg():
                    raise _Refused(name, "is a special file (device, FIFO or socket)")
                if not rel.parts:
                    raise _Refused(name, "has an empty name")
                src = tf.extractfile(member)
                assert src is not None  # isreg() members always have data
                with src:
                    _write_member(src, root, rel, member.size, name)
                files.append(rel)
                name = f"(header after {name})"  # names the spot if the next header is damaged
            name = "(end-of-archive block)"
            # tarfile stops quietly at a missing or garbled header after the first one;
            # a proper end is a zero block. Reading on to EOF then makes gzip/bz2/xz
            # check their trailers.
            tf.fileobj.seek(tf.offset)
            if tf.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise _Refused(name, "is missing: the archive is truncated or corrupt")
            while tf.fileobj.read(_CHUNK):
                pass
    except tarfile.ReadError as exc:
        if not files and name == "(first header)":
            # tarfile's message lists every compression it tried, over several lines.
            raise KnowsamError(
                f"cannot extract {archive}: not a readable zip or tar archive (another format, or corrupt or truncated)"
            ) from None
        raise _Refused(name, f"is corrupt or truncated ({exc})") from None
    except _READ_ERRORS as exc:
        raise _Refused(name, f"is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return files

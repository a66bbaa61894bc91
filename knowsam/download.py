"""Resumable, verified downloads (datasets and SAM checkpoints), with one ``sha256_file``.

Data goes to ``<dest>.part`` and is renamed to ``dest`` only once complete and, when a
digest is pinned, verified: ``dest`` existing means the file is whole. An interrupted
transfer (here or in an earlier run) continues from the ``.part`` with an HTTP Range
request; a server that ignores Range answers 200 and the file is restarted.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import requests
import urllib3
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from knowsam.errors import ConfigError, KnowsamError

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")
_GDRIVE_ID = re.compile(r"[A-Za-z0-9_-]{10,}")


class DownloadError(KnowsamError):
    """The transfer failed (network, HTTP status, short read): the source is unavailable now."""


class ChecksumError(KnowsamError):
    """The bytes arrived but are not the pinned ones."""


class _Retry(Exception):
    """A failure worth another attempt (connection loss, short read, 5xx)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float = 1.0,
) -> str:
    """Download ``url`` to ``dest``; return the file's hex sha256.

    At most ``1 + retries`` requests are made; attempt ``k`` waits ``backoff * 2**(k-1)``
    seconds first. After the last failure the ``.part`` is kept so a later call resumes.
    A checksum mismatch deletes the ``.part`` (its bytes cannot be trusted as a prefix).
    """
    if retries < 0:
        raise ConfigError(f"retries must be >= 0, got {retries}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failure = ""
    with requests.Session() as session, _progress_bar(progress) as bar:
        task = bar.add_task(dest.name, total=None)
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                _fetch(session, url, part, timeout, bar, task)
                break
            except _Retry as exc:
                failure = str(exc)
        else:
            kept = f" (partial data kept in {part})" if part.is_file() and part.stat().st_size else ""
            raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {failure}{kept}")
    return _finish(part, dest, sha256, url)


def _fetch(session: requests.Session, url: str, part: Path, timeout: float, bar: Progress, task: TaskID) -> None:
    """One request: append to ``part`` (206) or rewrite it (200); raise ``_Retry`` on a transient failure."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: a compressed transfer would make Content-Length and byte ranges refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise _Retry(_describe(exc)) from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == offset:
                return  # the .part already holds the whole file (an earlier run stopped before the rename)
            part.unlink()
            raise _Retry(f"server refused to resume at byte {offset}; restarting")
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                part.unlink()
                got = response.headers.get("Content-Range")
                raise _Retry(f"server resumed at the wrong offset ({got!r}); restarting")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        elif status == 200:
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        elif status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status} {response.reason}")
        else:
            raise DownloadError(f"download of {url} refused: HTTP {status} {response.reason}")

        bar.update(task, total=total, completed=offset)
        try:
            with open(part, mode) as fh:
                # read1 hands over each piece as it arrives; buffered reads would drop the
                # bytes received just before a connection loss, which resuming relies on.
                while chunk := response.raw.read1(CHUNK, decode_content=False):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
        except (urllib3.exceptions.HTTPError, requests.RequestException) as exc:
            raise _Retry(f"connection lost after {part.stat().st_size} bytes ({type(exc).__name__})") from None
        except OSError as exc:
            raise KnowsamError(f"cannot write {part}: {exc}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"short read: {size} of {total} bytes")


def _describe(exc: Exception) -> str:
    """The useful end of requests' nested messages (e.g. "[Errno 111] Connection refused")."""
    text = str(exc)
    match = _ERRNO.search(text)
    return match.group(0) if match else f"{type(exc).__name__}: {text[:200]}"


def _finish(part: Path, dest: Path, sha256: str | None, source: str) -> str:
    """Verify ``part`` against the pin and rename it to ``dest``; return its digest."""
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {dest} from {source}: expected sha256 {sha256.lower()}, got {digest}"
        )
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return digest


def download_gdrive(
    file_id: str,
    dest: Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download a Google Drive file (Drive needs gdown's confirm-page handling); return its sha256.

    gdown keeps its own resumable partial files next to its output and moves them to the
    output (``<dest>.gdown``) only when complete; that file is then verified and renamed
    like a plain download.
    """
    if not _GDRIVE_ID.fullmatch(file_id or ""):
        raise ConfigError(f"not a Google Drive file id: {file_id!r}")
    import gdown  # deferred: only Drive downloads need it
    import gdown.exceptions

    dest = Path(dest)
    # Not ".part": gdown treats an existing output as finished, so only it may create this name.
    fetched = dest.with_name(dest.name + ".gdown")
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = f"https://drive.google.com/uc?id={file_id}"
    try:
        out = gdown.download(
            id=file_id, output=str(fetched), quiet=not progress, resume=True, retries=retries, timeout=timeout
        )
    except requests.RequestException as exc:
        raise DownloadError(f"download of {source} failed: {_describe(exc)}") from None
    except gdown.exceptions.DownloadError as exc:
        reason = " ".join(str(exc).split())  # gdown's messages span several lines
        raise DownloadError(f"download of {source} failed: {reason}") from None
    if out is None or not fetched.is_file():
        raise DownloadError(f"download of {source} produced no file")
    return _finish(fetched, dest, sha256, source)

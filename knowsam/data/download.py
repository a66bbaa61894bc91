"""Resumable, verified downloads.

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
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from knowsam.errors import ConfigError, KnowsamError

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
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
            raise DownloadError(
                f"download of {url} failed after {retries + 1} attempts: {failure} (partial data kept in {part})"
            )
    return _finish(part, dest, sha256, url)


def _fetch(session: requests.Session, url: str, part: Path, timeout: float, bar: Progress, task) -> None:
    """One request: append to ``part`` (206) or rewrite it (200); raise ``_Retry`` on a transient failure."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: a compressed transfer would make Content-Length and byte ranges refer to other bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from None
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
                raise _Retry(f"server resumed at the wrong offset ({response.headers.get('Content-Range')!r}); restarting")
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
                for chunk in response.iter_content(CHUNK):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
        except requests.RequestException as exc:  # before OSError: requests' errors subclass it
            raise _Retry(f"connection lost after {part.stat().st_size} bytes ({type(exc).__name__})") from None
        except OSError as exc:
            raise KnowsamError(f"cannot write {part}: {exc}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"short read: {size} of {total} bytes")


def _finish(part: Path, dest: Path, sha256: str | None, source: str) -> str:
    """Verify ``part`` against the pin and rename it to ``dest``; return its digest."""
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(f"checksum mismatch for {dest} from {source}: expected sha256 {sha256.lower()}, got {digest}")
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

    gdown keeps its own resumable partial files next to its output; its finished output
    is our ``.part``, verified and renamed like a plain download.
    """
    if not _GDRIVE_ID.fullmatch(file_id or ""):
        raise ConfigError(f"not a Google Drive file id: {file_id!r}")
    import gdown  # deferred: only Drive downloads need it
    import gdown.exceptions

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = f"https://drive.google.com/uc?id={file_id}"
    try:
        out = gdown.download(id=file_id, output=str(part), quiet=not progress, resume=True, retries=retries, timeout=timeout)
    except (gdown.exceptions.DownloadError, requests.RequestException) as exc:
        reason = " ".join(str(exc).split())  # gdown's messages span several lines
        raise DownloadError(f"download of {source} failed: {reason}") from None
    if out is None or not part.is_file():
        raise DownloadError(f"download of {source} produced no file")
    return _finish(part, dest, sha256, source)

"""Put a dataset in ``<raw_root>/<dataset>/`` in its canonical layout, from wherever it can be had.

Tried in order:

1. ``<raw_root>/<dataset>/`` already holds a complete copy: nothing to do.
2. A mirror (found by ``sources.mirror_folder``: the ``mirror`` argument, else the
   ``KNOWSAM_MIRROR`` environment variable):
   a folder whose ``<dataset>/`` subfolder holds either the extracted layout or the
   official archive files under their registry names (e.g. ``polyp/TrainDataset.zip``).
   A ``MANIFEST.sha256`` there (``sha256sum`` format, paths relative to that subfolder)
   is verified first. Files are copied, never hard-linked: an edit of a raw file must not
   reach the mirror (the user's source data). The copy is a reflink where the file system
   supports one (Btrfs, XFS: shared blocks, copied on write), else a full in-kernel copy.
3. The official downloads (unless ``offline``), into ``<raw_root>/.downloads/<dataset>/``,
   where an interrupted download resumes on the next call; archives are deleted once
   the dataset is in place.

Synthetic datasets (a ``generator`` in the spec) are written by their generator instead.
Archives are unpacked with ``safe_extract``, their content root found by the spec's
marker, and folder names normalised (``renames``). The result is checked part by part
against the registry's counts: an optional part that the source lacks is recorded as
unavailable (e.g. ETIS-LaribPolypDB from a mirror without it), a required part missing
or any count off is an error. Everything is assembled in a hidden folder next to the
target and renamed into place, with a ``SOURCE.json`` recording provenance.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from knowsam.data.extract import safe_extract
from knowsam.data.sources import MIRROR_ENV, Archive, DatasetSpec, get_dataset, mirror_folder
from knowsam.download import ChecksumError, DownloadError, download_file, download_gdrive, sha256_file
from knowsam.errors import ConfigError, KnowsamError
from knowsam.fileio import write_json

SOURCE_FILE = "SOURCE.json"
MANIFEST_FILE = "MANIFEST.sha256"
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LayoutStatus:
    """What a dataset folder holds, compared with the registry."""

    counts: dict[str, int]  # glob -> matching files
    available: tuple[str, ...]
    unavailable: tuple[str, ...]  # optional parts that are absent
    problems: tuple[str, ...]  # why the folder is not a usable copy; empty when it is

    @property
    def complete(self) -> bool:
        return not self.problems


def count_files(root: Path, pattern: str) -> int:
    """Regular files matching ``pattern`` under ``root``, ignoring hidden ones (.DS_Store, ._x)."""
    return sum(1 for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))


def inspect_layout(spec: DatasetSpec, root: Path) -> LayoutStatus:
    counts: dict[str, int] = {}
    available, unavailable, problems = [], [], []
    for part in spec.parts:
        found = {pattern: count_files(root, pattern) for pattern, _ in part.files}
        counts.update(found)
        if not any(found.values()):
            if part.optional:
                unavailable.append(part.name)
            else:
                problems.append(f"part {part.name!r} is missing ({', '.join(found)})")
            continue
        wrong = [
            f"{pattern}: expected {'some' if n is None else n} files, found {found[pattern]}"
            for pattern, n in part.files
            if (found[pattern] == 0 if n is None else found[pattern] != n)
        ]
        if wrong:
            problems.append(f"part {part.name!r} is incomplete ({'; '.join(wrong)})")
        else:
            available.append(part.name)
    return LayoutStatus(counts, tuple(available), tuple(unavailable), tuple(problems))


def acquire(
    dataset: str,
    raw_root: Path,
    *,
    mirror: str | Path | None = None,
    offline: bool = False,
    sha256_pins: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Make ``raw_root/<dataset>/`` a complete copy of ``dataset``; return that folder.

    ``sha256_pins`` maps archive file names (e.g. ``"TrainDataset.zip"``) to digests that
    override or add to the registry's pins; any archive used, from a mirror or the
    network, must match its pin.
    """
    spec = get_dataset(dataset)
    pins = _pins(spec, sha256_pins)
    raw_root = Path(raw_root)
    final = raw_root / spec.name
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):  # an empty folder gets replaced
        return _accept_existing(spec, final)
    raw_root.mkdir(parents=True, exist_ok=True)
    if spec.generator:
        return _install(spec, final, lambda stage: _generate(spec, stage))

    tried: list[str] = []
    mirror_root = mirror_folder(mirror)
    if mirror_root is None:
        tried.append(f"no mirror (none given, {MIRROR_ENV} unset)")
    else:
        mirror_dir = mirror_root / spec.name
        route = _mirror_route(spec, mirror_dir, pins)
        if route is not None:
            return _install(spec, final, route)
        tried.append(_mirror_miss(spec, mirror_dir))

    if not spec.archives:
        tried.append(
            f"no scripted download exists (get the files from {' or '.join(spec.manual_sources)} "
            f"and put them in <mirror>/{spec.name})"
        )
    elif offline:
        wanted = ", ".join(f"{a.source} ({a.size})" if a.size else a.source for a in spec.archives)
        tried.append(f"network skipped (offline): {wanted}")
    else:
        cache = raw_root / ".downloads" / spec.name
        try:
            path = _install(spec, final, lambda stage: _download(spec, cache, stage, pins, progress))
        except DownloadError as exc:
            tried.append(str(exc))
        else:
            shutil.rmtree(cache, ignore_errors=True)
            _remove_if_empty(cache.parent)
            return path
    raise KnowsamError(f"dataset {spec.name!r} is not available: " + "; ".join(" ".join(t.split()) for t in tried))


def _pins(spec: DatasetSpec, overrides: dict[str, str] | None) -> dict[str, str]:
    pins = {a.filename: a.sha256.lower() for a in spec.archives if a.sha256}
    names = [a.filename for a in spec.archives]
    for filename, digest in (overrides or {}).items():
        if filename not in names:
            raise ConfigError(
                f"sha256 pin for {filename!r}, which is not an archive of {spec.name!r} "
                f"(archives: {', '.join(names) or 'none'})"
            )
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
            raise ConfigError(f"sha256 pin for {filename!r} is not 64 hex digits: {digest!r}")
        pins[filename] = digest.lower()
    return pins


def _accept_existing(spec: DatasetSpec, final: Path) -> Path:
    status = inspect_layout(spec, final)
    if not status.complete:
        raise KnowsamError(
            f"{final} exists but is not a complete {spec.name!r} dataset ({'; '.join(status.problems)}); "
            "remove it to acquire the dataset again"
        )
    if not (final / SOURCE_FILE).exists():  # placed there by hand: record what was found
        write_json(final / SOURCE_FILE, _record(spec, status, {"origin": "existing", "location": str(final)}))
    return final


def _record(spec: DatasetSpec, status: LayoutStatus, provenance: dict) -> dict:
    return {
        "dataset": spec.name,
        **provenance,
        "counts": status.counts,
        "available": list(status.available),
        "unavailable": list(status.unavailable),
    }


def _install(spec: DatasetSpec, final: Path, build: Callable[[Path], dict]) -> Path:
    """Fill a hidden sibling of ``final`` with ``build``, check it, rename it to ``final``."""
    stage = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=final.parent))
    try:
        provenance = build(stage)
        for found, canonical in spec.renames:
            if (stage / found).is_dir() and not (stage / canonical).exists():
                (stage / found).rename(stage / canonical)
        status = inspect_layout(spec, stage)
        if not status.complete:
            raise KnowsamError(
                f"{spec.name!r} from {provenance['location']} is not usable: {'; '.join(status.problems)}"
            )
        write_json(stage / SOURCE_FILE, _record(spec, status, provenance))
        try:
            os.rename(stage, final)
        except OSError as exc:
            if not (final / SOURCE_FILE).is_file():
                raise KnowsamError(f"cannot move the assembled {spec.name!r} into {final}: {exc.strerror}") from None
            shutil.rmtree(stage)  # a concurrent acquire finished first; its copy serves
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def _generate(spec: DatasetSpec, stage: Path) -> dict:
    module_name, function_name = spec.generator.split(":")
    generator = getattr(importlib.import_module(module_name), function_name)  # lazy: heavy imports
    counts = generator(stage)
    return {"origin": "generator", "location": spec.generator, "generator_counts": counts}


# --- mirror ---------------------------------------------------------------------------


def _mirror_route(spec: DatasetSpec, mirror_dir: Path, pins: dict[str, str]) -> Callable[[Path], dict] | None:
    """The builder that fills a stage from the mirror folder, or None where it cannot supply the dataset."""
    if not mirror_dir.is_dir():
        return None
    layout_names = {*spec.top_level, *(found.split("/", 1)[0] for found, _ in spec.renames)}
    if any((mirror_dir / name).exists() for name in layout_names):
        return lambda stage: _from_mirror_layout(spec, mirror_dir, stage)
    if spec.archives and all((mirror_dir / a.filename).is_file() for a in spec.archives):
        return lambda stage: _from_mirror_archives(spec, mirror_dir, stage, pins)
    return None


def _mirror_miss(spec: DatasetSpec, mirror_dir: Path) -> str:
    if not mirror_dir.is_dir():
        return f"mirror {mirror_dir} (not found)"
    wanted = ", ".join(spec.top_level)
    if spec.archives:
        wanted += f" or archives {', '.join(a.filename for a in spec.archives)}"
    return f"mirror {mirror_dir} (holds none of {wanted})"


def _from_mirror_layout(spec: DatasetSpec, mirror_dir: Path, stage: Path) -> dict:
    archive_names = {a.filename for a in spec.archives}
    manifest = _verify_manifest(mirror_dir, lambda rel: rel not in archive_names)
    method = _copy_tree(mirror_dir, stage, skip=archive_names)
    return {"origin": "mirror", "location": str(mirror_dir), "method": method, "manifest": manifest}


def _from_mirror_archives(spec: DatasetSpec, mirror_dir: Path, stage: Path, pins: dict[str, str]) -> dict:
    archive_names = {a.filename for a in spec.archives}
    manifest = _verify_manifest(mirror_dir, lambda rel: rel in archive_names)
    used = {}
    for archive in spec.archives:
        path = mirror_dir / archive.filename
        digest = sha256_file(path)
        _check_pin(path, digest, pins.get(archive.filename), str(path))
        _unpack(archive, path, stage)
        used[archive.filename] = {"sha256": digest, "source": str(path)}
    return {"origin": "mirror", "location": str(mirror_dir), "archives": used, "manifest": manifest}


def _verify_manifest(folder: Path, wanted: Callable[[str], bool]) -> dict | None:
    """Check the folder's MANIFEST.sha256 entries selected by ``wanted``; None if there is none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _MANIFEST_LINE.fullmatch(line)
        if not match:
            raise KnowsamError(f"{path}:{lineno}: not a sha256sum line: {line[:80]!r}")
        expected, name = match.group(1).lower(), match.group(2)
        rel = PurePosixPath(name.removeprefix("./"))
        if rel.is_absolute() or ".." in rel.parts:
            raise KnowsamError(f"{path}:{lineno}: path {name!r} leaves the mirror folder")
        if wanted(str(rel)):
            entries.append((folder / rel, expected))
    for file, _ in entries:
        if not file.is_file():
            raise KnowsamError(f"{file} is listed in {path} but missing")
    # Thousands of small files: hashlib releases the GIL, so threads overlap reads and hashing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, (file for file, _ in entries)))
    for (file, expected), got in zip(entries, digests):
        if got != expected:
            raise KnowsamError(f"{file} does not match {path}: expected sha256 {expected}, got {got}")
    return {"file": str(path), "sha256": sha256_file(path), "entries_verified": len(entries)}


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> str:
    """Copy every file of ``src`` into ``dst`` (reflinks where possible, never hard links); return how."""
    copied = False
    for dirpath, _, filenames in os.walk(src, followlinks=True):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if rel == Path(".") and name in skip:
                continue
            _copy_file(Path(dirpath) / name, dst / rel / name)
            copied = True
    return "copy" if copied else "none"


def _copy_file(source: Path, target: Path) -> None:
    """copy_file_range lets the kernel reflink (Btrfs, XFS) or copy without user-space buffers;
    shutil.copyfile (sendfile) serves where it is missing (other systems, older kernels)."""
    if hasattr(os, "copy_file_range"):
        try:
            with open(source, "rb") as fin, open(target, "wb") as fout:
                while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                    pass
            return
        except OSError:  # e.g. EXDEV before Linux 5.3, or a file system without support
            pass
    shutil.copyfile(source, target)


# --- network --------------------------------------------------------------------------


def _download(spec: DatasetSpec, cache: Path, stage: Path, pins: dict[str, str], progress: bool) -> dict:
    used = {}
    for archive in spec.archives:
        path = cache / archive.filename
        pin = pins.get(archive.filename)
        digest = sha256_file(path) if path.is_file() else None  # finished by an earlier run
        if digest is None or (pin is not None and digest != pin):
            path.unlink(missing_ok=True)
            if archive.url:
                digest = download_file(archive.url, path, sha256=pin, progress=progress)
            else:
                digest = download_gdrive(archive.gdrive_id, path, sha256=pin, progress=progress)
        _unpack(archive, path, stage)
        used[archive.filename] = {"sha256": digest, "source": archive.source}
    return {"origin": "download", "location": ", ".join(a.source for a in spec.archives), "archives": used}


def _check_pin(path: Path, digest: str, pin: str | None, source: str) -> None:
    if pin is not None and digest != pin:
        raise ChecksumError(f"checksum mismatch for {path} from {source}: expected sha256 {pin}, got {digest}")


# --- unpacking ------------------------------------------------------------------------


def _unpack(archive: Archive, path: Path, stage: Path) -> None:
    """Extract ``path`` and move its content root (found by the marker) to ``install_to``."""
    scratch = stage / f".unpack-{archive.filename}"
    safe_extract(path, scratch)
    root = _find_root(scratch, archive.marker)
    if root is None:
        raise KnowsamError(f"{path} has no {archive.marker!r} entry: not the expected archive")
    # macOS archivers add "._<name>" resource forks next to real files; a loader globbing
    # "*.png" would take them for images.
    for junk in [*root.rglob("._*"), *root.rglob(".DS_Store")]:
        if junk.is_file():
            junk.unlink()
    target = stage / archive.install_to
    target.mkdir(parents=True, exist_ok=True)
    for child in root.iterdir():
        if child.name == "__MACOSX":  # the same resource forks, in a parallel tree
            continue
        if (target / child.name).exists():
            raise KnowsamError(f"{path} provides {child.name!r}, which another archive already provided")
        child.rename(target / child.name)
    shutil.rmtree(scratch)


def _find_root(top: Path, marker: str) -> Path | None:
    """The shallowest folder under ``top`` (itself included) that holds ``marker``."""
    level = [top]
    while level:
        for folder in level:
            if (folder / marker).exists():
                return folder
        level = sorted(d for f in level for d in f.iterdir() if d.is_dir() and d.name != "__MACOSX")
    return None


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # still holds another dataset's interrupted downloads: keep it
        pass

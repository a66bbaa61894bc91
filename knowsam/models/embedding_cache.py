"""The frozen SAM encoder's embeddings of every image of a prepared dataset, computed once.

With ``sam.encoder: cached`` the teacher's image encoder never changes, so its output for each
un-augmented image is computed once (the ``embed`` stage): training then only runs the prompt
heads and the decoder, and validation and evaluation score the teacher's own prediction
without running the encoder again. ``<embeddings_root>/<dataset>/``::

    <part>_embeddings.npy  (N, C, E, E) float16, rows in the prepared order of one part (train,
                           val where the dataset has one, each test set); memory-mapped by readers
    meta.json              which encoder and which images made it, and how many rows of each part are done

Parts are filled in that order (training needs only ``train``). A run that stops is resumed at
the first row not done; a part whose file is damaged (truncated, another shape) is embedded again.
The images a cache was made from are identified by their names and by a digest of their prepared
pixels, so a changed image or ``data.interpolation`` makes a new cache. A cache made by other
weights, another arch or other prepared images is refused with one line saying to re-run the stage.
With ``sam.encoder: adapters`` the stage writes only meta.json saying that no cache is needed.

Each file is allocated in full, its free space checked first, before any row is written, and rows
are written through the file, not a memory map: a full disk is one line, never a SIGBUS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from knowsam import fileio
from knowsam.data.dataset import PreparedDataset, part_slug, to_float
from knowsam.errors import KnowsamError, is_disk_full

LOG = logging.getLogger(__name__)

META_FILE = "meta.json"
DTYPE = np.float16  # half of float32's disk and memory; the decoder's input differs by < 1e-3 relative


def parts(data: PreparedDataset) -> list[str]:
    """Every part of the dataset whose images a teacher may see: train, then val, then the test sets."""
    return ["train", *(["val"] if data.meta.get("has_val") else []), *data.eval_parts]


def embeddings_file(folder: Path, part: str) -> Path:
    return folder / f"{part_slug(part)}_embeddings.npy"


def identity(data: PreparedDataset, arch: str, weights: str) -> dict:
    """What a cache must match to be used: encoder (arch, weights), images (size, and the names and
    pixels of each part) and format."""

    def images(part: str) -> dict:
        index = data.index(part)
        return {
            "rows": len(index),
            "names_sha256": hashlib.sha256("\n".join(index["name"]).encode()).hexdigest(),
            "pixels_sha256": pixels_sha256(data.images(part)),
        }

    return {
        "arch": arch,
        "weights": weights,
        "image_size": data.image_size,
        "dtype": np.dtype(DTYPE).name,
        "parts": {part: images(part) for part in parts(data)},
    }


def pixels_sha256(images: np.ndarray) -> str:
    """Digest of a prepared image array (dtype, shape and every pixel): about a second per 500 MB, read
    from the memory map, against minutes for encoding the same images."""
    digest = hashlib.sha256(f"{images.dtype.str} {images.shape}".encode())
    digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    return digest.hexdigest()


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def rows_done(folder: Path, data: PreparedDataset, arch: str) -> dict[str, int]:
    """Rows of each part already embedded in ``folder`` by ``arch`` for exactly these prepared images
    (0 where none); for estimates: the weights are not checked."""
    meta = _read_meta(folder) or {}
    ident = meta.get("identity") or {}
    expected = identity(data, arch, "")
    same = all(ident.get(k) == expected[k] for k in ("arch", "image_size", "dtype", "parts"))
    return {part: int(meta.get("done", {}).get(part, 0)) if same else 0 for part in expected["parts"]}


def open_cache(folder: Path, expected: dict) -> dict[str, np.ndarray]:
    """The complete cache in ``folder`` made for ``expected`` (see :func:`identity`): part -> memory-mapped rows."""
    meta = _read_meta(folder)
    hint = f"run `knowsam-bench embed {folder.name}` (the embed stage)"
    if meta is None or not meta.get("needed", True):
        raise KnowsamError(f"{folder}: no embedding cache for sam.encoder cached; {hint}")
    if meta.get("identity") != expected:
        made_for = meta.get("identity") or {}
        changed = sorted({"parts": "prepared images"}.get(k, k) for k in expected if made_for.get(k) != expected[k])
        raise KnowsamError(f"{folder}: embedding cache was made for other {', '.join(changed)}; {hint}")
    cache = {}
    for part, info in expected["parts"].items():
        done = meta.get("done", {}).get(part)
        if done != info["rows"]:
            raise KnowsamError(f"{folder}: embedding cache is incomplete ({part}: {done} of {info['rows']}); {hint}")
        path = embeddings_file(folder, part)
        try:
            cache[part] = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise KnowsamError(f"{path}: unreadable ({type(exc).__name__}); {hint}") from None
        if len(cache[part]) != info["rows"]:
            raise KnowsamError(f"{path}: {len(cache[part])} rows, expected {info['rows']}; {hint}")
    return cache


def write_not_needed(folder: Path, encoder: str) -> None:
    """The stage's output when the teacher trains its encoder: a note, and no stale embeddings."""
    for stale in folder.glob("*_embeddings.npy"):
        stale.unlink()
    fileio.write_json(folder / META_FILE, {"needed": False, "reason": f"sam.encoder is {encoder}"})


def embed_dataset(
    data: PreparedDataset,
    folder: Path,
    encode: Callable[[torch.Tensor], torch.Tensor],
    expected: dict,
    *,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Fill ``folder`` with ``encode`` of every image of every part; resumes a run with the same identity.

    ``encode`` maps images (B, C, S, S) in [0, 1] to embeddings (B, C', E, E). Rows are written in
    order and ``done`` advances after each batch is on disk, so a killed run loses one batch.
    ``progress(done, total)`` counts images over all parts. Returns meta.json's content, with the
    seconds and images per second of this call.
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta = _read_meta(folder)
    same = meta is not None and meta.get("identity") == expected
    done = {part: int(meta.get("done", {}).get(part, 0)) if same else 0 for part in expected["parts"]}
    if not same:  # embeddings of other images or another encoder: none of them is reused
        for stale in folder.glob("*_embeddings.npy"):
            stale.unlink()
    for part, info in expected["parts"].items():
        if done[part] and (problem := _damage(embeddings_file(folder, part), info["rows"])):
            LOG.warning(f"{embeddings_file(folder, part)}: {problem}; embedding {part} again")
            done[part] = 0
    total = sum(info["rows"] for info in expected["parts"].values())
    first = sum(done.values())
    started = time.perf_counter()
    to_allocate = [part for part, info in expected["parts"].items() if done[part] == 0 and info["rows"]]
    for part, info in expected["parts"].items():
        images = data.images(part)
        path = embeddings_file(folder, part)
        for start in range(done[part], info["rows"], batch):
            x = torch.from_numpy(to_float(np.asarray(images[start : start + batch])))
            with torch.no_grad():
                emb = encode(x).float().cpu().numpy().astype(DTYPE)
            if to_allocate:  # the first batch tells the row shape: every new file is made before any row is written
                _allocate(
                    folder,
                    {embeddings_file(folder, p): (expected["parts"][p]["rows"], *emb.shape[1:]) for p in to_allocate},
                )
                to_allocate = []
            _write_rows(path, start, emb)
            done[part] = start + len(emb)
            fileio.write_json(folder / META_FILE, {"needed": True, "identity": expected, "done": done})
            if progress is not None:
                progress(sum(done.values()), total)
    seconds = time.perf_counter() - started
    computed = total - first
    meta = {
        "needed": True,
        "identity": expected,
        "done": done,
        "last_call": {
            "images": computed,
            "seconds": round(seconds, 1),
            "images_per_second": round(computed / seconds, 3) if computed and seconds else None,
        },
    }
    fileio.write_json(folder / META_FILE, meta)
    return meta


def _damage(path: Path, rows: int) -> str | None:
    """What is wrong with a part's file that meta.json counts rows of (None: it holds ``rows`` rows of DTYPE)."""
    try:
        stored = np.load(path, mmap_mode="r")
    # missing, truncated ("mmap length is greater than file size"), emptied (EOFError)
    except (OSError, ValueError, EOFError) as exc:
        return f"damaged embedding cache file ({type(exc).__name__})"
    if stored.dtype != DTYPE or stored.ndim != 4 or len(stored) != rows:
        return f"embedding cache file holds {stored.dtype} {stored.shape}, expected {rows} rows of {np.dtype(DTYPE)}"
    return None


def _allocate(folder: Path, files: dict[Path, tuple[int, ...]]) -> None:
    """Zero-filled .npy files of the given shapes, every block allocated now; refused at once when the
    disk cannot hold them all (a memory map of a sparse file gets SIGBUS when the disk fills)."""
    for path in files:
        path.unlink(missing_ok=True)
    itemsize = np.dtype(DTYPE).itemsize
    header = 128  # an .npy header of a 4-d shape takes one 64-byte-aligned block of at most this size
    needed = sum(header + int(np.prod(shape)) * itemsize for shape in files.values())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise KnowsamError(
            f"{folder}: the embedding cache needs {_mb(needed, up=True)} MB, {_mb(free)} MB free on "
            "its disk; free some space (or set sam.embeddings_root on another disk) and rerun"
        )
    for path, shape in files.items():
        with _disk_full_is_one_line(path), open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": shape}
            )
            size = fh.tell() + int(np.prod(shape)) * itemsize
            fh.flush()
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fh.fileno(), 0, size)
            else:  # written zeros are allocated blocks too
                for offset in range(fh.tell(), size, 1 << 24):
                    fh.write(bytes(min(1 << 24, size - offset)))


def _write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Rows ``start...`` of an allocated file, synced to disk (meta.json counts them done next)."""
    offset = np.load(path, mmap_mode="r").offset + start * rows[0].nbytes
    with _disk_full_is_one_line(path), open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _disk_full_is_one_line(path: Path):
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise KnowsamError(
            f"{path}: no space left on device ({_mb(shutil.disk_usage(path.parent).free)} MB free in "
            f"{path.parent}); free some space and rerun"
        ) from None


def _mb(size: int, up: bool = False) -> int:
    return -(-size // 2**20) if up else size // 2**20


def open_for_teacher(
    embeddings_root: str | Path, dataset: str, data: PreparedDataset, provenance: dict, bf16: bool
) -> dict[str, np.ndarray] | None:
    """The embed stage's cache for a teacher whose encoder is frozen and cached (from the method's
    provenance); None for any other method or teacher."""
    if provenance.get("sam_encoder") != "cached":
        return None
    expected = {**identity(data, provenance["sam_arch"], provenance["sam_weights"]), "bf16": bf16}
    return open_cache(Path(embeddings_root) / dataset, expected)

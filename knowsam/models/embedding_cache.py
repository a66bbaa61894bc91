"""The frozen SAM encoder's embeddings of a prepared dataset's training images, computed once.

With ``sam.encoder: cached`` the teacher's image encoder never changes, so its output for each
un-augmented training image is computed once (the ``embed`` stage) and training only runs the
prompt heads and the decoder. ``<embeddings_root>/<dataset>/``::

    train_embeddings.npy   (N, C, E, E) float16, rows in the prepared train order; memory-mapped
    meta.json              which encoder and which images made it, and how many rows are done

A run that stops is resumed at the first row not done. A cache made by other weights, another
arch or other prepared images is refused with one line saying to re-run the stage. With
``sam.encoder: adapters`` the stage writes only meta.json saying that no cache is needed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from knowsam import fileio
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.errors import KnowsamError

EMBEDDINGS_FILE = "train_embeddings.npy"
META_FILE = "meta.json"
DTYPE = np.float16  # half of float32's disk and memory; the decoder's input differs by < 1e-3 relative


def identity(data: PreparedDataset, arch: str, weights: str) -> dict:
    """What a cache must match to be used: encoder (arch, weights), images (size, names) and format."""
    names = "\n".join(data.index("train")["name"])
    return {"arch": arch, "weights": weights, "image_size": data.image_size, "rows": len(data.index("train")),
            "names_sha256": hashlib.sha256(names.encode()).hexdigest(), "dtype": np.dtype(DTYPE).name}


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def open_cache(folder: Path, expected: dict) -> np.ndarray:
    """The complete cache in ``folder`` made for ``expected`` (see :func:`identity`), memory-mapped."""
    meta = _read_meta(folder)
    hint = f"run `knowsam-bench embed {folder.name}` (the embed stage)"
    if meta is None or not meta.get("needed", True):
        raise KnowsamError(f"{folder}: no embedding cache for sam.encoder cached; {hint}")
    if meta.get("identity") != expected:
        changed = sorted(k for k in expected if meta.get("identity", {}).get(k) != expected[k])
        raise KnowsamError(f"{folder}: embedding cache was made for other {', '.join(changed)}; {hint}")
    if meta.get("done") != expected["rows"]:
        raise KnowsamError(f"{folder}: embedding cache is incomplete ({meta.get('done')} of {expected['rows']}); {hint}")
    try:
        return np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise KnowsamError(f"{folder / EMBEDDINGS_FILE}: unreadable ({type(exc).__name__}); {hint}") from None


def write_not_needed(folder: Path, encoder: str) -> None:
    """The stage's output when the teacher trains its encoder: a note, and no stale embeddings."""
    (folder / EMBEDDINGS_FILE).unlink(missing_ok=True)
    fileio.write_json(folder / META_FILE, {"needed": False, "reason": f"sam.encoder is {encoder}"})


def embed_dataset(data: PreparedDataset, folder: Path, encode: Callable[[torch.Tensor], torch.Tensor],
                  expected: dict, *, batch: int = 8, progress: Callable[[int, int], None] | None = None) -> dict:
    """Fill ``folder`` with ``encode`` of every training image; resumes a run with the same identity.

    ``encode`` maps images (B, C, S, S) in [0, 1] to embeddings (B, C', E, E). Rows are written in
    order and ``done`` advances after each batch is flushed, so a killed run loses one batch.
    Returns meta.json's content, with the seconds and images per second of this call.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images = data.images("train")
    n = len(images)
    meta = _read_meta(folder)
    path = folder / EMBEDDINGS_FILE
    resume = meta is not None and meta.get("identity") == expected and path.is_file()
    done = first = int(meta["done"]) if resume else 0
    started = time.perf_counter()
    out = None
    for start in range(done, n, batch):
        x = torch.from_numpy(to_float(np.asarray(images[start:start + batch])))
        with torch.no_grad():
            emb = encode(x).float().cpu().numpy().astype(DTYPE)
        if out is None:  # the first batch tells the shape
            out = (np.load(path, mmap_mode="r+") if resume else
                   np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=(n, *emb.shape[1:])))
        out[start:start + len(emb)] = emb
        out.flush()
        done = start + len(emb)
        meta = {"needed": True, "identity": expected, "done": done}
        fileio.write_json(folder / META_FILE, meta)
        if progress is not None:
            progress(done, n)
    seconds = time.perf_counter() - started
    computed = n - first
    meta = {"needed": True, "identity": expected, "done": n,
            "last_call": {"images": computed, "seconds": round(seconds, 1),
                          "images_per_second": round(computed / seconds, 3) if computed and seconds else None}}
    fileio.write_json(folder / META_FILE, meta)
    return meta

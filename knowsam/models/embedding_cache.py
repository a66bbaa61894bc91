"""The frozen SAM encoder's embeddings of every image of a prepared dataset, computed once.

With ``sam.encoder: cached`` the teacher's image encoder never changes, so its output for each
un-augmented image is computed once (the ``embed`` stage): training then only runs the prompt
heads and the decoder, and validation and evaluation score the teacher's own prediction
without running the encoder again. ``<embeddings_root>/<dataset>/``::

    <part>_embeddings.npy  (N, C, E, E) float16, rows in the prepared order of one part (train,
                           val where the dataset has one, each test set); memory-mapped
    meta.json              which encoder and which images made it, and how many rows of each part are done

Parts are filled in that order (training needs only ``train``). A run that stops is resumed at
the first row not done. A cache made by other weights, another arch or other prepared images is
refused with one line saying to re-run the stage. With ``sam.encoder: adapters`` the stage writes
only meta.json saying that no cache is needed.
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
from knowsam.data.dataset import PreparedDataset, part_slug, to_float
from knowsam.errors import KnowsamError

META_FILE = "meta.json"
DTYPE = np.float16  # half of float32's disk and memory; the decoder's input differs by < 1e-3 relative


def parts(data: PreparedDataset) -> list[str]:
    """Every part of the dataset whose images a teacher may see: train, then val, then the test sets."""
    return ["train", *(["val"] if data.meta.get("has_val") else []), *data.eval_parts]


def embeddings_file(folder: Path, part: str) -> Path:
    return folder / f"{part_slug(part)}_embeddings.npy"


def identity(data: PreparedDataset, arch: str, weights: str) -> dict:
    """What a cache must match to be used: encoder (arch, weights), images (size, names of each part) and format."""
    def names(part: str) -> dict:
        index = data.index(part)
        return {"rows": len(index), "names_sha256": hashlib.sha256("\n".join(index["name"]).encode()).hexdigest()}

    return {"arch": arch, "weights": weights, "image_size": data.image_size, "dtype": np.dtype(DTYPE).name,
            "parts": {part: names(part) for part in parts(data)}}


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
        changed = sorted(k for k in expected if made_for.get(k) != expected[k])
        raise KnowsamError(f"{folder}: embedding cache was made for other {', '.join(changed)}; {hint}")
    cache = {}
    for part, info in expected["parts"].items():
        done = meta.get("done", {}).get(part)
        if done != info["rows"]:
            raise KnowsamError(f"{folder}: embedding cache is incomplete ({part}: {done} of {info['rows']}); {hint}")
        path = embeddings_file(folder, part)
        try:
            cache[part] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise KnowsamError(f"{path}: unreadable ({type(exc).__name__}); {hint}") from None
        if len(cache[part]) != info["rows"]:
            raise KnowsamError(f"{path}: {len(cache[part])} rows, expected {info['rows']}; {hint}")
    return cache


def write_not_needed(folder: Path, encoder: str) -> None:
    """The stage's output when the teacher trains its encoder: a note, and no stale embeddings."""
    for stale in folder.glob("*_embeddings.npy"):
        stale.unlink()
    fileio.write_json(folder / META_FILE, {"needed": False, "reason": f"sam.encoder is {encoder}"})


def embed_dataset(data: PreparedDataset, folder: Path, encode: Callable[[torch.Tensor], torch.Tensor],
                  expected: dict, *, batch: int = 8, progress: Callable[[int, int], None] | None = None) -> dict:
    """Fill ``folder`` with ``encode`` of every image of every part; resumes a run with the same identity.

    ``encode`` maps images (B, C, S, S) in [0, 1] to embeddings (B, C', E, E). Rows are written in
    order and ``done`` advances after each batch is flushed, so a killed run loses one batch.
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
    total = sum(info["rows"] for info in expected["parts"].values())
    first = sum(done.values())
    started = time.perf_counter()
    for part, info in expected["parts"].items():
        images = data.images(part)
        path = embeddings_file(folder, part)
        if not path.is_file():
            done[part] = 0
        out = None
        for start in range(done[part], info["rows"], batch):
            x = torch.from_numpy(to_float(np.asarray(images[start:start + batch])))
            with torch.no_grad():
                emb = encode(x).float().cpu().numpy().astype(DTYPE)
            if out is None:  # the first batch tells the shape
                out = (np.load(path, mmap_mode="r+") if start else
                       np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=(info["rows"], *emb.shape[1:])))
            out[start:start + len(emb)] = emb
            out.flush()
            done[part] = start + len(emb)
            fileio.write_json(folder / META_FILE, {"needed": True, "identity": expected, "done": done})
            if progress is not None:
                progress(sum(done.values()), total)
    seconds = time.perf_counter() - started
    computed = total - first
    meta = {"needed": True, "identity": expected, "done": done,
            "last_call": {"images": computed, "seconds": round(seconds, 1),
                          "images_per_second": round(computed / seconds, 3) if computed and seconds else None}}
    fileio.write_json(folder / META_FILE, meta)
    return meta


def open_for_teacher(embeddings_root: str | Path, dataset: str, data: PreparedDataset, provenance: dict,
                     bf16: bool) -> dict[str, np.ndarray] | None:
    """The embed stage's cache for a teacher whose encoder is frozen and cached (from the method's
    provenance); None for any other method or teacher."""
    if provenance.get("sam_encoder") != "cached":
        return None
    expected = {**identity(data, provenance["sam_arch"], provenance["sam_weights"]), "bf16": bf16}
    return open_cache(Path(embeddings_root) / dataset, expected)

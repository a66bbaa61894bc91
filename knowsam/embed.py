"""The ``embed`` stage: the frozen teacher encoder's embeddings of every image of one dataset.

Builds the run's SAM teacher exactly as training does (same arch, weights and resolution), so the
cache's identity is the one training checks (:mod:`knowsam.models.embedding_cache`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from knowsam.config import Params
from knowsam.data.dataset import PreparedDataset
from knowsam.machine import pick_device
from knowsam.models import embedding_cache


def embed(params: Params, dataset: str, *, batch: int = 1, progress: Callable[[int, int], None] | None = None) -> dict:
    """Fill ``<sam.embeddings_root>/<dataset>`` (resuming), or note that ``sam.encoder`` needs no cache."""
    from knowsam.methods import MethodContext
    from knowsam.methods.sam_support import build_sam_teacher

    folder = Path(params.sam.embeddings_root) / dataset
    if params.sam.encoder != "cached":
        folder.mkdir(parents=True, exist_ok=True)
        embedding_cache.write_not_needed(folder, params.sam.encoder)
        return {"needed": False}
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    data = PreparedDataset(Path(params.data.prepared_root) / dataset)
    device = pick_device(params.train.device)
    ctx = MethodContext(
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
        iterations=1,
        train=params.train,
        sam=params.sam,
        device=device,
        training=False,
    )
    teacher, provenance = build_sam_teacher(ctx)
    teacher.eval()
    if params.train.compile:  # measured 1.6x on 2 CPU cores after ~40 s of compilation (docs/scaling.md)
        teacher.image_encoder.compile()
    expected = embedding_cache.identity(data, provenance["sam_arch"], provenance["sam_weights"])
    # bf16 autocast (train.amp_bf16) doubles CPU speed but changes the embeddings by about 3e-2
    # relative, so it is part of the cache's identity; fp16 storage either way.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if params.train.amp_bf16 else contextlib.nullcontext()

    def encode(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return teacher.encode(x.to(device))

    return embedding_cache.embed_dataset(
        data, folder, encode, {**expected, "bf16": params.train.amp_bf16}, batch=batch, progress=progress
    )

"""Seconds of each named part of a training step, measured only while a breakdown is recorded.

Methods and the SAM teacher mark their parts with ``with part("prompt heads"):``; outside
:func:`recording` that costs one check. Parts may nest: a part's seconds exclude those of the
parts inside it, so the parts of a step add up to at most the step. ``knowsam-bench plan
--profile`` records every timed step (docs/scaling.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The parts, in the order a breakdown lists them.
STUDENTS = "students"  # KnowSAM's U-Net and V-Net forward on the batch
FUSION = "fusion"  # KnowSAM's fusion module forward
MIXED_STAGE = "mixed stage"  # KnowSAM's uncertainty mixing and its second pass of every network
TEACHER_ENCODER = "teacher encoder"  # the SAM image encoder (encoder adapters; a cached encoder never runs)
PROMPT_HEADS = "prompt heads"  # the learnable prompt heads (forward)
DECODER = "decoder forward"  # dense-prompt embedding, mask decoder and logits (forward)
TEACHER_BACKWARD = "teacher backward"  # backward of L_sam through the teacher
STUDENTS_BACKWARD = "students backward"  # every other backward
UPDATES = "optimiser updates"  # every optimiser step
PARTS = (
    STUDENTS,
    FUSION,
    MIXED_STAGE,
    TEACHER_ENCODER,
    PROMPT_HEADS,
    DECODER,
    TEACHER_BACKWARD,
    STUDENTS_BACKWARD,
    UPDATES,
)
TEACHER_PARTS = (TEACHER_ENCODER, PROMPT_HEADS, DECODER, TEACHER_BACKWARD)

_totals: dict[str, float] | None = None
_inner: list[float] = []  # per open part: seconds spent in the parts inside it


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def part(name: str) -> Iterator[None]:
    """Add the seconds spent inside (less those of nested parts) to ``name`` while recording."""
    if _totals is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    _inner.append(0.0)
    try:
        yield
    finally:
        _sync()
        elapsed = time.perf_counter() - start
        nested = _inner.pop()
        _totals[name] = _totals.get(name, 0.0) + elapsed - nested
        if _inner:
            _inner[-1] += elapsed


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Record parts into the yielded dict (seconds per part name) until the block ends."""
    global _totals
    if _totals is not None:
        raise RuntimeError("step_timing.recording() does not nest")
    _totals = {}
    try:
        yield _totals
    finally:
        _totals = None
        _inner.clear()

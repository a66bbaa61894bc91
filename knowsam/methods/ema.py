"""Pieces shared by the semi-supervised baselines: EMA teachers, the consistency ramp.

Kept in one place so Mean Teacher and UCMT update their teachers with the same arithmetic,
and every baseline ramps its unsupervised weight on the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from knowsam.errors import ConfigError
from knowsam.losses import sigmoid_rampup
from knowsam.methods.base import MethodContext


def ema_decay(step: int, decay: float) -> float:
    """SSL4MIS's warm-up decay min(1 - 1/(step + 1), decay): 0 at step 0, so the first update copies the student(s)."""
    return min(1.0 - 1.0 / (step + 1), decay)


def frozen(net: nn.Module) -> nn.Module:
    """``net`` as an EMA teacher: it learns only through EMA updates, never by gradients.

    SSL4MIS and UCMT build the teacher as one more randomly initialised network; the first EMA
    update (decay 0 at step 0) replaces its weights by the student's, so only step 0's targets
    come from the random weights.
    """
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@torch.no_grad()
def ema_update(teacher: nn.Module, students: Sequence[tuple[nn.Module, float]], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * sum_i w_i * student_i, over parameters.

    Buffers (BatchNorm running statistics) are not averaged: the teacher runs in train mode
    like its students, so its running statistics come from its own forward passes, which
    match its own weights (as in SSL4MIS, which averages parameters only).
    """
    params = [dict(s.named_parameters()) for s, _ in students]
    for name, t in teacher.named_parameters():
        mix = sum(w * p[name].detach() for p, (_, w) in zip(params, students))
        t.mul_(decay).add_(mix, alpha=1.0 - decay)


def ramp_weight(step: int, iterations: int, weight: float, fraction: float, stages: int = 0) -> float:
    """``weight`` x sigmoid ramp-up over the first ``fraction`` of the run.

    ``stages = 0``: the ramp advances every iteration. ``stages = n``: it advances in n equal
    stages, as SSL4MIS's 2D trainers do (``sigmoid_rampup(iter_num // 150, 200)``: 200 stages of 150
    iterations over its 30k-iteration run). Lengths are fractions of ``iterations``, so the shape
    is the same for any run length.
    """
    length = fraction * iterations
    if stages and length > 0:
        return weight * sigmoid_rampup(math.floor(step * stages / length), stages)
    return weight * sigmoid_rampup(step, round(length))


def require_unlabeled(ctx: MethodContext, method: str) -> None:
    """Refuse batches without unlabeled images: the consistency terms would average over nothing."""
    if ctx.train.labeled_batch >= ctx.train.batch_size:
        raise ConfigError(
            f"{method} needs unlabeled images in each batch: train.labeled_batch "
            f"({ctx.train.labeled_batch}) must be below train.batch_size ({ctx.train.batch_size})"
        )

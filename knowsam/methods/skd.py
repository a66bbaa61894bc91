"""The SKD plug-in: KnowSAM's SAM teacher and its distillation added to any baseline, as ``X+skd``.

X's ``train_step`` runs unchanged; the plug-in acts through the ``student_extra_loss`` hook,
which X calls once per student per iteration with that student's first, training forward
over ``batch.x`` (``knowsam.methods.base``), its main student (``X.main_student``) first:

1. at the main student's call, its logits, detached, are SAM's dense prompt, as KnowSAM prompts
   with the fused logits of its training forward, detached (official trainer.py:140, 152): no
   forward pass of its own;
2. SAM (adapters + learnable prompts, see ``knowsam.methods.sam_support``) predicts every image
   of the batch, through the same teacher path as ``knowsam``: the prompt heads see the whole
   batch at once, so their training-mode BatchNorm sees one batch as in the official code, and
   the image encoder and the mask decoder keep a graph for the labeled images only, the rows
   L_sam reads (as ``knowsam``'s default); CE + Dice on the labeled part updates SAM's trainable
   tensors with Adam, lr decaying linearly. The prompt is detached and SAM's logits are
   detached before they serve as targets: the two graphs are disjoint, as in KnowSAM;
3. every student's call, the main student's included, is answered with
   ``kd_weight * KD_T(student || SAM)`` over all its images, SAM's pre-update logits as targets:
   one KD term per student and iteration, as KnowSAM distils on its un-mixed pass only
   (trainer.py:174, 179; none in the mixed pass, 116-134).

``Skd`` is the plug-in, one class; ``with_skd(X)`` composes ``X+skd`` as a class whose bases are
``(Skd, X)``, so each of Skd's hooks runs first and hands over to X's through ``super()``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from knowsam import step_timing
from knowsam.data.batch import Batch
from knowsam.losses import kd_loss, soft_dice_loss
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.registry import register_plugin
from knowsam.methods.sam_support import (
    TeacherWeights,
    build_sam_teacher,
    linear_decay,
    sam_optimizer,
    teacher_forward,
    teacher_prediction,
)

SAM_OPTIMIZER = "skd_sam"  # the plug-in's optimiser among the method's; the base method never names it
SAM_STATE = "skd_sam"  # the plug-in's entry among the saved weights; no method has a network of that name


class Skd(Method):
    """The SKD plug-in; never instantiated alone (``with_skd`` puts it before a base method)."""

    base_name: str  # the base method's name, set by ``with_skd``

    def __init__(self, ctx: MethodContext, params: Any):
        super().__init__(ctx, params)
        self.sam, provenance = build_sam_teacher(ctx)
        self.teacher_weights = TeacherWeights(self.sam, provenance, self.name)
        if ctx.training:
            self.optimizers[SAM_OPTIMIZER] = sam_optimizer(self.sam, params.sam_lr)
        self._step: int | None = None  # the iteration under way; None outside train_step
        self._sam_logits: torch.Tensor | None = None  # SAM's view of the current batch.x
        self._kd_terms: dict[str, float] = {}  # per student, this iteration's KD term
        self._sam_loss = 0.0

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self._step, self._sam_logits, self._kd_terms = step, None, {}
        try:
            terms = super().train_step(batch, step)
        finally:
            self._step = self._sam_logits = None
        if not self._kd_terms:
            raise RuntimeError(f"{self.base_name} never called student_extra_loss: SKD cannot distil into it")
        kd = sum(self._kd_terms.values()) / len(self._kd_terms)
        return {**terms, "sam": self._sam_loss, "kd": kd}

    def _sam_step(self, batch: Batch, prompt: torch.Tensor) -> None:
        """SAM's update on ``batch`` prompted by ``prompt``; keeps its pre-update logits as KD targets."""
        # Set before every SAM update: the base method's set_lr rescales every optimiser, this one too.
        for group in self.optimizers[SAM_OPTIMIZER].param_groups:
            group["lr"] = linear_decay(self.p.sam_lr, self._step, self.ctx.iterations)
        n_l = batch.n_labeled
        # L_sam covers the labeled images: neither the encoder nor the decoder keeps a graph for the rest.
        logits = teacher_forward(self.sam, batch, prompt, n_l, n_l)
        labeled = logits[:n_l]
        loss = F.cross_entropy(labeled, batch.y_l) + soft_dice_loss(labeled.softmax(1), batch.y_l)
        self.update(loss, SAM_OPTIMIZER, backward_part=step_timing.TEACHER_BACKWARD)
        self._sam_logits = logits.detach()  # computed before the update: one SAM for every image
        self._sam_loss = loss.item()

    def student_extra_loss(self, student: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor | float:
        if self._step is None:
            raise RuntimeError("student_extra_loss called outside an SKD training step")
        if student in self._kd_terms:
            raise RuntimeError(f"{self.base_name} called student_extra_loss twice for {student} in one iteration")
        if student == self.main_student:
            self._sam_step(batch, logits.detach())
        elif self._sam_logits is None:
            raise RuntimeError(
                f"{self.base_name} called student_extra_loss for {student} before its main student "
                f"{self.main_student}: SAM has no dense prompt yet"
            )
        kd = kd_loss(logits, self._sam_logits, self.p.kd_temperature)
        self._kd_terms[student] = kd.item()
        return super().student_extra_loss(student, logits, batch) + self.p.kd_weight * kd

    def speed_modules(self) -> list[nn.Module]:
        return [*super().speed_modules(), self.sam]

    def train(self) -> None:
        super().train()
        self.sam.train()  # the prompt heads hold BatchNorm layers

    def eval(self) -> None:
        super().eval()
        self.sam.eval()

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, variant: str | None = None, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``variant="sam"``: SAM prompted by the main student's logits, as in training; else X's own."""
        if variant != "sam":
            return super().predict(x, variant, embeddings)
        return teacher_prediction(self.sam, x, self.nets[self.main_student](x), embeddings)

    # The trained SAM tensors travel with the weights (best.pt too), so the teacher row can be scored.
    def eval_state_dict(self) -> dict[str, Any]:
        return {**super().eval_state_dict(), SAM_STATE: self.teacher_weights.state()}

    def load_eval_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.teacher_weights.load(state.pop(SAM_STATE))
        super().load_eval_state_dict(state)

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), **self.teacher_weights.provenance}


@register_plugin("skd")
@functools.cache  # one class per base method, so get_method("mt+skd") is always the same class
def with_skd(base: type[Method]) -> type[Method]:
    """``base`` plus the SAM teacher, ``X+skd``; its params extend the base method's with ``SkdParams``."""
    return type(
        f"{base.__name__}WithSkd",
        (Skd, base),
        {
            "__module__": __name__,
            "name": f"{base.name}+skd",
            "base_name": base.name,
            "variants": (*base.variants, "sam"),  # the teacher's own prediction: a row of its own in every table
            "description": (
                f"{base.description}; + SKD: KnowSAM's SAM teacher (adapters, learnable prompts, "
                f"dense prompt: {base.main_student}'s training logits, detached) distilled into every student"
            ),
        },
    )

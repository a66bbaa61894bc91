"""The SKD plug-in: KnowSAM's SAM teacher and its distillation added to any baseline, as ``X+skd``.

Per training step, before the baseline's own step:

1. dense prompt = the baseline's main student (``X.main_student``) on ``batch.x``, in eval mode
   and without gradients, so the plug-in changes none of X's random draws or BatchNorm statistics;
2. SAM (adapters + learnable prompts, see ``knowsam.methods.sam_support``) predicts every image
   of the batch with the pre-update weights (labeled part with a graph, unlabeled part without);
   CE + Dice on the labeled part updates SAM's trainable tensors with Adam, lr decaying linearly;
3. SAM's detached logits over ``batch.x`` are cached, and X's ``train_step`` runs unchanged: each
   time a student calls the ``student_extra_loss`` hook, the plug-in returns
   ``kd_weight * KD_T(student || SAM)`` over all its images.

Methods whose update sees moved pixels (UCMT's mixed pass) expose ``align_to_update(student,
map)``; the cached SAM logits go through it, so the distillation target is mixed with the same
patches as the method's own pseudo-labels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from knowsam.errors import KnowsamError
from knowsam.losses import kd_loss, soft_dice_loss
from knowsam.methods.base import Batch, Method, MethodContext
from knowsam.methods.registry import register_plugin
from knowsam.methods.sam_support import (build_sam_teacher, frozen_fingerprint, linear_decay, load_trained_state,
                                         sam_optimizer, trained_state)

SKD_FIELDS = (
    ("kd_temperature", float, 10.0),  # KnowSAM's T
    ("kd_weight", float, 1.0),  # weight of the KD term in each student's loss
    ("sam_lr", float, 1e-4),  # Adam lr of SAM's adapters and prompt heads, decayed linearly to 0
)


@register_plugin("skd")
@functools.cache  # one class per base method, so get_method("mt+skd") is always the same class
def with_skd(base: type[Method]) -> type[Method]:
    """``base`` plus the SAM teacher; its Params extend ``base.Params`` with :data:`SKD_FIELDS`."""
    params_cls = dataclasses.make_dataclass("Params", [(n, t, dataclasses.field(default=d)) for n, t, d in SKD_FIELDS],
                                            bases=(base.Params,), frozen=True)

    class WithSkd(base):  # type: ignore[valid-type,misc]
        name = f"{base.name}+skd"
        description = (f"{base.description}; + SKD: KnowSAM's SAM teacher (adapters, learnable prompts, "
                       f"dense prompt from {base.main_student}) distilled into every student")
        Params = params_cls

        def __init__(self, ctx: MethodContext, params: Any):
            super().__init__(ctx, params)
            self.sam, self.sam_provenance = build_sam_teacher(ctx)
            self.sam_opt = sam_optimizer(self.sam, params.sam_lr) if ctx.training else None
            self._sam_logits: torch.Tensor | None = None  # SAM's view of the current batch.x
            self._kd_terms: list[float] = []
            self._frozen_sha256: str | None = None

        def train_step(self, batch: Batch, step: int) -> dict[str, float]:
            sam_loss = self._sam_step(batch, step)
            self._kd_terms = []
            try:
                terms = super().train_step(batch, step)
            finally:
                self._sam_logits = None
            if not self._kd_terms:
                raise RuntimeError(f"{base.name} never called student_extra_loss: SKD cannot distil into it")
            return {**terms, "sam": sam_loss, "kd": sum(self._kd_terms) / len(self._kd_terms)}

        @torch.no_grad()
        def _dense_prompt(self, x: torch.Tensor) -> torch.Tensor:
            net = self.nets[base.main_student]
            net.eval()  # no dropout draws, no BatchNorm update: X's own step stays as without SKD
            try:
                return net(x)
            finally:
                net.train()

        def _sam_step(self, batch: Batch, step: int) -> float:
            for group in self.sam_opt.param_groups:
                group["lr"] = linear_decay(self.p.sam_lr, step, self.ctx.iterations)
            n_l = batch.n_labeled
            prompt = self._dense_prompt(batch.x)
            with torch.no_grad():  # before the update: every image is seen by the same SAM
                unlabeled = self.sam(batch.x_u, prompt[n_l:]) if len(batch.x_u) else None
            labeled = self.sam(batch.x_l, prompt[:n_l])
            loss = F.cross_entropy(labeled, batch.y_l) + soft_dice_loss(labeled.softmax(1), batch.y_l)
            self.sam_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.sam_opt.step()
            parts = [labeled.detach()] + ([unlabeled] if unlabeled is not None else [])
            self._sam_logits = torch.cat(parts)
            return loss.item()

        def student_extra_loss(self, student: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor | float:
            if self._sam_logits is None:
                raise RuntimeError("student_extra_loss called outside an SKD training step")
            kd = kd_loss(logits, self.align_to_update(student, self._sam_logits), self.p.kd_temperature)
            self._kd_terms.append(kd.item())
            return super().student_extra_loss(student, logits, batch) + self.p.kd_weight * kd

        def train(self) -> None:
            super().train()
            self.sam.train()  # the prompt heads hold BatchNorm layers

        def eval(self) -> None:
            super().eval()
            self.sam.eval()

        def _frozen(self) -> str:
            """Fingerprint of the frozen SAM weights (not saved): computed once, they never change."""
            if self._frozen_sha256 is None:
                self._frozen_sha256 = frozen_fingerprint(self.sam)
            return self._frozen_sha256

        def state_dict(self) -> dict[str, Any]:
            return {**super().state_dict(), "sam": {"trained": trained_state(self.sam),
                                                    "optimizer": self.sam_opt.state_dict(),
                                                    "frozen_sha256": self._frozen()}}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            super().load_state_dict(state)
            sam = state["sam"]
            if sam["frozen_sha256"] != self._frozen():
                raise KnowsamError(f"{self.name}: the saved run used other frozen SAM weights than the ones "
                                   f"loaded now ({self.sam_provenance['sam_weights']}); cannot resume")
            load_trained_state(self.sam, sam["trained"])
            self.sam_opt.load_state_dict(sam["optimizer"])

        def provenance(self) -> dict[str, Any]:
            return {**super().provenance(), **self.sam_provenance}

    WithSkd.__name__ = WithSkd.__qualname__ = f"{base.__name__}WithSkd"
    return WithSkd

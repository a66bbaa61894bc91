"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) in SSL4MIS's 2D form.

A student U-Net learns from labels and from an EMA teacher's softmax on noisy copies of the
unlabeled images, with SSL4MIS's schedule: no consistency for the first 1000 of its 30k iterations,
then a ramp that advances every 150 iterations (both kept as fractions of the run here).
Test time: the student (SSL4MIS evaluates the student, not the teacher).
"""

from __future__ import annotations

import torch

from knowsam.data.batch import Batch
from knowsam.losses import ce_dice_loss
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.ema import ema_decay, ema_update, frozen, ramp_weight, require_unlabeled
from knowsam.methods.params import MeanTeacherParams
from knowsam.methods.registry import register_method
from knowsam.models import build_model


@register_method
class MeanTeacher(Method):
    name = "mt"
    description = (
        "Mean Teacher: U-Net student + EMA teacher, softmax-MSE consistency on noisy unlabeled "
        "images (SSL4MIS 2D); the student predicts at test time"
    )
    accepts_plugins = ("skd",)
    main_student = "student"  # the network whose training logits a plug-in (SKD) takes as dense prompt
    reported_net = "student"

    def __init__(self, ctx: MethodContext, params: MeanTeacherParams):
        super().__init__(ctx, params)
        require_unlabeled(ctx, self.name)
        student = self.add_net("student", build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes))
        # SSL4MIS train_mean_teacher_2D.py:107-108: a second, randomly initialised network
        self.add_net("teacher", frozen(build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes)))
        self.sgd("student", student.parameters())

    def consistency_weight(self, step: int) -> float:
        """SSL4MIS's weight: the staged ramp, and nothing before iteration 1000 of its 30k
        (``consistency_start_fraction`` of the run here)."""
        p = self.p
        if step < round(p.consistency_start_fraction * self.ctx.iterations):
            return 0.0
        return ramp_weight(step, self.ctx.iterations, p.consistency, p.rampup_fraction, p.ramp_stages)

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        # SSL4MIS sets the rate after each step from the iteration just done (train_mean_teacher_2D.py:180-184),
        # so iteration t runs at the rate of t - 1.
        self.set_lr(max(step - 1, 0))
        p, n_l = self.p, batch.n_labeled
        student, teacher = self.nets["student"], self.nets["teacher"]
        logits = student(batch.x)
        sup = ce_dice_loss(logits[:n_l], batch.y_l)
        with torch.no_grad():
            noise = (torch.randn(batch.x_u.shape, generator=self.gen) * p.noise_std).clamp(-p.noise_clip, p.noise_clip)
            target = teacher(batch.x_u + noise.to(batch.x_u.device)).softmax(1)
        cons = ((logits[n_l:].softmax(1) - target) ** 2).mean()
        w = self.consistency_weight(step)
        loss = sup + w * cons + self.student_extra_loss("student", logits, batch)
        self.update(loss, "student")
        ema_update(teacher, [(student, 1.0)], ema_decay(step, p.ema_decay))
        return {"loss": loss.item(), "sup": sup.item(), "cons": cons.item(), "w_cons": w}

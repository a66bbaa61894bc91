"""Cross Pseudo Supervision (Chen et al., CVPR 2021) with the shared U-Net.

Two U-Nets of the same architecture but different initialisation; each is supervised by the
labels and by the other's hard (argmax) prediction: on every image of the batch, as in the CPS
paper (``pseudo_supervise_labeled``), or on the unlabeled images only, as SSL4MIS does. The pseudo
label is computed under ``no_grad``: a network learns from its peer, the peer is not pulled
towards it through the target. Test time: the first network (as SSL4MIS reports ``model1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from knowsam.data.batch import Batch
from knowsam.losses import ce_dice_loss
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.ema import ramp_weight, require_unlabeled
from knowsam.methods.params import CpsParams
from knowsam.methods.registry import register_method
from knowsam.models import build_model

NETS = ("net1", "net2")


@register_method
class CrossPseudoSupervision(Method):
    name = "cps"
    description = (
        "Cross Pseudo Supervision: two U-Nets (different init), each trained by the other's "
        "argmax (all images, or unlabeled only as in SSL4MIS); the first network predicts at test time"
    )
    accepts_plugins = ("skd",)
    main_student = "net1"
    reported_net = "net1"

    def __init__(self, ctx: MethodContext, params: CpsParams):
        super().__init__(ctx, params)
        if not params.pseudo_supervise_labeled:
            require_unlabeled(ctx, self.name)
        for name in NETS:  # built one after the other from the seeded RNG: different initial weights
            net = self.add_net(name, build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes))
            self.sgd(name, net.parameters())

    def pseudo_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard targets from a peer's logits, cut from the graph."""
        return logits.detach().argmax(1)

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self.set_lr(step)
        p, n_l = self.p, batch.n_labeled
        logits = [self.nets[name](batch.x) for name in NETS]
        first = 0 if p.pseudo_supervise_labeled else n_l  # the rows that get pseudo-supervision
        targets = [self.pseudo_labels(out[first:]) for out in logits]
        w = ramp_weight(step, self.ctx.iterations, p.cps_weight, p.rampup_fraction, p.ramp_stages)
        terms: dict[str, float] = {"w_cps": w}
        loss = torch.zeros((), device=batch.x.device)
        for i, name in enumerate(NETS):
            sup = ce_dice_loss(logits[i][:n_l], batch.y_l)
            cross = F.cross_entropy(logits[i][first:], targets[1 - i])
            loss = loss + sup + w * cross + self.student_extra_loss(name, logits[i], batch)
            terms[f"sup_{name}"], terms[f"cps_{name}"] = sup.item(), cross.item()
        self.update(loss, *NETS)
        return {"loss": loss.item(), **terms}

"""Supervised references: the labeled subset only (lower bound) and every label (upper bound)."""

from __future__ import annotations

from knowsam.data.batch import Batch
from knowsam.losses import ce_dice_loss
from knowsam.methods.base import Method
from knowsam.methods.registry import register_method
from knowsam.models import build_model


class _Supervised(Method):
    uses_unlabeled = False
    reported_net = "unet"

    def __init__(self, ctx, params):
        super().__init__(ctx, params)
        net = self.add_net("unet", build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes))
        self.sgd("unet", net.parameters())

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self.set_lr(step)
        loss = ce_dice_loss(self.nets["unet"](batch.x_l), batch.y_l)
        self.update(loss)
        return {"loss": loss.item()}


@register_method
class LabeledOnly(_Supervised):
    name = "labeled-only"
    description = "U-Net trained on the labeled subset only (the lower bound every SSL method must beat)"


@register_method
class FullySupervised(_Supervised):
    name = "fully-supervised"
    description = "U-Net trained with every training label (the upper bound; ignores the labeled ratio)"
    label_pool = "all"

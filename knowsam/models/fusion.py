"""KnowSAM's fusion module ("hybrid aggregation"; the official code calls it Discriminator).

It fuses the two sub-networks' logits into the output used at test time and as SAM's dense
prompt. Besides both logits and softmaxes it sees where the two disagree (XOR of their argmax
predictions) and how unsure each is (entropy), so it can learn whom to trust per pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from knowsam.errors import ConfigError
from knowsam.models.registry import register_model

HIDDEN = 64


def _normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy divided by log K, in [0, 1]; shape (B, 1, H, W)."""
    ent = -(prob * torch.log(prob.clamp_min(1e-8))).sum(dim=1, keepdim=True)
    return ent / math.log(prob.shape[1])


@register_model("fusion")
class Fusion(nn.Module):
    """(logits_a, logits_b) each (B, K, H, W) -> fused logits (B, K, H, W).

    Features: [logits_a, logits_b, prob_a, prob_b, xor, ent_a, ent_b] (4K + 3 channels), then
    two 3x3 conv + BatchNorm + ReLU layers and a 1x1 conv to K channels.

    ``official_output_activation=True`` keeps the official code's ending, BatchNorm +
    LeakyReLU(0.2) applied to the logits themselves. That is odd: negative logits are shrunk 5x
    and the logit scale follows batch statistics (running ones at test time), so the fused
    softmax is not a free function of the features. It is the default to reproduce the paper;
    False ends in the plain 1x1 conv, the usual segmentation head.
    """

    def __init__(self, num_classes: int, official_output_activation: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"fusion needs num_classes >= 2 (softmax over classes), got {num_classes}")
        layers: list[nn.Module] = [
            nn.Conv2d(4 * num_classes + 3, HIDDEN, 3, padding=1),
            nn.BatchNorm2d(HIDDEN),
            nn.ReLU(inplace=True),
            nn.Conv2d(HIDDEN, HIDDEN, 3, padding=1),
            nn.BatchNorm2d(HIDDEN),
            nn.ReLU(inplace=True),
            nn.Conv2d(HIDDEN, num_classes, 1),
        ]
        if official_output_activation:
            layers += [nn.BatchNorm2d(num_classes), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        prob_a, prob_b = logits_a.softmax(dim=1), logits_b.softmax(dim=1)
        xor = (logits_a.argmax(dim=1, keepdim=True) != logits_b.argmax(dim=1, keepdim=True)).to(logits_a.dtype)
        features = torch.cat(
            [logits_a, logits_b, prob_a, prob_b, xor, _normalised_entropy(prob_a), _normalised_entropy(prob_b)], dim=1
        )
        return self.net(features)

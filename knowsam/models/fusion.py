"""KnowSAM's fusion module ("hybrid aggregation"; the official code calls it Discriminator).

It fuses the two sub-networks' logits into the output used at test time and as SAM's dense
prompt. As in the official code (taozh2017/KnowSAM ``Model/discriminator.py`` 4-69, fed by
``Model/model.py`` 248-254) it has three branches at full resolution, one per kind of evidence:

* agreement: ``1 - XOR(p_a > 0.5, p_b > 0.5)`` per class (K channels), where the two agree;
* certainty: ``1 - [H_a, H_b]``, with H the natural-log entropy of each softmax (2 channels);
* logits: ``[z_a, z_b]`` (2K channels).

Each branch is a 3x3 conv to 16 channels and a 1x1 conv (to 16, 16 and 32); their concatenation
(64 channels) goes through a 3x3 conv to 64 and a 3x3 conv to K. Every conv is bias-free and
followed by BatchNorm + LeakyReLU(0.2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from knowsam.errors import ConfigError
from knowsam.models.registry import register_model

BRANCH_WIDTH = 16
HIDDEN = 64  # the three branches concatenated: 16 + 16 + 32
THRESHOLD = 0.5
ENTROPY_EPS = 1e-6  # inside the logarithm, as the official entropy map


def _conv_bn_act(in_ch: int, out_ch: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(0.2, inplace=True),
    ]


def _branch(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_act(in_ch, BRANCH_WIDTH, 3), *_conv_bn_act(BRANCH_WIDTH, out_ch, 1))


def entropy_map(prob: torch.Tensor) -> torch.Tensor:
    """Per-pixel natural-log entropy (B, 1, H, W) of class probabilities (B, K, H, W)."""
    return -(prob * torch.log(prob + ENTROPY_EPS)).sum(dim=1, keepdim=True)


@register_model("fusion")
class Fusion(nn.Module):
    """(logits_a, logits_b) each (B, K, H, W) -> fused logits (B, K, H, W).

    ``official_output_activation=True`` (the official code) ends with BatchNorm + LeakyReLU(0.2)
    on the logits themselves. That is odd: negative logits are shrunk 5x and the logit scale
    follows batch statistics (running ones at test time), so the fused softmax is not a free
    function of the features. False ends in a plain 3x3 conv with bias, the usual segmentation head.
    """

    def __init__(self, num_classes: int, official_output_activation: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"fusion needs num_classes >= 2 (softmax over classes), got {num_classes}")
        k = num_classes
        self.agreement = _branch(k, BRANCH_WIDTH)
        self.certainty = _branch(2, BRANCH_WIDTH)
        self.logits = _branch(2 * k, 2 * BRANCH_WIDTH)
        last = _conv_bn_act(HIDDEN, k, 3) if official_output_activation else [nn.Conv2d(HIDDEN, k, 3, padding=1)]
        self.head = nn.Sequential(*_conv_bn_act(HIDDEN, HIDDEN, 3), *last)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        prob_a, prob_b = logits_a.softmax(dim=1), logits_b.softmax(dim=1)
        agree = ((prob_a > THRESHOLD) == (prob_b > THRESHOLD)).to(logits_a.dtype)  # 1 - XOR
        certainty = 1 - torch.cat([entropy_map(prob_a), entropy_map(prob_b)], dim=1)
        features = torch.cat(
            [self.agreement(agree), self.certainty(certainty), self.logits(torch.cat([logits_a, logits_b], dim=1))],
            dim=1,
        )
        return self.head(features)

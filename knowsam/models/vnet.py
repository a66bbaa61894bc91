"""2D V-Net, KnowSAM's second sub-network (channels 16-32-64-128-256).

Deliberately unlike the U-Net so the two views disagree usefully in co-training: residual conv
stages without normalisation, strided-conv downsampling instead of pooling, transposed-conv
upsampling, and skips merged by element-wise sum instead of concatenation. Stage depths follow
V-Net (1, 2, 3, 3, 3 convs down; 3, 3, 2, 1 up).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from knowsam.models.registry import register_model

CHANNELS = (16, 32, 64, 128, 256)
ENCODER_CONVS = (1, 2, 3, 3, 3)
DECODER_CONVS = (3, 3, 2, 1)  # from the deepest decoder stage up


class ResidualStage(nn.Module):
    """``n`` 3x3 conv + ReLU at constant width, with the input added back before the last ReLU."""

    def __init__(self, channels: int, n: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            if i < n - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


def _down(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 2, stride=2), nn.ReLU(inplace=True))


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2), nn.ReLU(inplace=True))


@register_model("vnet")
class VNet(nn.Module):
    """Logits (B, num_classes, H, W) at input size; H and W must be divisible by 16.

    ``dropout`` (channel dropout at the bottleneck and before the head, as SSL4MIS's V-Net with
    ``has_dropout=True``) is 0.5 by default; 0 disables it.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        c = CHANNELS
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, padding=1), nn.ReLU(inplace=True))
        self.enc = nn.ModuleList(ResidualStage(c[i], ENCODER_CONVS[i]) for i in range(5))
        self.downs = nn.ModuleList(_down(c[i], c[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(_up(c[i + 1], c[i]) for i in reversed(range(4)))
        self.dec = nn.ModuleList(ResidualStage(c[3 - j], DECODER_CONVS[j]) for j in range(4))
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(c[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"V-Net input sides must be divisible by 16, got {tuple(x.shape[-2:])}")
        h = self.enc[0](self.stem(x))
        skips = [h]
        for down, stage in zip(self.downs, self.enc[1:]):
            h = stage(down(h))
            skips.append(h)
        h = self.dropout(skips.pop())
        for up, stage in zip(self.ups, self.dec):
            h = stage(up(h) + skips.pop())
        return self.head(self.dropout(h))

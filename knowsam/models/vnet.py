"""2D V-Net, KnowSAM's second sub-network (channels 16-32-64-128-256), as the official code runs it.

Built to match the network the official training forward evaluates (taozh2017/KnowSAM
``Model/model.py`` 115-148 and 211-246, blocks from ``Model/vnet.py`` 6-32): stages of plain
3x3 conv + ReLU (no residual sum, no normalisation, no dropout), 2x2 strided-conv downsampling
and transposed-conv upsampling each followed by ReLU, and skips that add the encoder's
*post-downsampling* tensors to the upsampled ones. Stage depths 1, 2, 3, 3 down, 3 at the
bottom, 3, 3, 2, 1 up; conv weights kaiming-normal. The result differs from the U-Net in every
building block, which is what co-training wants of the second view.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from knowsam.models.registry import register_model

CHANNELS = (16, 32, 64, 128, 256)
ENCODER_CONVS = (1, 2, 3, 3)  # the stage before each downsampling, full resolution first
DECODER_CONVS = (3, 3, 3, 2)  # the stage before each upsampling, the bottom (256 channels) first
LAST_CONVS = 1  # the full-resolution stage after the last upsampling


def _stage(in_ch: int, out_ch: int, n: int) -> nn.Sequential:
    """``n`` 3x3 conv + ReLU; the first changes the width."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _down(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 2, stride=2), nn.ReLU(inplace=True))


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2), nn.ReLU(inplace=True))


@register_model("vnet")
class VNet(nn.Module):
    """Logits (B, num_classes, H, W) at input size; H and W must be divisible by 16."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        c = CHANNELS
        self.enc = nn.ModuleList(_stage(in_channels if i == 0 else c[i], c[i], n) for i, n in enumerate(ENCODER_CONVS))
        self.downs = nn.ModuleList(_down(c[i], c[i + 1]) for i in range(4))
        self.dec = nn.ModuleList(_stage(c[4 - j], c[4 - j], n) for j, n in enumerate(DECODER_CONVS))
        self.ups = nn.ModuleList(_up(c[4 - j], c[3 - j]) for j in range(4))
        self.last = _stage(c[0], c[0], LAST_CONVS)
        self.head = nn.Conv2d(c[0], num_classes, 1)
        # The official V-Net re-initialises every conv weight (biases keep PyTorch's default).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"V-Net input sides must be divisible by 16, got {tuple(x.shape[-2:])}")
        h = self.enc[0](x)
        skips = [h]  # the first stage's output, then every downsampled tensor but the deepest
        for i, down in enumerate(self.downs):
            if i > 0:  # the first stage ran above: its output is the full-resolution skip
                h = self.enc[i](h)
            h = down(h)
            skips.append(h)
        h = skips.pop()
        for stage, up in zip(self.dec, self.ups):
            h = up(stage(h)) + skips.pop()
        return self.head(self.last(h))

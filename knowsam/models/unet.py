"""The 2D U-Net shared by every method (channels 16-32-64-128-256), with KnowSAM's transposed-conv decoder."""

from __future__ import annotations

import torch
import torch.nn as nn

from knowsam.models.registry import register_model

CHANNELS = (16, 32, 64, 128, 256)
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + LeakyReLU with dropout in between."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """Transposed-conv upsampling (as in training of the official code), concat skip, ConvBlock."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, skip_ch, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * skip_ch, out_ch, dropout=0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


@register_model("unet")
class UNet(nn.Module):
    """Encoder of four 2x downsamplings; input sides must be divisible by 16."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        c = CHANNELS
        self.inc = ConvBlock(in_channels, c[0], DROPOUT[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(c[i], c[i + 1], DROPOUT[i + 1])) for i in range(4)
        )
        self.ups = nn.ModuleList(UpBlock(c[i + 1], c[i], c[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(c[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            h = up(h, skips.pop())
        return self.head(h)

"""KnowSAM's bottleneck adapter, shared by the adapted image-encoder blocks and the adapted mask decoder."""

from __future__ import annotations

import torch
import torch.nn as nn


class Adapter(nn.Module):
    """Bottleneck dim -> dim/4 -> dim with GELU, optionally with its own skip connection.

    PyTorch's default Linear init, as the official adapter (``Model/common/adapter.py``): the
    adapted SAM does not start as the pretrained one, it starts where the official run starts.
    """

    def __init__(self, dim: int, skip: bool):
        super().__init__()
        self.skip = skip
        self.down = nn.Linear(dim, dim // 4)
        self.act = nn.GELU()
        self.up = nn.Linear(dim // 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x)))
        return x + out if self.skip else out

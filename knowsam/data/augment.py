"""Batched tensor augmentations (no per-image Python loops over pixels).

``weak_augment`` is shared by every method (flips, 90-degree rotations, brightness and
contrast), so baselines and KnowSAM see identical data. ``strong_augment`` is the
photometric perturbation used by methods that need two views of unlabeled images.
"""

from __future__ import annotations

import torch


def _per_image(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def weak_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                 jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random h/v flip, k*90 rotation and brightness/contrast jitter, per image, labels moved alike."""
    n = len(x)
    if n == 0:
        return x, y
    hflip = _per_image(gen, n) < 0.5
    vflip = _per_image(gen, n) < 0.5
    rot = torch.randint(0, 4, (n,), generator=gen)
    brightness = (torch.rand(n, generator=gen) * 2 - 1) * jitter
    contrast = 1 + (torch.rand(n, generator=gen) * 2 - 1) * jitter
    x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    y = torch.where(hflip[:, None, None], y.flip(-1), y)
    x = torch.where(vflip[:, None, None, None], x.flip(-2), x)
    y = torch.where(vflip[:, None, None], y.flip(-2), y)
    if x.shape[-1] == x.shape[-2]:  # square inputs only: rotations keep the shape
        xs, ys = [x], [y]
        for k in (1, 2, 3):
            xs.append(torch.rot90(x, k, (-2, -1)))
            ys.append(torch.rot90(y, k, (-2, -1)))
        x = torch.stack(xs)[rot, torch.arange(n)]
        y = torch.stack(ys)[rot, torch.arange(n)]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast[:, None, None, None] + mean + brightness[:, None, None, None]).clamp(0, 1)
    return x.contiguous(), y.contiguous()


def strong_augment(x: torch.Tensor, gen: torch.Generator, strength: float = 0.3,
                   noise: float = 0.05) -> torch.Tensor:
    """Photometric perturbation per image: brightness, contrast, gamma and Gaussian noise."""
    n = len(x)
    if n == 0:
        return x
    u = lambda: torch.rand(n, 1, 1, 1, generator=gen, device="cpu").to(x.device) * 2 - 1  # noqa: E731
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    out = (x - mean) * (1 + strength * u()) + mean + strength * 0.5 * u()
    gamma = torch.exp(strength * u())
    out = out.clamp(1e-6, 1) ** gamma
    out = out + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return out.clamp(0, 1)

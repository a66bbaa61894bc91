"""Where each pixel of an augmented training view came from, so that maps can follow the view.

A teacher that sees the un-augmented image (the frozen-encoder teacher with cached embeddings)
predicts in the image's own frame. Its logits must be moved exactly as the student's view was
moved before they can serve as a distillation target, and the student's logits moved back
before they can serve as its dense prompt. :class:`ViewGeometry` records, per row of a batch:

* a discrete part, exact: horizontal flip, then vertical flip, then ``rot`` quarter turns
  (``torch.rot90(x, rot, (-2, -1))``), the order both augmentations apply them in;
* an optional continuous warp applied after it: the backward map of albumentations' affine
  transforms and grid / elastic distortion, composed into one sampling map in pixel coordinates
  (``warp[b, y, x]`` = the (x, y) position of the flipped/rotated image that output pixel (x, y)
  shows), sampled with bilinear interpolation and reflect-101 borders as albumentations does;
  and its forward map ``unwarp`` (where in the view each pixel of the flipped/rotated image
  went), composed from each affine step's exact inverse and each distortion's numerical one.

Photometric changes (brightness, contrast, gamma, noise) and cut-out holes move no pixel and
are not recorded: the teacher does not see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Fixed-point steps to invert a distortion map (grid or elastic); those drawn here move pixels by a
# few percent of the image at most, where each step shrinks the error about fivefold. Affine steps,
# up to KnowSAM's strong random affine, are inverted exactly instead: the iteration diverges there.
INVERSE_STEPS = 12


@dataclass
class ViewGeometry:
    hflip: torch.Tensor  # (B,) bool
    vflip: torch.Tensor  # (B,) bool
    rot: torch.Tensor  # (B,) int64 in 0..3
    warp: torch.Tensor | None = None  # (B, S, S, 2) float32 pixel coordinates, or None: no warp in any row
    unwarp: torch.Tensor | None = None  # (B, S, S, 2) the warp's forward map; set with ``warp``

    @staticmethod
    def identity(n: int) -> ViewGeometry:
        no = torch.zeros(n, dtype=torch.bool)
        return ViewGeometry(no, no.clone(), torch.zeros(n, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.rot)

    def __getitem__(self, rows: slice) -> ViewGeometry:
        warp = None if self.warp is None else self.warp[rows]
        unwarp = None if self.unwarp is None else self.unwarp[rows]
        return ViewGeometry(self.hflip[rows], self.vflip[rows], self.rot[rows], warp, unwarp)

    @staticmethod
    def cat(parts: list[ViewGeometry]) -> ViewGeometry:
        parts = [p for p in parts if len(p)]
        if not parts:
            return ViewGeometry.identity(0)
        warp = unwarp = None
        if any(p.warp is not None for p in parts):
            size = next(p.warp.shape[1] for p in parts if p.warp is not None)
            warp = torch.cat([p.warp if p.warp is not None else identity_map(len(p), size) for p in parts])
            unwarp = torch.cat([p.unwarp if p.warp is not None else identity_map(len(p), size) for p in parts])
        return ViewGeometry(
            torch.cat([p.hflip for p in parts]),
            torch.cat([p.vflip for p in parts]),
            torch.cat([p.rot for p in parts]),
            warp,
            unwarp,
        )

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Move maps (B, C, S, S) from the image's own frame to the augmented view (differentiable)."""
        t = _per_row(t, self.hflip, lambda u: u.flip(-1))
        t = _per_row(t, self.vflip, lambda u: u.flip(-2))
        t = torch.stack([torch.rot90(u, int(k), (-2, -1)) for u, k in zip(t, self.rot)]) if len(t) else t
        if self.warp is not None:
            t = sample(t, self.warp.to(t.device))
        return t

    def invert(self, t: torch.Tensor) -> torch.Tensor:
        """Move maps (B, C, S, S) from the augmented view back to the image's own frame.

        Exact for flips and rotations; a warp is undone by its forward map (exact for affine steps,
        numerical for distortions), and what the view never showed (beyond its borders) is filled
        by reflection.
        """
        if self.unwarp is not None:
            t = sample(t, self.unwarp.to(t.device))
        t = torch.stack([torch.rot90(u, -int(k), (-2, -1)) for u, k in zip(t, self.rot)]) if len(t) else t
        t = _per_row(t, self.vflip, lambda u: u.flip(-2))
        return _per_row(t, self.hflip, lambda u: u.flip(-1))


def _per_row(t: torch.Tensor, rows: torch.Tensor, op) -> torch.Tensor:
    return torch.where(rows.to(t.device).view(-1, *([1] * (t.ndim - 1))), op(t), t)


def identity_map(n: int, size: int) -> torch.Tensor:
    """(n, S, S, 2) pixel coordinates (x, y) of every pixel."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([xs, ys], -1).expand(n, size, size, 2).clone()


def reflect101(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Fold pixel coordinates into [0, S-1] by reflection about the edge pixels (OpenCV's BORDER_REFLECT_101)."""
    period = 2 * (size - 1)
    c = torch.remainder(coords, period)
    return torch.where(c > size - 1, period - c, c)


def sample(t: torch.Tensor, pixel_map: torch.Tensor) -> torch.Tensor:
    """out[b, :, y, x] = t[b, :, map[b, y, x, 1], map[b, y, x, 0]], bilinear, reflect-101 outside."""
    size = t.shape[-1]
    grid = (2 * reflect101(pixel_map, size) + 1) / size - 1  # pixel centres, align_corners=False
    return F.grid_sample(t, grid.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def invert_map(pixel_map: torch.Tensor) -> torch.Tensor:
    """Backward map of the inverse warp: for each pixel q, the p with map(p) = q (fixed-point iteration)."""
    n, size = pixel_map.shape[0], pixel_map.shape[1]
    target = identity_map(n, size)
    p = target.clone()
    channels_first = pixel_map.permute(0, 3, 1, 2)
    for _ in range(INVERSE_STEPS):
        at_p = F.grid_sample(
            channels_first, (2 * p + 1) / size - 1, mode="bilinear", padding_mode="border", align_corners=False
        ).permute(0, 2, 3, 1)
        p = p + (target - at_p)
    return p


def warp_from_albumentations(
    applied: list[tuple[str, dict]], size: int
) -> tuple[bool, bool, np.ndarray | None, np.ndarray | None]:
    """(hflip, vflip, warp, unwarp) from a ``Compose(save_applied_params=True)`` result's ``applied_transforms``.

    Flips are read in order; an affine step (``Affine``, ``ThreePointAffine``) contributes its
    matrix M (which maps source pixels to view pixels, as ``cv2.warpAffine``): backward map M^-1,
    forward map M; ``GridDistortion`` and ``ElasticTransform`` their ``map_x``/``map_y``
    (backward maps, as ``cv2.remap``), inverted numerically for the forward map. ``warp`` and
    ``unwarp`` are both None when nothing moved. Names this does not know are photometric or
    cut-out transforms: they move nothing.
    """
    hflip = vflip = False
    warp: np.ndarray | None = None
    unwarp: np.ndarray | None = None
    for name, params in applied:
        if name == "HorizontalFlip":
            if warp is not None:
                raise ValueError("a flip after a warp cannot be recorded as a ViewGeometry")
            hflip = not hflip
        elif name == "VerticalFlip":
            if warp is not None:
                raise ValueError("a flip after a warp cannot be recorded as a ViewGeometry")
            vflip = not vflip
        elif name in ("Affine", "ThreePointAffine"):
            matrix = np.asarray(params["matrix"], dtype=np.float64)
            warp = _compose_affine(warp, np.linalg.inv(matrix), size)
            unwarp = _positions(unwarp, size) @ matrix[:2, :2].T + matrix[:2, 2]
        elif name in ("GridDistortion", "ElasticTransform"):
            step = np.stack([params["map_x"], params["map_y"]], -1).astype(np.float64)
            warp = step if warp is None else _sample_map(warp, step)
            forward = invert_map(torch.from_numpy(step).float()[None])[0].double().numpy()
            unwarp = forward if unwarp is None else _displace(unwarp, forward)
    if warp is None:
        return hflip, vflip, None, None
    return hflip, vflip, warp.astype(np.float32), unwarp.astype(np.float32)


def _positions(previous: np.ndarray | None, size: int) -> np.ndarray:
    """The positions a next step moves: ``previous`` (a forward map), or every pixel's own."""
    return identity_map(1, size)[0].double().numpy() if previous is None else previous


def _displace(positions: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """forward(positions) for a distortion's forward map, by its displacement at each position.

    Positions beyond the image (affine steps move pixels out of the view) take the displacement
    of the nearest border pixel: a position is a place, not a pixel to fold back by reflection.
    """
    size = forward.shape[0]
    moved = torch.from_numpy(forward - _positions(None, size)).permute(2, 0, 1)[None].float()
    grid = torch.from_numpy(2 * positions + 1)[None].float() / size - 1
    shift = F.grid_sample(moved, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return positions + shift[0].permute(1, 2, 0).double().numpy()


def _compose_affine(warp: np.ndarray | None, inverse: np.ndarray, size: int) -> np.ndarray:
    """map(p) = previous(M^-1 p): the affine step comes after ``warp`` in the view."""
    moved = _positions(None, size) @ inverse[:2, :2].T + inverse[:2, 2]
    return moved if warp is None else _sample_map(warp, moved)


def _sample_map(previous: np.ndarray, step: np.ndarray) -> np.ndarray:
    """previous(step(p)): a later warp's backward map followed by the earlier one."""
    prev = torch.from_numpy(previous).permute(2, 0, 1)[None].float()
    out = sample(prev, torch.from_numpy(step)[None].float())
    return out[0].permute(1, 2, 0).double().numpy()

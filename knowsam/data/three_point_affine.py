"""The random affine part of albumentations 1.x's ``ElasticTransform(alpha_affine=...)``, for albumentations 2.

Albumentations 1.x's elastic transform first warped the image by a random affine, then displaced it
by a smoothed random field (``augmentations/geometric/functional.py:elastic_transform`` of 1.3.1):
three points, at the centre of the image plus (s, s), (s, -s) and (-s, -s) with
``s = min(H, W) // 3``, are each moved by ``uniform(-alpha_affine, alpha_affine)`` pixels in x and
in y, and the affine transform that maps the three points onto the moved ones warps the image
(bilinear for images, nearest for masks, the transform's border mode). Version 2 removed the
parameter, and its ``Affine`` draws scale, rotation, shear and translation independently, which
cannot give this distribution; so the transform is written here, with albumentations 2's own
random generator and affine warp, and records its ``matrix`` as ``Affine`` does.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric import functional as fgeometric


def anchor_points(height: int, width: int) -> np.ndarray:
    """The three (x, y) points of albumentations 1.x, written from ``(height, width)`` as 1.x does
    (so on a non-square image x and y use each other's centre, as they did there)."""
    centre = np.array((height, width), dtype=np.float32) // 2
    side = min(height, width) // 3
    return np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side], dtype=np.float32)


class ThreePointAffine(A.DualTransform):
    """Random affine mapping three anchor points onto copies moved by up to ``alpha_affine`` pixels."""

    def __init__(self, alpha_affine: float, border_mode: int = cv2.BORDER_REFLECT_101, p: float = 1.0):
        super().__init__(p=p)
        self.alpha_affine, self.border_mode = alpha_affine, border_mode

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        source = anchor_points(height, width)
        moved = source + self.random_generator.uniform(-self.alpha_affine, self.alpha_affine, size=source.shape).astype(
            np.float32
        )
        return {"matrix": np.vstack([cv2.getAffineTransform(source, moved), [0.0, 0.0, 1.0]])}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return fgeometric.warp_affine(img, matrix, cv2.INTER_LINEAR, 0, self.border_mode, img.shape[:2])

    def apply_to_mask(self, mask: np.ndarray, matrix: np.ndarray, **params: Any) -> np.ndarray:
        return fgeometric.warp_affine(mask, matrix, cv2.INTER_NEAREST, 0, self.border_mode, mask.shape[:2])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha_affine", "border_mode")

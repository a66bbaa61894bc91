"""What the training stream hands a method each iteration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knowsam.data.geometry import ViewGeometry


@dataclass
class Batch:
    """One training batch: weakly augmented labeled images + labels, and unlabeled images.

    Images are float in [0, 1], shape (B, C, H, W); labels are class ids (B, H, W), int64.
    ``x_u`` has zero rows for methods that do not use unlabeled data.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor
    # Only for a frozen-encoder SAM teacher (sam.encoder: cached), rows in ``x`` order: the cached
    # embedding of each row's un-augmented image, and how the augmentation moved each row's pixels.
    teacher_embeddings: torch.Tensor | None = None
    geometry: ViewGeometry | None = None

    @property
    def x(self) -> torch.Tensor:
        """Labeled then unlabeled images, the order every method's indices rely on."""
        return torch.cat([self.x_l, self.x_u]) if len(self.x_u) else self.x_l

    @property
    def n_labeled(self) -> int:
        return len(self.x_l)

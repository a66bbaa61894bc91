"""Loss terms shared by methods. Each is checked against an independent computation in tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, K, H, W) float one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean over classes of the batch-pooled soft Dice (SSL4MIS's DiceLoss convention).

    ``target`` is either class ids (B, H, W) or per-class targets shaped like ``probs``.
    """
    if target.dim() == probs.dim() - 1:
        target = one_hot(target, probs.shape[1])
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(CE + soft Dice) / 2, the supervised loss of SSL4MIS's 2D trainers."""
    return 0.5 * (F.cross_entropy(logits, labels) + soft_dice_loss(logits.softmax(1), labels))


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t/L)^2), the consistency ramp-up of Laine & Aila used across SSL4MIS."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0), length) / length
    return float(torch.exp(torch.tensor(-5.0 * phase * phase)))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation: T^2 x mean over pixels of KL(teacher_T || student_T), classes on dim 1.

    The teacher is detached here so callers cannot leak gradients into it by accident.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
    return kl.mean() * temperature * temperature


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the Shannon entropy of softmax(logits), normalised by log K to [0, 1]."""
    log_p = F.log_softmax(logits, dim=1)
    ent = -(log_p.exp() * log_p).sum(1)
    return ent.mean() / torch.log(torch.tensor(float(logits.shape[1])))

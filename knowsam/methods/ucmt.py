"""UCMT (Shen et al., IJCAI 2023): collaborative mean teacher with uncertainty-guided mixing (UMIX).

Two students and one EMA teacher averaged from both. Each student sees its own photometric view
of the unlabeled images and learns from the teacher's and the other student's hard predictions;
UMIX then builds, per student, a view whose most uncertain patches are replaced by the other
view's most certain ones, labels moved with the same patches, for a second update.
Backbone: the shared U-Net (the paper uses DeepLabv3+), so every baseline differs only in method.
Test time: student 1, the network the teacher follows most closely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from knowsam.data.augment import strong_augment
from knowsam.data.batch import Batch
from knowsam.errors import ConfigError
from knowsam.losses import ce_dice_loss, soft_dice_loss
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.ema import ema_decay, ema_update, make_teacher, ramp_weight, require_unlabeled
from knowsam.methods.params import UcmtParams
from knowsam.methods.registry import register_method
from knowsam.models import build_model

STUDENTS = ("student1", "student2")


def _to_patches(t: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, H/grid, W/grid), patches in row-major order."""
    b, c, h, w = t.shape
    ph, pw = h // grid, w // grid
    return t.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)


def _from_patches(p: torch.Tensor, grid: int) -> torch.Tensor:
    b, _, c, ph, pw = p.shape
    return p.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * ph, grid * pw)


@dataclass(frozen=True)
class PatchMix:
    """Per image b and rank j, the patch at ``dest[b, j]`` becomes the donor's patch at ``src[b, j]``."""

    grid: int
    dest: torch.Tensor  # (B, k) flat patch indices, row-major over the grid
    src: torch.Tensor  # (B, k)

    def apply(self, base: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
        """Mix images (B, C, H, W), per-class maps, or label maps (B, H, W) alike, in one indexing op."""
        labels = base.dim() == 3
        if labels:
            base, donor = base[:, None], donor[:, None]
        out = _to_patches(base, self.grid).clone()
        rows = torch.arange(len(out), device=out.device)[:, None]
        out[rows, self.dest] = _to_patches(donor, self.grid)[rows, self.src]
        out = _from_patches(out, self.grid)
        return out[:, 0] if labels else out


def patch_grid(size: int, grid: int, min_patch: int) -> int:
    """``grid`` patches per side, fewer for small images so a patch keeps at least ``min_patch`` pixels."""
    g = max(1, min(grid, size // min_patch))
    while size % g:  # patches must tile the image exactly
        g -= 1
    return g


def plan_mix(uncertainty_dest: torch.Tensor, uncertainty_src: torch.Tensor, grid: int, k: int) -> PatchMix:
    """The k most uncertain patches of the destination view, paired by rank with the donor view's
    k least uncertain ones; uncertainty maps are (B, H, W), averaged over each patch."""
    size = uncertainty_dest.shape[-1] // grid
    dest = F.avg_pool2d(uncertainty_dest[:, None], size).flatten(1)
    src = F.avg_pool2d(uncertainty_src[:, None], size).flatten(1)
    return PatchMix(grid, dest.topk(k, dim=1).indices, src.topk(k, dim=1, largest=False).indices)


def mean_entropy(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pixel-wise entropy (B, H, W) of the mean of two class-probability maps (B, K, H, W)."""
    m = 0.5 * (p + q)
    return -(m * torch.log(m.clamp_min(1e-8))).sum(1)


@register_method
class UCMT(Method):
    name = "ucmt"
    description = ("UCMT: two students + EMA teacher, cross/teacher hard pseudo-labels on two photometric "
                   "views, uncertainty-guided patch mixing (UMIX) and a second update; shared U-Net "
                   "instead of the paper's DeepLabv3+; student 1 predicts at test time")
    accepts_plugins = ("skd",)
    main_student = "student1"
    reported_net = "student1"

    def __init__(self, ctx: MethodContext, params: UcmtParams):
        super().__init__(ctx, params)
        require_unlabeled(ctx, self.name)
        for name in STUDENTS:
            net = self.add_net(name, build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes))
            self.sgd(name, net.parameters())
        self.add_net("teacher", make_teacher(self.nets["student1"]))
        self.grid = patch_grid(ctx.image_size, params.umix_grid, params.umix_min_patch)
        if not 1 <= params.umix_topk <= self.grid ** 2:
            raise ConfigError(f"ucmt: umix_topk = {params.umix_topk} must be in [1, {self.grid ** 2}] "
                              f"(a {self.grid}x{self.grid} patch grid at {ctx.image_size} px)")
        self._mixes: dict[str, PatchMix] | None = None  # set only during the mixed update

    def align_to_update(self, student: str, per_pixel: torch.Tensor) -> torch.Tensor:
        """Move a plug-in's per-pixel map over ``batch.x`` the way this update moved ``student``'s images.

        Both views are photometric copies of the same images, so the mix is a patch permutation
        within each image: applying it to a map of the un-augmented batch gives the map of the
        mixed view. Identity outside the mixed update.
        """
        if self._mixes is None:
            return per_pixel
        mix = self._mixes[student]
        n_l = len(per_pixel) - len(mix.dest)
        unlabeled = per_pixel[n_l:]
        return torch.cat([per_pixel[:n_l], mix.apply(unlabeled, unlabeled)])

    def _update(self, batch: Batch, views: list[torch.Tensor], teacher_targets: list[torch.Tensor],
                peer_targets: list[torch.Tensor] | None,
                w: float) -> tuple[list[torch.Tensor], float, dict[str, float]]:
        """One optimisation step of both students; returns their logits (labeled then view), loss and terms.

        ``peer_targets=None``: each student learns from the other's argmax in this same forward pass.
        """
        n_l = batch.n_labeled
        logits = [self.nets[s](torch.cat([batch.x_l, v])) for s, v in zip(STUDENTS, views)]
        if peer_targets is None:
            peer_targets = [logits[1 - i][n_l:].detach().argmax(1) for i in range(2)]
        loss = torch.zeros((), device=batch.x.device)
        terms: dict[str, float] = {}
        for i, name in enumerate(STUDENTS):
            sup = ce_dice_loss(logits[i][:n_l], batch.y_l)
            prob_u = logits[i][n_l:].softmax(1)
            unsup = soft_dice_loss(prob_u, teacher_targets[i]) + soft_dice_loss(prob_u, peer_targets[i])
            loss = loss + sup + w * unsup + self.student_extra_loss(name, logits[i], batch)
            terms[f"sup_{name}"], terms[f"unsup_{name}"] = sup.item(), unsup.item()
        self.update(loss, *STUDENTS)
        return logits, loss.item(), terms

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self.set_lr(step)
        p, n_l = self.p, batch.n_labeled
        w = ramp_weight(step, self.ctx.iterations, p.consistency, p.rampup_fraction)
        with torch.no_grad():
            views = [strong_augment(batch.x_u, self.gen) for _ in STUDENTS]
            teacher_prob = self.nets["teacher"](batch.x_u).softmax(1)
        teacher_label = teacher_prob.argmax(1)

        logits, loss_plain, first = self._update(batch, views, [teacher_label] * 2, None, w)
        probs = [out[n_l:].detach().softmax(1) for out in logits]
        labels = [prob.argmax(1) for prob in probs]
        uncertainty = [mean_entropy(prob, teacher_prob) for prob in probs]
        mixes = [plan_mix(uncertainty[i], uncertainty[1 - i], self.grid, p.umix_topk) for i in range(2)]
        mixed_views = [mixes[i].apply(views[i], views[1 - i]) for i in range(2)]
        # Pseudo-labels move with the pixels: both views share their geometry, so the teacher's and
        # the peer's labels of a donor patch are those at its source position.
        teacher_mixed = [mixes[i].apply(teacher_label, teacher_label) for i in range(2)]
        peer_mixed = [mixes[i].apply(labels[1 - i], labels[1 - i]) for i in range(2)]
        self._mixes = dict(zip(STUDENTS, mixes))
        try:
            _, loss_mix, second = self._update(batch, mixed_views, teacher_mixed, peer_mixed, w)
        finally:
            self._mixes = None
        s1, s2 = (self.nets[s] for s in STUDENTS)
        ema_update(self.nets["teacher"], [(s1, p.student1_share), (s2, 1.0 - p.student1_share)],
                   ema_decay(step, p.ema_decay))
        return {"loss": loss_plain + loss_mix, "loss_plain": loss_plain, "loss_mix": loss_mix, "w_unsup": w,
                **first, **{f"{k}_mix": v for k, v in second.items()}}

"""UCMT (Shen et al., IJCAI 2023): collaborative mean teacher with uncertainty-guided mixing (UMIX).

Two students and one EMA teacher averaged from both, as in the official ``train.py``. Each
iteration makes two optimisation steps of both students, each followed by an EMA update:

1. Students see the labeled images and their own photometric view of the unlabeled ones (view A1
   for student 1, A2 for student 2); the teacher sees the un-augmented images. Each student learns
   from the labels and from the teacher's and the other student's hard predictions.
2. UMIX builds one mixed image per sample from view A1, labeled and unlabeled alike: patches move
   in both directions between the two students' most uncertain and least uncertain positions. Both
   students train on it; labels move with the patches (ground truth for labeled images, the
   teacher's first-pass prediction for unlabeled ones), and the peer's pseudo-labels are
   re-estimated on the mixed image.

Every loss is a per-image Dice (official ``DSCLoss`` at ``inter_weight`` 1). Backbone: the shared
U-Net (the paper uses DeepLabv3+), so every baseline differs only in method.
Test time: the EMA teacher, the network the official code saves and evaluates; by default the
weights with the best validation Dice, with ``select: train-loss`` the official rule (the lowest
mean loss of the mixed update over an evaluation window). Unlabeled rows are drawn, as
officially, from every training image (``unlabeled_pool``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from knowsam.data.augment import strong_augment
from knowsam.data.batch import Batch
from knowsam.errors import ConfigError
from knowsam.losses import ce_dice_loss, one_hot
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.ema import ema_decay, ema_update, frozen, ramp_weight, require_unlabeled
from knowsam.methods.params import UcmtParams
from knowsam.methods.registry import register_method
from knowsam.models import build_model

STUDENTS = ("student1", "student2")


def per_image_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice of softmax(logits) against class ids, per image and class, then averaged.

    The denominator is ``sum p + sum t`` (not squared), as in UCMT's ``DSCLoss``; unlike the
    batch-pooled Dice of SSL4MIS, every image weighs the same whatever its foreground size.
    """
    probs = logits.softmax(1)
    target = one_hot(labels, probs.shape[1])
    inter = (probs * target).sum((2, 3))
    denom = probs.sum((2, 3)) + target.sum((2, 3))
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def _to_patches(t: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, H/grid, W/grid), patches in row-major order."""
    b, c, h, w = t.shape
    ph, pw = h // grid, w // grid
    return t.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)


def _from_patches(p: torch.Tensor, grid: int) -> torch.Tensor:
    b, _, c, ph, pw = p.shape
    return p.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * ph, grid * pw)


@dataclass(frozen=True)
class PatchMove:
    """Per image b and rank j, the patch at ``dest[b, j]`` becomes the one at ``src[b, j]`` of the same image."""

    grid: int
    dest: torch.Tensor  # (B, k) flat patch indices, row-major over the grid
    src: torch.Tensor  # (B, k)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Move patches of images (B, C, H, W), per-class maps, or label maps (B, H, W) alike."""
        labels = t.dim() == 3
        patches = _to_patches(t[:, None] if labels else t, self.grid)
        out = patches.clone()
        rows = torch.arange(len(out), device=out.device)[:, None]
        out[rows, self.dest] = patches[rows, self.src]
        out = _from_patches(out, self.grid)
        return out[:, 0] if labels else out


@dataclass(frozen=True)
class Umix:
    """UMIX's two moves, applied in order: the second reads the image the first produced (as the
    official in-place loop does), so where both write the same patch the second wins."""

    moves: tuple[PatchMove, PatchMove]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        for move in self.moves:
            t = move.apply(t)
        return t


def patch_grid(size: int, grid: int, min_patch: int) -> int:
    """``grid`` patches per side, fewer for small images so a patch keeps at least ``min_patch`` pixels."""
    g = max(1, min(grid, size // min_patch))
    while size % g:  # patches must tile the image exactly
        g -= 1
    return g


def plan_umix(uncertainty1: torch.Tensor, uncertainty2: torch.Tensor, grid: int, k: int) -> Umix:
    """UMIX from the two students' uncertainty maps (B, H, W), averaged over each patch.

    First move: student 1's k most uncertain patches receive student 2's k least uncertain ones;
    second move: the other way round. Pairing by rank follows the official descending sort: the
    j-th most uncertain destination takes the source at position L - k + j of that sort.
    """
    size = uncertainty1.shape[-1] // grid
    order = [
        F.avg_pool2d(u[:, None], size).flatten(1).sort(dim=1, descending=True).indices
        for u in (uncertainty1, uncertainty2)
    ]
    return Umix(
        (PatchMove(grid, order[0][:, :k], order[1][:, -k:]), PatchMove(grid, order[1][:, :k], order[0][:, -k:]))
    )


def mean_entropy(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pixel-wise entropy (B, H, W) of the mean of two class-probability maps (B, K, H, W)."""
    m = 0.5 * (p + q)
    return -(m * torch.log(m + 1e-6)).sum(1)  # the official offset, so patch rankings tie-break alike


@register_method
class UCMT(Method):
    name = "ucmt"
    description = (
        "UCMT: two students + EMA teacher, cross/teacher hard pseudo-labels on photometric "
        "views, uncertainty-guided patch mixing (UMIX) of labeled and unlabeled images for a "
        "second update, per-image Dice losses; shared U-Net instead of the paper's DeepLabv3+; "
        "the EMA teacher predicts at test time"
    )
    accepts_plugins = ("skd",)
    main_student = "student1"
    reported_net = "teacher"

    def __init__(self, ctx: MethodContext, params: UcmtParams):
        super().__init__(ctx, params)
        require_unlabeled(ctx, self.name)
        for name in STUDENTS:
            net = self.add_net(name, build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes))
            self.sgd(name, net.parameters())
        # official train.py:116, 126: a third network, randomly initialised, then frozen
        self.add_net("teacher", frozen(build_model("unet", in_channels=ctx.in_channels, num_classes=ctx.num_classes)))
        self.grid = patch_grid(ctx.image_size, params.umix_grid, params.umix_min_patch)
        if not 1 <= params.umix_topk <= self.grid**2:
            raise ConfigError(
                f"ucmt: umix_topk = {params.umix_topk} must be in [1, {self.grid**2}] "
                f"(a {self.grid}x{self.grid} patch grid at {ctx.image_size} px)"
            )
        self.selection_loss = "loss_mix" if params.select == "train-loss" else None  # official train.py:356-358
        self.unlabeled_pool = params.unlabeled_pool  # official train.py:71 draws from the whole training set

    def _supervised(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce_dice_loss(logits, labels) if self.p.supervised_ce else per_image_dice_loss(logits, labels)

    def _update(
        self,
        batch: Batch,
        step: int,
        x_l: torch.Tensor,
        y_l: torch.Tensor,
        views: list[torch.Tensor],
        teacher_label: torch.Tensor,
        w: float,
        with_extra_loss: bool,
    ) -> tuple[list[torch.Tensor], float, dict[str, float]]:
        """One optimisation step of both students, then one EMA update of the teacher.

        ``views[i]``: student i's unlabeled images; ``teacher_label``: the teacher's targets for
        them. Each student's peer target is the other's argmax in this same forward pass.
        ``with_extra_loss``: the students' losses take a plug-in's term (``student_extra_loss``),
        which needs logits over ``batch.x``: the first update's. Returns each student's logits
        over the batch (labeled, then its view), the loss and its terms.
        """
        nets = [self.nets[s] for s in STUDENTS]
        # Labeled and unlabeled images in separate passes, as the official does: BatchNorm normalises each apart.
        out_l = [net(x_l) for net in nets]
        out_u = [net(v) for net, v in zip(nets, views)]
        loss = torch.zeros((), device=x_l.device)
        terms: dict[str, float] = {}
        for i, name in enumerate(STUDENTS):
            sup = self._supervised(out_l[i], y_l)
            cps = per_image_dice_loss(out_u[i], out_u[1 - i].detach().argmax(1))
            cmt = per_image_dice_loss(out_u[i], teacher_label)
            logits = torch.cat([out_l[i], out_u[i]])
            extra = self.student_extra_loss(name, logits, batch) if with_extra_loss else 0.0
            loss = loss + sup + w * 0.5 * (cps + cmt) + extra
            terms[f"sup_{name}"], terms[f"cps_{name}"], terms[f"cmt_{name}"] = sup.item(), cps.item(), cmt.item()
        self.update(loss, *STUDENTS)
        ema_update(
            self.nets["teacher"],
            [(nets[0], self.p.student1_share), (nets[1], 1.0 - self.p.student1_share)],
            ema_decay(step, self.p.ema_decay),
        )
        return [torch.cat([lab, unl]).detach() for lab, unl in zip(out_l, out_u)], loss.item(), terms

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self.set_lr(step)
        p, n_l = self.p, batch.n_labeled
        w = ramp_weight(step, self.ctx.iterations, p.unsup_weight, p.rampup_fraction)
        teacher = self.nets["teacher"]
        with torch.no_grad():
            view_a1 = strong_augment(batch.x, self.gen)  # every image: UMIX mixes labeled ones too
            # The official dataset draws view A2 by augmenting A1 again, not the original image.
            view_a2 = strong_augment(view_a1[n_l:], self.gen)
            teacher_prob = torch.cat([teacher(batch.x_l), teacher(batch.x_u)]).softmax(1)
        teacher_label = teacher_prob[n_l:].argmax(1)

        # A plug-in's term (SKD's distillation) joins the first update only: its logits cover batch.x
        # (view A1 is photometric, pixel-aligned), so it comes once per student and iteration.
        logits, loss_plain, first = self._update(
            batch, step, batch.x_l, batch.y_l, [view_a1[n_l:], view_a2], teacher_label, w, with_extra_loss=True
        )
        with torch.no_grad():
            uncertainty = [mean_entropy(out.softmax(1), teacher_prob) for out in logits]
            umix = plan_umix(uncertainty[0], uncertainty[1], self.grid, p.umix_topk)
            mixed = umix.apply(view_a1)
            mixed_labels = umix.apply(torch.cat([batch.y_l, teacher_label]))
        _, loss_mix, second = self._update(
            batch,
            step,
            mixed[:n_l],
            mixed_labels[:n_l],
            [mixed[n_l:]] * 2,
            mixed_labels[n_l:],
            w,
            with_extra_loss=False,
        )
        return {
            "loss": loss_plain + loss_mix,
            "loss_plain": loss_plain,
            "loss_mix": loss_mix,
            "w_unsup": w,
            **first,
            **{f"{k}_mix": v for k, v in second.items()},
        }

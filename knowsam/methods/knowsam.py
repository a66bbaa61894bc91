"""KnowSAM: co-trained U-Net and V-Net, a fusion module, and an adapted SAM teacher prompted by them.

One step (docs/knowsam-options.md lists every option and the official-code defects):
SAM encodes the batch, the sub-networks and the fusion module predict, SAM decodes with learnable
sparse prompts and the fused logits (detached) as dense prompt. SAM learns from the labels
(CE + Dice); each sub-network learns from the labels, from SAM (distillation), from entropy
minimisation and from the other sub-network (consistency); the fusion module from the labels.
After ``mixed_iterations`` the least uncertain patches are swapped between labeled and unlabeled
images and the whole network (both sub-networks and the fusion module) is run again on the mixed
batch: supervised, entropy, consistency and a self-training term on the fused argmax, no
distillation (official trainer.py:116-134).

Loss forms follow the official code (trainer.py, utils/losses.py): supervised = CE + SSL4MIS's
soft Dice, weight 1 each; consistency = binary cross-entropy between the two sub-networks'
probabilities of the last class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from knowsam import step_timing
from knowsam.data.batch import Batch
from knowsam.errors import ConfigError
from knowsam.losses import entropy_loss, kd_loss, sigmoid_rampup, soft_dice_loss
from knowsam.methods.base import Method, MethodContext
from knowsam.methods.params import KnowSamParams, iterations_of
from knowsam.methods.registry import register_method
from knowsam.methods.sam_support import (
    TeacherWeights,
    build_sam_teacher,
    sam_optimizer,
    teacher_forward,
    teacher_prediction,
)
from knowsam.models import build_model

STUDENTS = ("unet", "vnet")


# --- loss terms (pure functions, each checked against an independent computation in tests) ----
def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + soft Dice (weights 1 and 1), as KnowSAM writes its supervised terms."""
    return F.cross_entropy(logits, labels) + soft_dice_loss(logits.softmax(1), labels)


def consistency_loss(probs: torch.Tensor, target_probs: torch.Tensor, all_classes: bool) -> torch.Tensor:
    """Official cross-consistency: BCE of ``probs`` against ``target_probs`` (softmaxes), last class only.

    The official loss (utils/losses.py:28-47) loops over the classes but keeps only the last
    BCE (defect 2); ``all_classes=True`` averages the per-class BCEs instead. At K = 2 both are
    the two-class soft cross-entropy H(target, probs); at K > 2 they differ. ``probs`` is
    clamped to [1e-8, 1 - 1e-7] as in the official code; ``target_probs`` is detached here.
    """
    # Written out rather than F.binary_cross_entropy, which CUDA autocast refuses (train.amp_bf16).
    # BCELoss's floor of -100 on the logarithms never acts: the clamp keeps them above -19.
    classes = slice(None) if all_classes else slice(-1, None)
    p, q = probs[:, classes].clamp(1e-8, 1 - 1e-7), target_probs[:, classes].detach()
    per_class = -(q * p.log() + (1 - q) * (1 - p).log()).mean((0, 2, 3))
    return per_class.mean()


def consistency_weight(step: int, span: int, weight: float, rampup: int) -> float:
    """weight * exp(-5 (1 - r)^2) with r = min(floor(t / (L / rampup)), rampup) / rampup.

    The ramp counts ``rampup`` "epochs" of L / rampup iterations each over its span of L iterations
    (official: the whole run, trainer.py:183); a span of 0 gives the full weight at once.
    """
    epoch = min(step * rampup // span, rampup) if span > 0 else rampup
    return weight * sigmoid_rampup(epoch, rampup)


def kd_two_class_official(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official KD (utils/losses.py:8-25, trainer.py:174): batch-mean KL x T^2 over rows of 2 values.

    The logits are flattened pixel by pixel and cut into rows of 2 whatever K is (defect 4). At
    K = 2 a row is a pixel's two classes, the usual KD; at K = 4 (the official ACDC runs) each
    pixel gives two rows, classes (0, 1) and (2, 3), each softmaxed on its own.
    """
    s = student.permute(0, 2, 3, 1).reshape(-1, 2)
    t = teacher.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
    return kl * temperature * temperature


def entropy_two_class_official(logits: torch.Tensor) -> torch.Tensor:
    """The official entropy (trainer.py:58-63): -sum p log(p + 1e-6) over the K classes, over log 2 whatever K is."""
    p = logits.softmax(1)
    return (-(p * torch.log(p + 1e-6)).sum(1) / math.log(2)).mean()


# --- uncertainty-guided mixing ------------------------------------------------------------------
def least_uncertain_patches(probs: torch.Tensor, grid: int, count: int) -> torch.Tensor:
    """Pixel mask (B, H, W) of each image's ``count`` patches (of a grid x grid split) with lowest mean entropy.

    Entropy as the official mixing computes it: -sum p log(p + 1e-6) (trainer.py:65-66).
    """
    b, _, h, w = probs.shape
    entropy = -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True)
    pooled = F.avg_pool2d(entropy, (h // grid, w // grid)).flatten(1)  # (B, grid*grid), row-major patches
    chosen = pooled.topk(count, dim=1, largest=False).indices
    cells = torch.zeros_like(pooled, dtype=torch.bool).scatter_(1, chosen, True).view(b, grid, grid)
    return cells.repeat_interleave(h // grid, 1).repeat_interleave(w // grid, 2)


def uncertainty_mix(
    x: torch.Tensor,
    y_l: torch.Tensor,
    pseudo: torch.Tensor,
    fused_probs: torch.Tensor,
    n_l: int,
    grid: int,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap least-uncertain patches between labeled and unlabeled images; returns (images, labels).

    ``x``, ``pseudo`` (SAM's argmax) and ``fused_probs`` cover the batch (labeled rows first).
    Labeled image j is paired with unlabeled image j mod n_u and unlabeled image i with labeled
    image i mod n_l: with equal counts that is the official one-to-one pairing, otherwise every
    image is still mixed. A labeled image takes its partner's content (and SAM pseudo-label) on
    its own least-uncertain patches; an unlabeled image takes its partner's content (and ground
    truth) on its own least-uncertain patches, SAM pseudo-label elsewhere (trainer.py:73-114).
    Output order: mixed labeled, then mixed unlabeled.
    """
    n_u = len(x) - n_l
    if n_l < 1 or n_u < 1:
        raise ValueError(f"mixing needs labeled and unlabeled images, got {n_l} and {n_u}")
    mask = least_uncertain_patches(fused_probs, grid, count)
    part_of_l = torch.arange(n_l, device=x.device) % n_u + n_l  # row of each labeled image's partner
    part_of_u = torch.arange(n_u, device=x.device) % n_l
    partner = torch.cat([part_of_l, part_of_u])
    labels = torch.cat([y_l, pseudo[n_l:]])  # every image's own labels: ground truth or SAM's argmax
    return torch.where(mask[:, None], x[partner], x), torch.where(mask, labels[partner], labels)


# --- the method ----------------------------------------------------------------------------------
@register_method
class KnowSam(Method):
    name = "knowsam"
    description = "KnowSAM: co-trained U-Net/V-Net + fusion, distilled from an adapted SAM prompted by their fusion"
    variants = ("sam",)
    curve_variants = STUDENTS
    augmentation = "weak-strong"  # the official dataloader (dataloader/dataset.py:139-147)

    def __init__(self, ctx: MethodContext, params: KnowSamParams):
        super().__init__(ctx, params)
        p = self.p
        if ctx.image_size % p.mix_grid:
            raise ConfigError(f"knowsam: image size {ctx.image_size} is not divisible by mix_grid {p.mix_grid}")
        self.validation_empty_score = 0.0 if p.validation_empty_zero else 1.0
        k, c = ctx.num_classes, ctx.in_channels
        for name in STUDENTS:
            self.add_net(name, build_model(name, in_channels=c, num_classes=k))
        fusion = build_model("fusion", num_classes=k, official_output_activation=p.fusion_official_activation)
        self.add_net("fusion", fusion)
        self.sgd("nets", [q for n in (*STUDENTS, "fusion") for q in self.nets[n].parameters()])
        sam, provenance = build_sam_teacher(ctx)
        self.add_net("sam", sam)
        self.teacher_weights = TeacherWeights(sam, provenance, self.name)
        if ctx.training:
            self.optimizers["sam"] = sam_optimizer(sam, p.sam_lr)
        # Mixing runs at iterations after this one (0-based), as the official ``iter_num > 12000``.
        self.mix_after = iterations_of(p.mixed_iterations, ctx.iterations)
        self.ramp_span = iterations_of(p.consistency_ramp_iterations, ctx.iterations)

    # --- pieces of a step -------------------------------------------------------------------
    # Outputs are cast to float32: under train.amp_bf16 the nets run in bfloat16, the losses in float32.
    def _students(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U-Net and V-Net logits (float32)."""
        u, v = self.nets["unet"](x), self.nets["vnet"](x)
        return u.float(), v.float()

    def _fuse(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.nets["fusion"](u, v).float()

    def _sam_logits(self, batch: Batch, fused: torch.Tensor) -> torch.Tensor:
        """SAM's per-class logits of ``batch.x``, with a graph only where L_sam (the labeled rows) needs one.

        The prompt heads always see the whole batch at once, so their BatchNorm sees the same
        batch statistics and every output is the same whatever the graph covers. The mask
        decoder couples no rows: the unlabeled rows are decoded without a graph (no output or
        gradient changes). The encoder (adapters) encodes the unlabeled images without a graph
        unless ``sam_full_graph``: through the heads' statistics, L_sam also reaches the encoder
        adapters via the unlabeled images, the official path that this drops.
        """
        n_l = batch.n_labeled
        encoder_rows = len(batch.x) if self.p.sam_full_graph else n_l
        return teacher_forward(self.nets["sam"], batch, fused.detach(), n_l, encoder_rows)

    def _kd(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.p.kd_entropy_form == "official-2class":
            return kd_two_class_official(student, teacher, self.p.kd_temperature)
        return kd_loss(student, teacher, self.p.kd_temperature)

    def _entropy(self, logits: torch.Tensor) -> torch.Tensor:
        if self.p.kd_entropy_form == "official-2class":
            return entropy_two_class_official(logits)
        return entropy_loss(logits)

    def _consistency(self, name: str, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """cons(N, M) of sub-network ``name`` (logits ``own``) against the other one (``other``, a target).

        Official defect 1 (trainer.py:177, utils/losses.py:39-47): the V-Net's term scores the
        U-Net's probabilities against the V-Net's, both detached, so it equals the U-Net's term
        in value and gives no gradient. ``vnet_consistency_grad`` scores the V-Net's own instead.
        """
        p_own, p_other = own.softmax(1), other.detach().softmax(1)
        if name == "vnet" and not self.p.vnet_consistency_grad:
            return consistency_loss(p_other, p_own.detach(), self.p.consistency_all_classes)
        return consistency_loss(p_own, p_other, self.p.consistency_all_classes)

    def _first_pass_terms(
        self, name: str, logits: torch.Tensor, other: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """A sub-network's terms on the batch (trainer.py:171-179); ``labels`` cover its first len(labels) rows."""
        return {
            "sup": supervised_loss(logits[: len(labels)], labels),
            "kd": self._kd(logits, teacher),
            "ent": self._entropy(logits),
            "cons": self._consistency(name, logits, other),
        }

    def _mixed_terms(
        self,
        name: str,
        logits: torch.Tensor,
        other: torch.Tensor,
        labels: torch.Tensor,
        fused_labels: torch.Tensor,
        n_l: int,
    ) -> dict[str, torch.Tensor]:
        """A sub-network's terms on the mixed batch (trainer.py:121-129): no distillation; ``self`` is
        self-training of the mixed unlabeled rows (from ``n_l`` on) on the fused argmax."""
        return {
            "sup": supervised_loss(logits, labels),
            "ent": self._entropy(logits),
            "cons": self._consistency(name, logits, other),
            "self": supervised_loss(logits[n_l:], fused_labels[n_l:]),
        }

    def _mixed_stage(
        self, x: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, fused: torch.Tensor, n_l: int, w: float
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The whole network again on the uncertainty-mixed batch: (each student's loss, logged terms)."""
        with torch.no_grad():
            xm, ym = uncertainty_mix(
                x, y, teacher.argmax(1), fused.detach().softmax(1), n_l, self.p.mix_grid, self.p.mix_patches
            )
        um, vm = self._students(xm)
        fm = self._fuse(um, vm)
        fused_labels = fm.detach().argmax(1)
        losses, logged = {}, {}
        for name, own, other in (("unet", um, vm), ("vnet", vm, um)):
            t = self._mixed_terms(name, own, other, ym, fused_labels, n_l)
            losses[name] = (
                t["sup"] + self.p.entropy_weight * t["ent"] + w * (t["cons"] + self.p.self_training_weight * t["self"])
            )
            logged.update({f"{name}_mix_{k}": term for k, term in t.items()})
        logged["fusion_mix"] = supervised_loss(fm, ym)
        return losses, logged

    def losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Every loss term of iteration ``step`` with its graph; ``sam`` (L_sam) and ``net`` (L_net) are optimised.

        L_net = (L_U + L_U,mix + L_V + L_V,mix)/2 + L_F + L_F,mix (trainer.py:190); before mixing
        starts, or without unlabeled images, the mixed terms are 0.
        """
        x, y, n_l = batch.x, batch.y_l, batch.n_labeled
        w = consistency_weight(step, self.ramp_span, self.p.consistency_weight, self.p.consistency_rampup)
        with step_timing.part(step_timing.STUDENTS):
            u, v = self._students(x)
        with step_timing.part(step_timing.FUSION):
            fused = self._fuse(u, v)
        sam_logits = self._sam_logits(batch, fused)
        teacher = sam_logits.detach()
        logged: dict[str, torch.Tensor] = {}
        for name, own, other in (("unet", u, v), ("vnet", v, u)):
            t = self._first_pass_terms(name, own, other, teacher, y)
            logged.update({f"{name}_{k}": term for k, term in t.items()})
            logged[name] = (
                t["sup"]
                + self.p.kd_weight * t["kd"]
                + self.p.entropy_weight * t["ent"]
                + w * t["cons"]
                + self.student_extra_loss(name, own, batch)
            )
        logged["fusion"] = supervised_loss(fused[:n_l], y)
        logged["sam"] = supervised_loss(sam_logits[:n_l], y)
        zero = torch.zeros((), device=x.device)
        # Fixed keys on every step (zeros before mixing), so the logged curves keep their columns.
        mixed = {f"{n}_mix_{k}": zero for n in STUDENTS for k in ("sup", "ent", "cons", "self")}
        mixed.update({"unet_mix": zero, "vnet_mix": zero, "fusion_mix": zero})
        if self.mixing_at(step) and len(batch.x_u):
            with step_timing.part(step_timing.MIXED_STAGE):
                students_mixed, terms = self._mixed_stage(x, y, teacher, fused, n_l, w)
            mixed.update(terms)
            mixed.update({f"{n}_mix": loss for n, loss in students_mixed.items()})
        logged.update(mixed)
        students = logged["unet"] + logged["unet_mix"] + logged["vnet"] + logged["vnet_mix"]
        logged["net"] = students / 2 + logged["fusion"] + logged["fusion_mix"]
        logged["cons_weight"] = torch.tensor(w)
        return logged

    def mixing_at(self, step: int) -> bool:
        """Whether iteration ``step`` (0-based) has the mixed stage: official ``iter_num > mixed_iterations``."""
        return step > self.mix_after and self.p.mix_patches > 0

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        # The official code sets both rates after each step from that step's index (trainer.py:205-211):
        # iteration t runs with lr (1 - (t - 1)/T), iteration 0 with lr.
        self.set_lr(max(step - 1, 0), power=1.0)
        terms = self.losses(batch, step)
        # The official two updates; the graphs are disjoint (SAM sees the fused logits detached, the
        # networks see SAM's output detached), so their order does not matter.
        self.update(terms["sam"], "sam", backward_part=step_timing.TEACHER_BACKWARD)
        self.update(terms["net"], "nets")
        out = {k: v.detach().item() for k, v in terms.items()}
        out["loss"] = out["sam"] + out["net"]
        return out

    # --- test time ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, variant: str | None = None, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fused prediction (softmax); ``variant="sam"``: SAM prompted by the fused logits, as in training."""
        if variant in self.curve_variants:
            return super().predict(x, variant)
        if variant not in (None, *self.variants):
            raise ValueError(f"knowsam: unknown variant {variant!r}; known: {', '.join(self.variants)}")
        fused = self._fuse(*self._students(x))
        if variant is None:
            return fused.softmax(1)
        return teacher_prediction(self.nets["sam"], x, fused, embeddings)

    # --- persistence: the frozen SAM is rebuilt, never saved -------------------------------
    def eval_state_dict(self) -> dict:
        nets = {k: v.state_dict() for k, v in self.nets.items() if k != "sam"}
        return {**nets, "sam": self.teacher_weights.state()}

    def load_eval_state_dict(self, state: dict) -> None:
        self.teacher_weights.load(state["sam"])
        for k in (*STUDENTS, "fusion"):
            self.nets[k].load_state_dict(state[k])

    def provenance(self) -> dict:
        return dict(self.teacher_weights.provenance)

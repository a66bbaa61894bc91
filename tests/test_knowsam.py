"""KnowSAM: gradients, every loss term against an independent computation, mixing, defect switches, training."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam

from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.errors import ConfigError, KnowsamError
from knowsam.losses import entropy_loss, kd_loss
from knowsam.methods import MethodContext, get_method
from knowsam.methods.knowsam import (
    KnowSam,
    consistency_loss,
    consistency_weight,
    entropy_two_class_official,
    kd_two_class_official,
    least_uncertain_patches,
    supervised_loss,
    uncertainty_mix,
)
from knowsam.methods.params import KnowSamParams
from knowsam.methods.sam_support import trained_state
from knowsam.models.sam_teacher import SamTeacher, build_sam_parts
from tests.conftest import polyp_images

NET_NAMES = ("unet", "vnet", "fusion")


def make(
    k: int = 2,
    size: int = 32,
    iterations: int = 100,
    seed: int = 0,
    checkpoint: str = "none",
    lr: float = 0.01,
    channels: int = 3,
    **params,
) -> KnowSam:
    ctx = MethodContext(
        in_channels=channels,
        num_classes=k,
        image_size=size,
        iterations=iterations,
        train=TrainParams(lr=lr),
        sam=SamParams(arch="tiny", checkpoint=checkpoint),
        device=torch.device("cpu"),
        seed=seed,
    )
    method = get_method("knowsam")(ctx, KnowSamParams(**params))
    method.train()
    return method


def batch(n_l: int, n_u: int, k: int = 2, size: int = 32, seed: int = 0, channels: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_l = torch.rand(n_l, channels, size, size, generator=g)
    y_l = torch.randint(0, k, (n_l, size, size), generator=g)
    return Batch(x_l, y_l, torch.rand(n_u, channels, size, size, generator=g))


def grads(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, got)}


def has_grad(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


# --- gradients --------------------------------------------------------------------------------
def test_gradients_reach_exactly_the_trainable_parts():
    m = make()
    terms = m.losses(batch(2, 2), 0)
    sam = m.nets["sam"]
    sam_grads = grads(terms["sam"], sam)
    assert all(SamTeacher.is_added_name(n) for n in sam_grads)  # nothing else in SAM is trainable
    assert any(".attn_adapter." in n for n in sam_grads) and any(n.startswith("prompt_heads.") for n in sam_grads)
    assert all(has_grad(g) for g in sam_grads.values()), [n for n, g in sam_grads.items() if not has_grad(g)]
    for name in NET_NAMES:
        net_grads = grads(terms["net"], m.nets[name])
        assert all(has_grad(g) for g in net_grads.values()), (
            name,
            [n for n, g in net_grads.items() if not has_grad(g)],
        )
        assert not any(has_grad(g) for g in grads(terms["sam"], m.nets[name]).values())  # dense prompt detached
    assert not any(has_grad(g) for g in grads(terms["net"], sam).values())  # KD target detached


def test_sam_graph_over_the_batch_or_labeled_images_only():
    """Official: one graph over the batch; through the prompt heads' BatchNorm statistics the
    labeled loss reaches the adapters via the unlabeled images too. ``sam_full_graph=False``
    encodes the unlabeled images without a graph: same outputs, that path cut."""
    m = make()
    sam = m.nets["sam"]
    b = batch(2, 3)
    fused = torch.randn(5, 2, 32, 32)
    emb = sam.encode(b.x)
    # Every decode below draws the prompt heads' dropout masks from the same seed.
    torch.manual_seed(1)
    full = grads(supervised_loss(sam.decode(emb, fused)[:2], b.y_l), sam)
    torch.manual_seed(1)
    cut = grads(supervised_loss(sam.decode(torch.cat([emb[:2], emb[2:].detach()]), fused)[:2], b.y_l), sam)
    name = "image_encoder.blocks.0.attn_adapter.down.weight"
    assert (cut[name] - full[name]).norm() > 0.01 * full[name].norm()
    for full_graph, expected in ((True, full), (False, cut)):  # the switch picks the graph
        m.p = dataclasses.replace(m.p, sam_full_graph=full_graph)
        torch.manual_seed(1)
        got = grads(supervised_loss(m._sam_logits(b, fused)[:2], b.y_l), sam)
        # Equal up to float reassociation (the decoder's batch size changes summation order); 1e-8 absolute:
        # the gradient of a conv bias before BatchNorm is 0 up to rounding.
        for n in expected:
            assert (got[n] - expected[n]).norm() <= 1e-4 * expected[n].norm() + 1e-8, (full_graph, n)


# --- loss terms against independent computations ------------------------------------------------
def _softmax(a: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_kd_with_four_classes_matches_numpy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, 6, generator=g) * 3, torch.randn(2, 4, 5, 6, generator=g) * 3
    temp = 10.0
    ps, pt = _softmax(s.double().numpy() / temp), _softmax(t.double().numpy() / temp)
    expected = (pt * (np.log(pt) - np.log(ps))).sum(1).mean() * temp**2
    assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-4)
    # The official 2-class computation agrees with the K-class one exactly where it is defined.
    s2, t2 = s[:, :2], t[:, :2]
    assert kd_two_class_official(s2, t2, temp).item() == pytest.approx(kd_loss(s2, t2, temp).item(), rel=1e-5)


def test_entropy_terms_match_numpy():
    logits = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 2
    p = _softmax(logits.double().numpy())
    ent = -(p * np.log(p)).sum(1)
    assert entropy_loss(logits).item() == pytest.approx(ent.mean() / math.log(4), rel=1e-5)
    p2 = _softmax(logits[:, :2].double().numpy())
    official = (-(p2 * np.log(p2 + 1e-6)).sum(1) / math.log(2)).mean()
    assert entropy_two_class_official(logits[:, :2]).item() == pytest.approx(official, rel=1e-5)
    assert entropy_loss(logits[:, :2]).item() == pytest.approx(official, abs=1e-4)


def test_supervised_and_consistency_losses_match_numpy():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    y = torch.randint(0, 4, (2, 5, 6), generator=g)
    pa, pb = _softmax(a.double().numpy()), _softmax(b.double().numpy())
    onehot = np.eye(4)[y.numpy()].transpose(0, 3, 1, 2)
    ce = -np.log((pa * onehot).sum(1)).mean()

    def dice_loss(p, q):  # 1 - mean over classes of batch-pooled (2 sum pq + eps) / (sum p^2 + sum q^2 + eps)
        inter, den = (p * q).sum((0, 2, 3)), (p * p).sum((0, 2, 3)) + (q * q).sum((0, 2, 3))
        return 1 - ((2 * inter + 1e-5) / (den + 1e-5)).mean()

    def bce(p, q):  # per class: mean over pixels of -(q log p + (1 - q) log(1 - p)), p clamped as officially
        p = np.clip(p, 1e-8, 1 - 1e-7)
        return -(q * np.log(p) + (1 - q) * np.log(1 - p)).mean((0, 2, 3))

    assert supervised_loss(a, y).item() == pytest.approx(ce + dice_loss(pa, onehot), rel=1e-5)
    sa, sb = a.softmax(1), b.softmax(1)
    assert consistency_loss(sa, sb, all_classes=True).item() == pytest.approx(bce(pa, pb).mean(), rel=1e-5)
    assert consistency_loss(sa, sb, all_classes=False).item() == pytest.approx(bce(pa, pb)[3], rel=1e-5)
    # Defect 2: the official form ignores every class but the last. Redistribute the mass of
    # classes 0 and 1 (their exp-sum, hence the last class's softmax, is unchanged).
    mass = a[:, 0].exp() + a[:, 1].exp()
    share = torch.rand(2, 5, 6, generator=g) * 0.98 + 0.01
    a2 = a.clone()
    a2[:, 0], a2[:, 1] = (mass * share).log(), (mass * (1 - share)).log()
    sa2 = a2.softmax(1)
    assert consistency_loss(sa2, sb, False).item() == pytest.approx(consistency_loss(sa, sb, False).item(), rel=1e-5)
    assert abs(consistency_loss(sa2, sb, True).item() - consistency_loss(sa, sb, True).item()) > 1e-3


def test_bce_consistency_is_the_two_class_soft_cross_entropy():
    """At K = 2 the official BCE on the last class is H(q, p) = -sum_c q_c log p_c, and so is the all-class mean."""
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(2, 2, 7, 5, generator=g).softmax(1), torch.randn(2, 2, 7, 5, generator=g).softmax(1)
    soft_ce = -(q * p.log()).sum(1).mean()
    assert consistency_loss(p, q, all_classes=False).item() == pytest.approx(soft_ce.item(), rel=1e-5)
    assert consistency_loss(p, q, all_classes=True).item() == pytest.approx(soft_ce.item(), rel=1e-5)
    p.requires_grad_(True)
    q.requires_grad_(True)
    consistency_loss(p, q, all_classes=False).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and q.grad is None  # the target is detached


@pytest.mark.parametrize("t", [0, 1, 149, 150, 7499, 15000, 29999, 30000])
def test_consistency_ramp(t: int):
    total = 30000
    r = min(math.floor(t / (total / 200)), 200) / 200
    assert consistency_weight(t, total, 1.0, 200) == pytest.approx(0.1 * 10 * math.exp(-5 * (1 - r) ** 2), rel=1e-6)


def test_net_loss_is_the_documented_combination():
    m = make(iterations=10)
    torch.manual_seed(0)
    terms = {k: v.item() for k, v in m.losses(batch(2, 2), 1).items()}
    w = consistency_weight(1, 10, 1.0, 200)
    students = [
        terms[f"{n}_sup"] + terms[f"{n}_kd"] + 0.9 * terms[f"{n}_ent"] + w * terms[f"{n}_cons"]
        for n in ("unet", "vnet")
    ]
    assert [terms["unet"], terms["vnet"]] == pytest.approx(students, rel=1e-6)
    mixed_keys = [k for k in terms if "_mix" in k]
    # Step 1 is not after round(0.24 * 10) = 2: no mixing, every mixed term logged as 0.
    assert len(mixed_keys) == 11 and all(terms[k] == 0.0 for k in mixed_keys)
    assert terms["net"] == pytest.approx(sum(students) / 2 + terms["fusion"], rel=1e-6)
    assert terms["cons_weight"] == pytest.approx(w)


@pytest.mark.parametrize("kd_weight,self_weight", [(0.0, 0.0), (0.25, 3.0)])
def test_kd_and_self_training_weights_scale_only_their_terms(kd_weight: float, self_weight: float):
    """The ablation weights (official: 1 and 1) multiply the KD term and the mixed stage's self-training
    term and nothing else: every logged term is the same as at the official weights."""
    steps = {}
    for weights in ((1.0, 1.0), (kd_weight, self_weight)):
        torch.manual_seed(0)  # the same initial weights for both
        m = make(iterations=10, mixed_iterations=0.0, kd_weight=weights[0], self_training_weight=weights[1])
        m.eval()  # no dropout: the two methods' forwards are identical
        steps[weights] = {k: v.item() for k, v in m.losses(batch(2, 2), 5).items()}
    official, ablated = steps[(1.0, 1.0)], steps[(kd_weight, self_weight)]
    w = consistency_weight(5, 10, 1.0, 200)
    for name in ("unet", "vnet"):
        for term in ("sup", "kd", "ent", "cons", "mix_sup", "mix_ent", "mix_cons", "mix_self"):
            assert ablated[f"{name}_{term}"] == pytest.approx(official[f"{name}_{term}"], rel=1e-6)
        assert ablated[name] == pytest.approx(official[name] - (1 - kd_weight) * official[f"{name}_kd"], rel=1e-5)
        assert ablated[f"{name}_mix"] == pytest.approx(
            official[f"{name}_mix"] - w * (1 - self_weight) * official[f"{name}_mix_self"], rel=1e-5
        )
    assert official["unet_kd"] > 0 and official["unet_mix_self"] > 0


def test_students_are_scored_alone_for_the_curves():
    """``curve_variants``: each student's own softmax, beside the fused output and SAM's."""
    m = make()
    m.eval()
    x = batch(2, 2).x
    for name in ("unet", "vnet"):
        assert torch.equal(m.predict(x, name), m.nets[name](x).softmax(1))
    assert not torch.equal(m.predict(x, "unet"), m.predict(x))
    with pytest.raises(ValueError, match="unknown variant 'fusion'"):
        m.predict(x, "fusion")


def _ce_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + (1 - mean over classes of batch-pooled 2 sum(p y) / (sum p^2 + sum y^2)), written out apart."""
    p = logits.double().softmax(1)
    y = torch.stack([labels == c for c in range(p.shape[1])], 1).double()
    ce = -(p.log() * y).sum(1).mean()
    dice = 2 * (p * y).sum((0, 2, 3)) / ((p * p).sum((0, 2, 3)) + (y * y).sum((0, 2, 3)))
    return ce + 1 - dice.mean()


def _entropy_2(logits: torch.Tensor) -> torch.Tensor:
    p = logits.double().softmax(1)
    return -(p * p.log()).sum(1).mean() / math.log(2)


def _bce_last(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double()[:, -1], q.double()[:, -1]
    return -(q * p.log() + (1 - q) * (1 - p).log()).mean()


def test_each_mixed_stage_loss_is_its_terms_composed():
    """Official mixed stage: U-Net, V-Net and fusion re-run on the mixed batch; per sub-network N
    (other M): CE+Dice(N, y_mix) + 0.9 H(N) + w (cons(N, M) + CE+Dice(N_u, argmax F_mix,u)); the
    fusion module CE+Dice(F_mix, y_mix); no distillation."""
    m = make(iterations=10, mixed_iterations=0.0)
    m.eval()  # no dropout, running BatchNorm statistics: every forward below is reproducible
    b = batch(2, 2)
    terms = m.losses(b, 5)
    nets, sam = m.nets, m.nets["sam"]
    with torch.no_grad():
        u, v = nets["unet"](b.x), nets["vnet"](b.x)
        fused = nets["fusion"](u, v)
        pseudo = sam.decode(sam.encode(b.x), fused).argmax(1)
        xm, ym = uncertainty_mix(b.x, b.y_l, pseudo, fused.softmax(1), 2, 4, 5)
        um, vm = nets["unet"](xm), nets["vnet"](xm)
        fm = nets["fusion"](um, vm)
    w = consistency_weight(5, 10, 1.0, 200)
    fused_labels = fm.argmax(1)
    pu, pv = um.double().softmax(1), vm.double().softmax(1)
    expected = {}
    for name, own in (("unet", um), ("vnet", vm)):
        expected.update(
            {
                f"{name}_mix_sup": _ce_dice(own, ym),
                f"{name}_mix_ent": _entropy_2(own),
                f"{name}_mix_self": _ce_dice(own[2:], fused_labels[2:]),
                # defect 1: the V-Net's term is the U-Net's scored against it, both detached
                f"{name}_mix_cons": _bce_last(pu, pv),
            }
        )
        expected[f"{name}_mix"] = (
            expected[f"{name}_mix_sup"]
            + 0.9 * expected[f"{name}_mix_ent"]
            + w * (expected[f"{name}_mix_cons"] + expected[f"{name}_mix_self"])
        )
    expected["fusion_mix"] = _ce_dice(fm, ym)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-4), key
    students = terms["unet"] + terms["unet_mix"] + terms["vnet"] + terms["vnet_mix"]
    assert terms["net"].item() == pytest.approx((students / 2 + terms["fusion"] + terms["fusion_mix"]).item(), rel=1e-6)
    assert terms["unet_mix_self"].item() > 0 and terms["fusion_mix"].item() > 0
    # The mixed stage re-runs the fusion module, and its loss reaches all three networks.
    mixed = terms["unet_mix"] + terms["vnet_mix"] + terms["fusion_mix"]
    for name in NET_NAMES:
        assert any(has_grad(g) for g in grads(mixed, nets[name]).values()), name
    # Defect 1 holds in the mixed stage too: the V-Net's consistency term has no gradient.
    assert not terms["vnet_mix_cons"].requires_grad and terms["unet_mix_cons"].requires_grad


# --- mixing --------------------------------------------------------------------------------------
def _patchwise_probs(ent_order: np.ndarray, size: int = 32, grid: int = 4) -> torch.Tensor:
    """2-class probabilities constant per patch; foreground probability from ``ent_order`` (B, grid, grid)."""
    fg = torch.from_numpy(ent_order).float().repeat_interleave(size // grid, 1).repeat_interleave(size // grid, 2)
    return torch.stack([1 - fg, fg], 1)


@pytest.mark.parametrize("n_l,n_u", [(2, 2), (3, 1), (1, 3)])
def test_mixing_moves_the_least_uncertain_patches(n_l: int, n_u: int):
    rng = np.random.default_rng(n_l)
    b, size, grid, count, cell = n_l + n_u, 32, 4, 5, 8
    fg = rng.uniform(0.5, 0.999, (b, grid, grid))  # entropy falls as fg rises: distinct per patch
    probs = _patchwise_probs(fg)
    x = torch.rand(b, 3, size, size)
    teacher = torch.randn(b, 2, size, size)
    y_l = torch.randint(0, 2, (n_l, size, size))
    pseudo = teacher.argmax(1)
    xm, ym = uncertainty_mix(x, y_l, pseudo, probs, n_l, grid, count)

    ent = -(fg * np.log(fg) + (1 - fg) * np.log(1 - fg))
    for i in range(b):
        chosen = set(np.argsort(ent[i].ravel())[:count].tolist())
        partner = n_l + i % n_u if i < n_l else (i - n_l) % n_l
        own_labels = y_l[i] if i < n_l else pseudo[i]
        partner_labels = pseudo[partner] if i < n_l else y_l[partner]
        for cell_id in range(grid * grid):
            r, c = divmod(cell_id, grid)
            sl = (slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell))
            src, lab = (partner, partner_labels) if cell_id in chosen else (i, own_labels)
            assert torch.equal(xm[i][(slice(None), *sl)], x[src][(slice(None), *sl)]), (i, cell_id)
            assert torch.equal(ym[i][sl], lab[sl]), (i, cell_id)


def test_least_uncertain_patches_uses_mean_entropy_per_patch():
    probs = torch.full((1, 2, 32, 32), 0.5)
    probs[0, :, 0:8, 8:16] = torch.tensor([0.01, 0.99]).view(2, 1, 1)  # patch (0, 1): certain everywhere
    probs[0, :, 8:12, 0:8] = torch.tensor([0.0, 1.0]).view(2, 1, 1)  # half of patch (1, 0): certain
    mask = least_uncertain_patches(probs, 4, 2)
    assert mask.sum() == 2 * 64
    assert mask[0, 0:8, 8:16].all() and mask[0, 8:16, 0:8].all()


# --- official-defect switches -------------------------------------------------------------------
@pytest.mark.parametrize("fixed", [False, True])
def test_vnet_consistency_gradient_only_when_fixed(fixed: bool):
    m = make(vnet_consistency_grad=fixed)
    terms = m.losses(batch(2, 2), 10)
    vnet_from_cons = grads(terms["vnet_cons"], m.nets["vnet"]) if terms["vnet_cons"].requires_grad else {}
    assert any(has_grad(g) for g in vnet_from_cons.values()) == fixed
    assert any(has_grad(g) for g in grads(terms["unet_cons"], m.nets["unet"]).values())  # U-Net learns either way
    assert not any(has_grad(g) for g in grads(terms["unet_cons"], m.nets["vnet"]).values())  # target detached
    # Official (loss_diff2): the V-Net's term is the U-Net's probabilities scored against the V-Net's.
    assert (terms["vnet_cons"].item() == terms["unet_cons"].item()) != fixed


@pytest.mark.parametrize("k", [2, 4])
def test_consistency_all_classes_switch_changes_the_step_only_beyond_two_classes(k: int):
    torch.manual_seed(0)
    official = make(k=k).losses(batch(2, 2, k=k), 10)["unet_cons"].item()
    torch.manual_seed(0)
    fixed = make(k=k, consistency_all_classes=True).losses(batch(2, 2, k=k), 10)["unet_cons"].item()
    assert (official == pytest.approx(fixed, rel=1e-5)) == (k == 2)


def test_official_two_class_kd_entropy_at_four_classes_is_the_official_computation():
    """At K = 4 ``official-2class`` computes what the official ACDC runs do: KD over rows of 2 values
    (each pixel's classes (0, 1) and (2, 3) softmaxed apart), entropy over the 4 classes / log 2."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 5, 6, generator=g) * 3, torch.randn(2, 4, 5, 6, generator=g) * 3
    temp = 10.0
    pairs_s = s.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 2, 2)  # (pixel, pair, 2)
    pairs_t = t.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 2, 2)
    ps, pt = _softmax(pairs_s / temp, axis=2), _softmax(pairs_t / temp, axis=2)
    kd = (pt * (np.log(pt) - np.log(ps))).sum(2).mean() * temp**2  # batchmean: per row of 2
    assert kd_two_class_official(s, t, temp).item() == pytest.approx(kd, rel=1e-5)
    assert kd_loss(s, t, temp).item() != pytest.approx(kd, rel=1e-2)
    p = _softmax(s.double().numpy())
    ent = (-(p * np.log(p + 1e-6)).sum(1) / math.log(2)).mean()
    assert entropy_two_class_official(s).item() == pytest.approx(ent, rel=1e-5)
    # The method takes the form at K = 4 and uses it: its KD term differs from the K-class one.
    torch.manual_seed(0)
    official = make(k=4, kd_entropy_form="official-2class").losses(batch(2, 2, k=4), 0)
    torch.manual_seed(0)
    k_class = make(k=4).losses(batch(2, 2, k=4), 0)
    assert official["unet_kd"].item() != pytest.approx(k_class["unet_kd"].item(), rel=1e-2)
    assert official["unet_ent"].item() == pytest.approx(k_class["unet_ent"].item() * 2, rel=1e-3)  # log 4 / log 2
    # At K = 2 the two forms agree (up to the 1e-6 in the official logarithm).
    torch.manual_seed(0)
    a = make(kd_entropy_form="official-2class").losses(batch(2, 2), 0)
    torch.manual_seed(0)
    b = make().losses(batch(2, 2), 0)
    assert a["unet_kd"].item() == pytest.approx(b["unet_kd"].item(), rel=1e-4)
    assert a["unet_ent"].item() == pytest.approx(b["unet_ent"].item(), abs=1e-4)


def test_validation_empty_score_and_mixing_start():
    assert make().validation_empty_score == 0.0
    assert make(validation_empty_zero=False).validation_empty_score == 1.0
    m = make(iterations=50000)  # official: iter_num > 12000 with iter_num counted from 0
    assert m.mix_after == 12000 and not m.mixing_at(12000) and m.mixing_at(12001)
    assert make(iterations=50000, mixed_iterations=3000.0).mix_after == 3000
    with pytest.raises(ConfigError):
        make(mix_patches=17)


# --- whole steps --------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n_l,n_u,size,channels", [(4, 3, 1, 48, 1), (2, 4, 0, 32, 3)])
def test_steps_run_for_four_classes_and_without_unlabeled(k: int, n_l: int, n_u: int, size: int, channels: int):
    m = make(k=k, size=size, channels=channels, mixed_iterations=0.0)
    before = {n: p.clone() for n, p in m.nets["unet"].named_parameters()}
    adapter = m.nets["sam"].image_encoder.blocks[0].attn_adapter.down.weight
    adapter_before = adapter.clone()
    out = m.train_step(batch(n_l, n_u, k=k, size=size, channels=channels), 1)  # mixing after iteration 0
    assert all(math.isfinite(v) for v in out.values())
    assert (out["fusion_mix"] > 0) == (n_u > 0)  # no unlabeled partner: no mixing
    assert any(not torch.equal(p, before[n]) for n, p in m.nets["unet"].named_parameters())
    assert not torch.equal(adapter, adapter_before)  # SAM's Adam stepped too
    m.eval()
    x = batch(2, 0, k=k, size=size, channels=channels).x
    for variant in (None, "sam", "unet", "vnet"):
        probs = m.predict(x, variant)
        assert probs.shape == (2, k, size, size)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, size, size))
    with pytest.raises(ValueError):
        m.predict(x, "fusion")


def test_loop_speed_options_keep_channels_last_and_bf16_approximates_the_results():
    """The loop's train.channels_last / train.amp_bf16 (the only speed options) on KnowSAM's nets and SAM."""
    from knowsam.train import apply_speed_options, batch_layout, step_context

    def first(**speed) -> tuple[dict[str, float], torch.Tensor]:
        t = TrainParams(**speed)
        torch.manual_seed(0)
        m = make()
        apply_speed_options(m, t)
        torch.manual_seed(1)
        with step_context(t, torch.device("cpu")):
            losses = {k: v.item() for k, v in m.losses(batch_layout(batch(2, 2), t), 0).items()}
            m.eval()
            return losses, m.predict(batch_layout(batch(2, 1, seed=3), t).x_l).float()

    (ref, p_ref), (bf, p_bf), (_, p_cl) = first(), first(amp_bf16=True), first(channels_last=True)
    for k in ("net", "sam", "unet_kd"):
        assert bf[k] == pytest.approx(ref[k], rel=0.05), k
    # Channels-last draws dropout masks in another element order, so compare without dropout.
    torch.testing.assert_close(p_cl, p_ref, rtol=1e-4, atol=1e-5)
    assert (p_bf - p_ref).abs().max() < 0.05


def test_saved_weights_restore_predictions_without_the_frozen_sam():
    torch.manual_seed(0)
    a = make()
    a.train_step(batch(2, 2), 0)
    saved = a.eval_state_dict()
    # The frozen SAM is rebuilt, not saved: only adapters and prompt heads are in the file.
    assert saved["sam"]["trained"] and all(SamTeacher.is_added_name(k) for k in saved["sam"]["trained"])
    torch.manual_seed(123)  # evaluation builds the method under another RNG state
    b = make()
    b.load_eval_state_dict(saved)
    a.eval(), b.eval()
    x = batch(2, 0, seed=5).x
    for variant in (None, "sam"):
        torch.testing.assert_close(a.predict(x, variant), b.predict(x, variant))
    with pytest.raises(KnowsamError, match="other frozen SAM"):
        make(seed=1).load_eval_state_dict(saved)


def test_resumed_training_equals_uninterrupted():
    torch.manual_seed(0)
    a = make(iterations=4, mixed_iterations=0.0)
    a.train_step(batch(2, 2), 0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as the loop's checkpoint stores it
    rng = torch.get_rng_state()
    expected = a.train_step(batch(2, 2, seed=1), 1)
    torch.manual_seed(7)  # the resumed process builds the method under another RNG state
    b = make(iterations=4, mixed_iterations=0.0)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    torch.set_rng_state(rng)
    assert b.train_step(batch(2, 2, seed=1), 1) == expected


@pytest.mark.parametrize("step,scale", [(0, 1.0), (1, 1.0), (2, 0.75), (3, 0.5)])
def test_both_rates_decay_linearly_one_step_late_as_officially(step: int, scale: float):
    """Official: the rate is set after each step from its index, so step t runs with lr (1 - (t-1)/T)."""
    m = make(iterations=4)
    m.train_step(batch(2, 2), step)
    assert m.optimizers["sam"].param_groups[0]["lr"] == pytest.approx(1e-4 * scale)
    assert m.optimizers["nets"].param_groups[0]["lr"] == pytest.approx(0.01 * scale)


def test_provenance_random_init_and_checkpoint(tmp_path):
    assert make().provenance() == {
        "sam_arch": "tiny",
        "sam_weights": "random-init",
        "sam_encoder": "adapters",
        "sam_options": "",
        "sam_load_report": "random init (seed 0); no checkpoint loaded",
    }
    torch.manual_seed(1)  # other weights than the teacher's own seeded initialisation
    path = tmp_path / "tiny_sam.pth"
    torch.save(Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True)).state_dict(), path)
    m = make(checkpoint=str(path))
    prov = m.provenance()
    assert prov["sam_weights"] == f"tiny_sam.pth sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    # Every SAM tensor loaded (pos_embed resized) but the 4 x 2 rel-pos tables and the 8 decoder-MLP
    # tensors (kept at init, as officially), skipped; only added ones missing.
    n_sam = len(m.nets["sam"].state_dict()) - len(trained_state(m.nets["sam"])) - 8
    assert prov["sam_load_report"] == (
        f"SAM weights: {n_sam} loaded (1 resized), 16 skipped, 0 unexpected, "
        f"{len(trained_state(m.nets['sam']))} missing (adapters/prompt heads)"
    )
    torch.testing.assert_close(
        m.nets["sam"].mask_decoder.iou_token.weight,
        torch.load(path, weights_only=True)["mask_decoder.iou_token.weight"],
    )
    with pytest.raises(KnowsamError, match="not found"):
        make(checkpoint=str(tmp_path / "absent.pth"))


# --- training on real images ----------------------------------------------------------------------


def test_twenty_steps_on_polyp_images_lower_the_loss():
    x, y = polyp_images(16, 32)
    steps = 20
    torch.manual_seed(0)
    m = make(size=32, iterations=steps, lr=0.03)  # mixing after step round(0.24 * 20) = 5
    fixed = Batch(x[:2], y[:2], x[8:10])

    def fixed_loss() -> float:
        torch.manual_seed(99)  # same dropout masks before and after
        with torch.no_grad():
            t = m.losses(fixed, 0)
        return (t["sam"] + t["net"]).item()

    before = fixed_loss()
    mixed_steps = 0
    for step in range(steps):
        lab, unl = [(2 * step) % 8, (2 * step + 1) % 8], [8 + (2 * step) % 8, 8 + (2 * step + 1) % 8]
        out = m.train_step(Batch(x[lab], y[lab], x[unl]), step)
        mixed_steps += out["fusion_mix"] > 0
    after = fixed_loss()
    assert mixed_steps == steps - 6
    assert after < 0.9 * before, (before, after)

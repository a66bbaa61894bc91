"""Baseline zoo (Mean Teacher, CPS, UCMT): update rules against their formulas, UMIX patch moves,
exact resume, and learning on real polyp images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knowsam.config import SamParams, TrainParams
from knowsam.losses import ce_dice_loss, soft_dice_loss
from knowsam.data.batch import Batch
from knowsam.methods import Method, MethodContext, get_method, method_names
from knowsam.methods import ucmt as ucmt_module
from knowsam.methods.registry import method_params
from knowsam.methods.ucmt import patch_grid, plan_mix
from tests.conftest import polyp_images


def make_method(name: str, *, size: int = 32, iterations: int = 20, lr: float = 0.01, seed: int = 0,
                labeled: int = 2, **params) -> Method:
    """A method on 3-channel 2-class images, batches of ``labeled`` + ``labeled`` unlabeled, random tiny SAM."""
    torch.manual_seed(seed)
    cls = get_method(name)
    ctx = MethodContext(in_channels=3, num_classes=2, image_size=size, iterations=iterations,
                        train=TrainParams(iterations=iterations, batch_size=2 * labeled, labeled_batch=labeled, lr=lr),
                        sam=SamParams(arch="tiny", checkpoint="none"), device=torch.device("cpu"), seed=seed)
    method = cls(ctx, method_params(name, params))
    method.train()
    return method


def random_batch(size: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, size, size, generator=g)
    y = (x[:2, 0] > 0.5).long()  # a label the networks can learn from the pixels
    return Batch(x_l=x[:2], y_l=y, x_u=x[2:])


def params_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@torch.no_grad()
def perturb(*nets: torch.nn.Module) -> None:
    """Make every network's weights distinct, so each term of an EMA formula shows in the result."""
    for net in nets:
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_method_names_list_the_baselines_and_their_skd_versions():
    names = method_names()
    for name in ("mt", "cps", "ucmt", "mt+skd", "cps+skd", "ucmt+skd"):
        assert name in names
    assert "labeled-only+skd" not in names  # supervised references take no plug-in


@pytest.mark.parametrize("step", [0, 4, 500])
def test_mean_teacher_ema_follows_the_formula(step):
    m = make_method("mt", iterations=1000)
    perturb(m.nets["teacher"])
    teacher_before = params_of(m.nets["teacher"])
    m.train_step(random_batch(), step)
    student_after = params_of(m.nets["student"])
    alpha = {0: 0.0, 4: 0.8, 500: 0.99}[step]  # min(1 - 1/(step+1), 0.99)
    for name, t in m.nets["teacher"].named_parameters():
        expected = alpha * teacher_before[name] + (1 - alpha) * student_after[name]
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in m.nets["teacher"].parameters())


def test_ucmt_teacher_averages_both_students():
    m = make_method("ucmt", iterations=100)
    perturb(*m.nets.values())
    teacher_before = params_of(m.nets["teacher"])
    m.train_step(random_batch(), 9)
    s1, s2 = params_of(m.nets["student1"]), params_of(m.nets["student2"])
    d = 0.9  # min(1 - 1/10, 0.99)
    for name, t in m.nets["teacher"].named_parameters():
        expected = d * teacher_before[name] + (1 - d) * (0.99 * s1[name] + 0.01 * s2[name])
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)


def test_cps_targets_are_the_peers_detached_argmax():
    """net2's gradient is exactly that of sup2 + w * CE(net2, argmax net1): nothing reaches net2
    through net1's pseudo-label loss, and the target is the peer's hard prediction."""
    m = make_method("cps", cps_weight=1.0, rampup_fraction=0.0)  # full weight from step 0
    batch = random_batch()
    weights = {k: {n: v.clone() for n, v in net.state_dict().items()} for k, net in m.nets.items()}
    torch.manual_seed(7)
    m.train_step(batch, 0)
    got = {n: p.grad.clone() for n, p in m.nets["net2"].named_parameters()}

    ref = make_method("cps")
    for k, net in ref.nets.items():
        net.load_state_dict(weights[k])
    torch.manual_seed(7)  # same dropout draws, same order (net1 then net2)
    l1, l2 = ref.nets["net1"](batch.x), ref.nets["net2"](batch.x)
    target = l1.detach().argmax(1)
    assert not ref.pseudo_labels(l1).requires_grad
    assert torch.equal(ref.pseudo_labels(l1), target)
    loss = ce_dice_loss(l2[:2], batch.y_l) + F.cross_entropy(l2, target)
    expected = torch.autograd.grad(loss, list(ref.nets["net2"].parameters()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=name)


def test_patch_grid_keeps_patches_of_at_least_four_pixels():
    assert [patch_grid(s, 16, 4) for s in (256, 64, 32, 16)] == [16, 16, 8, 4]


def loop_mix(base: torch.Tensor, donor: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, grid: int):
    """Reference mixing, one patch at a time."""
    out = base.clone()
    p = base.shape[-1] // grid
    for b in range(len(base)):
        for d, s in zip(dest[b].tolist(), src[b].tolist()):
            (dr, dc), (sr, sc) = divmod(d, grid), divmod(s, grid)
            patch = donor[b, ..., sr * p:(sr + 1) * p, sc * p:(sc + 1) * p]
            out[b, ..., dr * p:(dr + 1) * p, dc * p:(dc + 1) * p] = patch
    return out


def test_umix_picks_patches_by_uncertainty_and_moves_images_and_labels_alike():
    g = torch.Generator().manual_seed(3)
    u_dest, u_src = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    mix = plan_mix(u_dest, u_src, grid=8, k=2)
    for b in range(3):  # independent ranking of the 4x4-pixel patch means
        dest_means = u_dest[b].numpy().reshape(8, 4, 8, 4).mean((1, 3)).ravel()
        src_means = u_src[b].numpy().reshape(8, 4, 8, 4).mean((1, 3)).ravel()
        assert mix.dest[b].tolist() == list(np.argsort(-dest_means)[:2])
        assert mix.src[b].tolist() == list(np.argsort(src_means)[:2])

    base, donor = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    mixed = mix.apply(base, donor)
    assert torch.equal(mixed, loop_mix(base, donor, mix.dest, mix.src, 8))
    assert (mixed != base).any(dim=1).float().mean().item() == pytest.approx(2 * 16 / 1024)  # 2 patches of 16 px
    label = lambda img: (img[:, 0] > 0.5).long()  # noqa: E731  (a label that is a function of the pixels)
    assert torch.equal(mix.apply(label(base), label(donor)), label(mixed))


def test_ucmt_second_update_trains_on_mixed_views_with_mixed_pseudo_labels(monkeypatch):
    m = make_method("ucmt")
    plans, updates = [], []
    real_plan, real_update = ucmt_module.plan_mix, m._update

    def record_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    def record_update(batch, views, teacher_targets, peer_targets, w):
        logits, loss, terms = real_update(batch, views, teacher_targets, peer_targets, w)
        updates.append((views, teacher_targets, peer_targets, [out.detach() for out in logits]))
        return logits, loss, terms

    monkeypatch.setattr(ucmt_module, "plan_mix", record_plan)
    monkeypatch.setattr(m, "_update", record_update)
    m.train_step(random_batch(), 0)
    (views, teacher, _, logits), (mixed_views, mixed_teacher, mixed_peer, _) = updates
    assert len(plans) == 2 and all(p.dest.shape == (2, 2) for p in plans)
    for i in range(2):
        p, peer_label = plans[i], logits[1 - i][2:].argmax(1)  # the peer's first-pass label of its view
        assert torch.equal(mixed_views[i], loop_mix(views[i], views[1 - i], p.dest, p.src, m.grid))
        assert torch.equal(mixed_teacher[i], loop_mix(teacher[i], teacher[i], p.dest, p.src, m.grid))
        assert torch.equal(mixed_peer[i], loop_mix(peer_label, peer_label, p.dest, p.src, m.grid))
    assert m._mixes is None  # the plug-in alignment is off again outside the mixed update


@pytest.mark.parametrize("name", ["mt", "ucmt"])
def test_state_dict_round_trip_resumes_exactly(name):
    batch = random_batch()
    a = make_method(name)
    a.train_step(batch, 0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = make_method(name, seed=0)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    terms = []
    for method in (a, b):
        torch.manual_seed(5)  # the loop restores the global RNG on resume; the method restores its own
        terms.append(method.train_step(batch, 1))
    assert terms[0] == terms[1]
    for k in a.nets:
        for (n, va), vb in zip(a.nets[k].state_dict().items(), b.nets[k].state_dict().values()):
            assert torch.equal(va, vb), f"{k}.{n}"




def eval_loss(method: Method, x: torch.Tensor, y: torch.Tensor) -> float:
    """CE + Dice of the method's test-time prediction (eval mode), so before/after are comparable."""
    method.eval()
    probs = method.predict(x)
    method.train()
    return (F.nll_loss(probs.clamp_min(1e-8).log(), y) + soft_dice_loss(probs, y)).item()


def loss_before_after(name: str, steps: int = 40, per_batch: int = 1, **params) -> tuple[float, float]:
    """Train on 4 labeled + 4 unlabeled real frames, ``per_batch`` of each per batch (cheap, and 10 passes
    over the labeled frames in 40 steps of one: at 20, BatchNorm's running statistics still lag behind
    on the demo frames); the loss is measured on the 4 labeled frames."""
    x, y = polyp_images(8, 64)
    m = make_method(name, size=64, iterations=steps, lr=0.05, labeled=per_batch, **params)
    before = eval_loss(m, x[:4], y[:4])
    for step in range(steps):
        rows = [(step * per_batch + i) % 4 for i in range(per_batch)]
        m.train_step(Batch(x_l=x[rows], y_l=y[rows], x_u=x[[4 + r for r in rows]]), step)
    return before, eval_loss(m, x[:4], y[:4])


@pytest.mark.parametrize("name", ["mt", "cps", "ucmt"])
def test_loss_decreases_on_real_polyp_images(name):
    before, after = loss_before_after(name)
    assert after < 0.8 * before, (before, after)

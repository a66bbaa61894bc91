"""Baseline zoo (Mean Teacher, CPS, UCMT): update rules against their formulas, UMIX patch moves,
exact resume, and learning on real polyp images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.losses import ce_dice_loss, soft_dice_loss
from knowsam.methods import Method, MethodContext, get_method, method_names
from knowsam.methods import ucmt as ucmt_module
from knowsam.methods.registry import method_params
from knowsam.methods.ucmt import patch_grid, per_image_dice_loss, plan_umix
from tests.conftest import polyp_images


def make_method(
    name: str, *, size: int = 32, iterations: int = 20, lr: float = 0.01, seed: int = 0, labeled: int = 2, **params
) -> Method:
    """A method on 3-channel 2-class images, batches of ``labeled`` + ``labeled`` unlabeled, random tiny SAM."""
    torch.manual_seed(seed)
    cls = get_method(name)
    ctx = MethodContext(
        in_channels=3,
        num_classes=2,
        image_size=size,
        iterations=iterations,
        train=TrainParams(iterations=iterations, batch_size=2 * labeled, labeled_batch=labeled, lr=lr),
        sam=SamParams(arch="tiny", checkpoint="none"),
        device=torch.device("cpu"),
        seed=seed,
    )
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


def test_ucmt_teacher_follows_both_students_after_each_of_the_two_steps(monkeypatch):
    """Official train.py:225 and :337: weighted_update after step 1 and again after step 2, both
    with the iteration's decay."""
    m = make_method("ucmt", iterations=100)
    perturb(*m.nets.values())
    snapshots = [params_of(m.nets["teacher"])]
    real_step = m.update

    def record(loss, *names):
        real_step(loss, *names)
        snapshots.append((params_of(m.nets["student1"]), params_of(m.nets["student2"])))

    monkeypatch.setattr(m, "update", record)
    m.train_step(random_batch(), 9)
    teacher0, (s1a, s2a), (s1b, s2b) = snapshots
    d = 0.9  # min(1 - 1/10, 0.99)
    for name, t in m.nets["teacher"].named_parameters():
        after_first = d * teacher0[name] + (1 - d) * (0.99 * s1a[name] + 0.01 * s2a[name])
        expected = d * after_first + (1 - d) * (0.99 * s1b[name] + 0.01 * s2b[name])
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(t, after_first)  # a second update happened


def test_ucmt_reports_the_ema_teacher():
    """Official train.py:356-359 saves the teacher; eval.py:64-66 evaluates that file."""
    m = make_method("ucmt")
    m.train_step(random_batch(), 0)
    x = random_batch(seed=1).x
    m.eval()
    with torch.no_grad():
        expected = m.nets["teacher"](x).softmax(1)
        student = m.nets["student1"](x).softmax(1)
    assert torch.equal(m.predict(x), expected)
    assert not torch.allclose(expected, student)


def test_ucmt_unlabeled_weight_is_alpha_over_two_per_term_ramped_over_a_fifth_of_the_run():
    """Official train.py:134, 211-221: loss_u = alpha (cps1 + cps2)/2 + alpha (cmt1 + cmt2)/2 with
    alpha 0.1, ramped over 5 of 25 epochs."""
    m = make_method("ucmt", iterations=100)
    assert (m.p.unsup_weight, m.p.rampup_fraction) == (0.1, 0.2)
    assert m.train_step(random_batch(), 20)["w_unsup"] == pytest.approx(0.1)
    assert m.train_step(random_batch(), 10)["w_unsup"] == pytest.approx(0.1 * np.exp(-5 * 0.25))

    torch.manual_seed(3)
    terms = m.train_step(random_batch(), 50)
    for suffix in ("", "_mix"):
        expected = sum(
            terms[f"sup_{s}{suffix}"] + 0.05 * (terms[f"cps_{s}{suffix}"] + terms[f"cmt_{s}{suffix}"])
            for s in ("student1", "student2")
        )
        assert terms[f"loss_{'plain' if not suffix else 'mix'}"] == pytest.approx(expected, rel=1e-6)


def test_per_image_dice_uses_a_plain_denominator_per_image():
    """Official loss_functions.py:18-40: (2 I + s) / (sum p + sum t + s) per image and class."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 2, 8, 8, generator=g), torch.randint(0, 2, (3, 8, 8), generator=g)
    p = logits.softmax(1).numpy()
    dices = []
    for b in range(3):
        for k in range(2):
            t = (labels[b] == k).numpy()
            dices.append((2 * (p[b, k] * t).sum() + 1e-5) / (p[b, k].sum() + t.sum() + 1e-5))
    assert per_image_dice_loss(logits, labels).item() == pytest.approx(1 - np.mean(dices), rel=1e-6)


@pytest.mark.parametrize("labeled_rows", [True, False])
def test_cps_targets_are_the_peers_detached_argmax(labeled_rows):
    """net2's gradient is exactly that of sup2 + w * CE(net2, argmax net1): nothing reaches net2
    through net1's pseudo-label loss, and the target is the peer's hard prediction, on every image
    (CPS paper) or on the unlabeled ones only (SSL4MIS)."""
    m = make_method(
        "cps",
        cps_weight=1.0,
        rampup_fraction=0.0,  # full weight from step 0
        pseudo_supervise_labeled=labeled_rows,
    )
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
    rows = slice(0, 4) if labeled_rows else slice(2, 4)
    loss = ce_dice_loss(l2[:2], batch.y_l) + F.cross_entropy(l2[rows], target[rows])
    expected = torch.autograd.grad(loss, list(ref.nets["net2"].parameters()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=name)


def test_mean_teacher_consistency_is_off_for_the_first_thirtieth_then_ramps_in_stages():
    """SSL4MIS train_mean_teacher_2D.py:169-174: weight 0.1 x sigmoid_rampup(iter // 150, 200), and no
    consistency before iteration 1000 (of 30k)."""
    m = make_method("mt", iterations=30000)
    ramp = lambda stage: 0.1 * np.exp(-5 * (1 - stage / 200) ** 2)  # noqa: E731
    assert m.consistency_weight(999) == 0.0
    assert m.consistency_weight(1000) == pytest.approx(ramp(6))  # 1000 // 150
    assert m.consistency_weight(1049) == pytest.approx(ramp(6))
    assert m.consistency_weight(1050) == pytest.approx(ramp(7))
    assert m.consistency_weight(29999) == pytest.approx(ramp(199))
    short = make_method("mt", iterations=300)  # the same shape in fractions of a shorter run
    assert [short.consistency_weight(s) for s in (9, 10)] == [0.0, pytest.approx(ramp(6))]
    assert short.consistency_weight(11) == pytest.approx(ramp(7))  # 11 * 200 / 300 = 7.33
    assert make_method("mt", iterations=300, consistency_start_fraction=0.0).consistency_weight(0) > 0


def test_mean_teacher_rate_is_set_from_the_previous_iteration_as_in_ssl4mis():
    """train_mean_teacher_2D.py:180-184: the rate is set after the step from iter_num, before it is incremented."""
    m = make_method("mt", iterations=100)
    for step, expected in ((0, 0.01), (1, 0.01), (5, 0.01 * (1 - 4 / 100) ** 0.9)):
        m.train_step(random_batch(), step)
        assert m.optimizers["student"].param_groups[0]["lr"] == pytest.approx(expected)


def test_patch_grid_keeps_patches_of_at_least_four_pixels():
    assert [patch_grid(s, 16, 4) for s in (256, 64, 32, 16)] == [16, 16, 8, 4]


def loop_mix(base: torch.Tensor, donor: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, grid: int):
    """Reference patch move, one patch at a time: ``base`` with ``donor``'s patches ``src`` at ``dest``."""
    out = base.clone()
    p = base.shape[-1] // grid
    for b in range(len(base)):
        for d, s in zip(dest[b].tolist(), src[b].tolist()):
            (dr, dc), (sr, sc) = divmod(d, grid), divmod(s, grid)
            patch = donor[b, ..., sr * p : (sr + 1) * p, sc * p : (sc + 1) * p]
            out[b, ..., dr * p : (dr + 1) * p, dc * p : (dc + 1) * p] = patch
    return out


def official_umix(image: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Reference UMIX written from the official loop (train.py:254-273), one patch at a time."""
    out = image.clone()
    p = image.shape[-1] // grid
    means = [u.reshape(len(u), grid, p, grid, p).mean((2, 4)).flatten(1) for u in (u1, u2)]
    order = [torch.sort(m, dim=1, descending=True).indices for m in means]

    def patch(b, index):
        r, c = divmod(index, grid)
        return (b, ..., slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))

    for b in range(len(image)):
        for a, z in ((0, 1), (1, 0)):  # student 1's uncertain patches first, then student 2's
            dests, srcs = order[a][b, :k].tolist(), order[z][b, -k:].tolist()
            donors = [out[patch(b, s)].clone() for s in srcs]  # one statement: sources read before writing
            for dest, donor in zip(dests, donors):
                out[patch(b, dest)] = donor
    return out


def test_umix_moves_patches_both_ways_like_the_official_loop():
    g = torch.Generator().manual_seed(3)
    u1, u2 = torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    umix = plan_umix(u1, u2, grid=8, k=2)
    for b in range(3):  # independent ranking of the 4x4-pixel patch means
        m1 = u1[b].numpy().reshape(8, 4, 8, 4).mean((1, 3)).ravel()
        m2 = u2[b].numpy().reshape(8, 4, 8, 4).mean((1, 3)).ravel()
        first, second = umix.moves
        assert first.dest[b].tolist() == list(np.argsort(-m1)[:2])  # student 1's most uncertain ...
        assert first.src[b].tolist() == list(np.argsort(-m2)[-2:])  # ... get student 2's least uncertain
        assert second.dest[b].tolist() == list(np.argsort(-m2)[:2])  # and the other way round
        assert second.src[b].tolist() == list(np.argsort(-m1)[-2:])

    image = torch.rand(3, 3, 32, 32, generator=g)
    mixed = umix.apply(image)
    assert torch.equal(mixed, official_umix(image, u1, u2, 8, 2))
    changed = (mixed != image).any(dim=1).float().mean(dim=(1, 2))
    assert (changed > 2 * 16 / 1024).all()  # more than one direction's two patches of 16 px
    label = lambda img: (img[:, 0] > 0.5).long()  # noqa: E731  (a label that is a function of the pixels)
    assert torch.equal(umix.apply(label(image)), label(mixed))

    # Where both directions write the same patch, the second wins, as in the official in-place loop.
    same = plan_umix(u1, u1, grid=8, k=2)
    assert torch.equal(same.apply(image), official_umix(image, u1, u1, 8, 2))


def test_ucmt_second_update_trains_both_students_on_one_mixed_image_labeled_rows_included(monkeypatch):
    m = make_method("ucmt")
    batch = random_batch()
    calls = []
    real_update = m._update

    def record(b, step, x_l, y_l, views, teacher_label, w, with_extra_loss):
        logits, loss, terms = real_update(b, step, x_l, y_l, views, teacher_label, w, with_extra_loss)
        calls.append((x_l, y_l, views, teacher_label, logits, with_extra_loss))
        return logits, loss, terms

    monkeypatch.setattr(m, "_update", record)
    torch.manual_seed(0)
    m.train_step(batch, 0)
    (x_l1, y_l1, views1, teacher1, logits1, extra1), (x_l2, y_l2, views2, teacher2, _, extra2) = calls
    assert (extra1, extra2) == (True, False)  # a plug-in's term (SKD) joins the un-mixed update only
    assert torch.equal(x_l1, batch.x_l) and torch.equal(y_l1, batch.y_l)
    assert torch.equal(views2[0], views2[1])  # both students train on the same mixed image

    # Redo the mixing independently, from the first step's predictions and view A1.
    m2 = make_method("ucmt")  # same seed: the weights m had before its first step
    view_a1 = ucmt_module.strong_augment(batch.x, torch.Generator().manual_seed(0 * 1000 + 11))
    assert torch.equal(view_a1[2:], views1[0])
    torch.manual_seed(0)  # the teacher's passes draw the same dropout masks as m's did
    with torch.no_grad():
        teacher = m2.nets["teacher"]
        teacher_prob = torch.cat([teacher(batch.x_l), teacher(batch.x_u)]).softmax(1)
    torch.testing.assert_close(teacher_prob[2:].argmax(1), teacher1, rtol=0, atol=0)
    u = [ucmt_module.mean_entropy(out.softmax(1), teacher_prob) for out in logits1]
    mixed = official_umix(view_a1, u[0], u[1], m.grid, 2)
    assert torch.equal(torch.cat([x_l2, views2[0]]), mixed)
    labels = official_umix(torch.cat([batch.y_l, teacher1])[:, None].float(), u[0], u[1], m.grid, 2)[:, 0].long()
    assert torch.equal(torch.cat([y_l2, teacher2]), labels)
    assert not torch.equal(x_l2, view_a1[:2])  # the labeled rows were mixed ...
    assert not torch.equal(y_l2, batch.y_l)  # ... with their ground truth


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

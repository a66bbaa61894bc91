"""The SKD plug-in: X+skd = X's step + SAM's own update + KD from SAM into every student."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from knowsam.errors import ConfigError, KnowsamError
from knowsam.losses import kd_loss
from knowsam.methods import get_method
from knowsam.methods.registry import method_params
from knowsam.methods.sam_support import build_sam_teacher, trained_state
from knowsam.methods.skd import SAM_STATE
from knowsam.models.sam_teacher import SamTeacher
from tests.test_baselines import loop_mix, loss_before_after, make_method, random_batch

STUDENTS = {"mt": ["student"], "cps": ["net1", "net2"], "ucmt": ["student1", "student2"] * 2}


def test_skd_params_extend_the_base_params():
    cls = get_method("mt+skd")
    assert issubclass(cls, get_method("mt")) and cls.name == "mt+skd" and get_method("mt+skd") is cls
    p = method_params("mt+skd", {"ema_decay": 0.9, "kd_weight": 0.5})
    assert (p.ema_decay, p.noise_std, p.kd_weight, p.kd_temperature, p.sam_lr) == (0.9, 0.1, 0.5, 10.0, 1e-4)
    method_params("mt+skd", {"consistency": 0.2, "kd_temperature": 4.0})
    with pytest.raises(ConfigError, match="unknown key 'method_params.mt\\+skd.kd_tau'"):
        method_params("mt+skd", {"kd_tau": 4.0})


@pytest.mark.parametrize("name", ["mt", "cps", "ucmt"])
def test_skd_loss_is_the_base_loss_plus_kd_from_sam(name):
    base = make_method(name)
    skd = make_method(f"{name}+skd", kd_weight=0.5, kd_temperature=4.0)
    for k, net in base.nets.items():  # same seed: the plug-in leaves X's networks as they were
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), skd.nets[k].state_dict().values()))
    batch = random_batch()

    # SAM's targets, computed apart with a separately built teacher (same seed, so same weights)
    # prompted by the main student's eval-mode logits, the whole batch at once: the prompt heads'
    # training-mode BatchNorm sees one batch, as in knowsam and the official code (two half
    # batches would give other statistics, hence other targets).
    sam, _ = build_sam_teacher(skd.ctx)
    for m in (*sam.prompt_heads.modules(), *skd.sam.prompt_heads.modules()):
        if isinstance(m, nn.Dropout):  # the two teachers would draw different masks
            m.p = 0.0
    main = skd.nets[type(base).main_student]
    with torch.no_grad():
        main.eval()
        prompt = main(batch.x)
        main.train()
        target = sam(batch.x, prompt)
        halves = torch.cat([sam(batch.x_l, prompt[:2]), sam(batch.x_u, prompt[2:])])
    assert (halves - target).abs().max() > 1e-2 * target.abs().max()  # the test tells the two apart

    calls = []
    hook = skd.student_extra_loss

    def record(student, logits, b):
        out = hook(student, logits, b)
        mix = getattr(skd, "_umix", None)
        calls.append((student, logits.detach(), out.item(), mix))
        return out

    skd.student_extra_loss = record
    torch.manual_seed(1)
    plain = base.train_step(batch, 3)
    torch.manual_seed(1)
    with_kd = skd.train_step(batch, 3)

    assert [c[0] for c in calls] == STUDENTS[name]  # every student, every update
    for student, logits, value, mix in calls:
        expected = target
        if mix is not None:  # UCMT's mixed pass: SAM's logits moved with the same patches, every row
            for move in mix.moves:
                expected = loop_mix(expected, expected, move.dest, move.src, skd.grid)
        assert value == pytest.approx(0.5 * kd_loss(logits, expected, 4.0).item(), rel=1e-4), student
    first_update = len(STUDENTS[name]) if name != "ucmt" else 2
    kd_sum = sum(c[2] for c in calls[:first_update])
    loss_key = "loss_plain" if name == "ucmt" else "loss"
    assert with_kd[loss_key] == pytest.approx(plain[loss_key] + kd_sum, rel=1e-5)
    assert kd_sum > 1e-4 * plain[loss_key]  # the KD term is not vanishingly small
    for key, value in plain.items():  # X's own terms of the first update are untouched
        if key.startswith(("sup", "cons", "cps", "unsup", "w_")) and not key.endswith("_mix"):
            assert with_kd[key] == value, key
    assert with_kd["sam"] > 0


def test_skd_state_round_trip_restores_sam_and_resumes_exactly():
    batch = random_batch()
    a = make_method("mt+skd")
    a.train_step(batch, 0)
    state = a.state_dict()
    sam_state = state["weights"][SAM_STATE]  # with the weights: best.pt can score the teacher row
    assert sam_state["trained"] and all(SamTeacher.is_added_name(k) for k in sam_state["trained"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = make_method("mt+skd")
    b.load_state_dict(saved)
    for k, v in trained_state(a.sam).items():
        assert torch.equal(v, trained_state(b.sam)[k]), k
    terms = []
    for method in (a, b):
        torch.manual_seed(5)
        terms.append(method.train_step(batch, 1))
    assert terms[0] == terms[1]
    for (k, va), vb in zip(trained_state(a.sam).items(), trained_state(b.sam).values()):
        assert torch.equal(va, vb), k  # same Adam moments, same update
    torch.testing.assert_close(a.nets["teacher"].state_dict(), b.nets["teacher"].state_dict(), rtol=0, atol=0)

    saved["weights"][SAM_STATE]["frozen_sha256"] = "0" * 64
    with pytest.raises(KnowsamError, match="other frozen SAM weights"):
        make_method("mt+skd").load_state_dict(saved)


def test_skd_provenance_names_the_sam_weights():
    prov = make_method("cps+skd").provenance()
    assert prov["sam_weights"] == "random-init" and prov["sam_arch"] == "tiny"


@pytest.mark.parametrize("name", ["mt+skd", "cps+skd", "ucmt+skd"])
def test_skd_loss_decreases_on_real_polyp_images(name):
    # Two images of each kind per batch: at 64 px the prompt heads' last block (training-mode
    # BatchNorm) works on a 1x1 map, which needs more than one value per channel.
    before, after = loss_before_after(name, per_batch=2)
    assert after < 0.8 * before, (before, after)

"""The SKD plug-in: X+skd = X's step + SAM's own update + KD from SAM into every student."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from knowsam.errors import KnowsamError
from knowsam.losses import kd_loss
from knowsam.methods import get_method
from knowsam.methods.sam_support import build_sam_teacher, trained_state
from knowsam.methods.skd import SAM_OPTIMIZER, SAM_STATE
from knowsam.models.sam_teacher import SamTeacher
from tests.test_baselines import loss_before_after, make_method, random_batch
from tests.test_knowsam import grads, has_grad

STUDENTS = {"mt": ["student"], "cps": ["net1", "net2"], "ucmt": ["student1", "student2"]}


def record_hook(method, calls: list) -> None:
    """Record each ``student_extra_loss`` call as (student, logits detached, the term's value)."""
    hook = method.student_extra_loss

    def record(student, logits, b):
        out = hook(student, logits, b)
        calls.append((student, logits.detach(), out.item() if isinstance(out, torch.Tensor) else out))
        return out

    method.student_extra_loss = record


@pytest.mark.parametrize("name", ["mt", "cps", "ucmt"])
def test_skd_loss_is_the_base_loss_plus_kd_from_sam(name):
    base = make_method(name)
    skd = make_method(f"{name}+skd", kd_weight=0.5, kd_temperature=4.0)
    for k, net in base.nets.items():  # same seed: the plug-in leaves X's networks as they were
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), skd.nets[k].state_dict().values()))
    for m in skd.sam.prompt_heads.modules():
        if isinstance(m, nn.Dropout):  # the teacher built apart below would draw other masks
            m.p = 0.0
    batch = random_batch()
    plain_calls, calls = [], []
    record_hook(base, plain_calls)
    record_hook(skd, calls)
    torch.manual_seed(1)
    plain = base.train_step(batch, 3)
    torch.manual_seed(1)
    with_kd = skd.train_step(batch, 3)

    # One KD term per student and iteration: UCMT's mixed update takes none.
    assert [c[0] for c in calls] == [c[0] for c in plain_calls] == STUDENTS[name]
    # SAM's targets, computed apart with a separately built teacher (same seed, so same weights)
    # prompted by X's main student's training logits on the plain run (the plug-in runs X's
    # forward passes unchanged), the whole batch at once: the prompt heads' training-mode
    # BatchNorm sees one batch, as in knowsam and the official code (two half batches would give
    # other statistics, hence other targets).
    sam, _ = build_sam_teacher(skd.ctx)
    for m in sam.prompt_heads.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    prompt = plain_calls[0][1]
    with torch.no_grad():
        target = sam(batch.x, prompt)
        halves = torch.cat([sam(batch.x_l, prompt[:2]), sam(batch.x_u, prompt[2:])])
    assert (halves - target).abs().max() > 1e-2 * target.abs().max()  # the test tells the two apart
    for (student, logits, value), (_, plain_logits, _) in zip(calls, plain_calls):
        assert torch.equal(logits, plain_logits), student  # X's forward passes as without the plug-in
        assert value == pytest.approx(0.5 * kd_loss(logits, target, 4.0).item(), rel=1e-4), student
    kd_sum = sum(c[2] for c in calls)
    loss_key = "loss_plain" if name == "ucmt" else "loss"
    assert with_kd[loss_key] == pytest.approx(plain[loss_key] + kd_sum, rel=1e-5)
    assert kd_sum > 1e-4 * plain[loss_key]  # the KD term is not vanishingly small
    assert with_kd["kd"] == pytest.approx(2 * kd_sum / len(calls), rel=1e-6)  # logged unweighted, per student
    for key, value in plain.items():  # X's own terms of the first update are untouched
        if key.startswith(("sup", "cons", "cps", "cmt", "w_")) and not key.endswith("_mix"):
            assert with_kd[key] == value, key
    if name == "ucmt":  # the mixed update's loss is X's terms alone
        w = with_kd["w_unsup"]
        mixed = sum(
            with_kd[f"sup_{s}_mix"] + 0.5 * w * (with_kd[f"cps_{s}_mix"] + with_kd[f"cmt_{s}_mix"])
            for s in STUDENTS["ucmt"]
        )
        assert with_kd["loss_mix"] == pytest.approx(mixed, rel=1e-6)
    assert with_kd["sam"] > 0


@pytest.mark.parametrize("name", ["mt", "cps", "ucmt"])
def test_skd_prompts_sam_with_the_main_students_training_logits_and_adds_no_forward(name):
    base = make_method(name)
    skd = make_method(f"{name}+skd")
    main = type(base).main_student
    forwards = {}  # (method, net) -> [(training mode, output)]
    for label, method in (("base", base), ("skd", skd)):
        for net_name, net in method.nets.items():
            outputs = forwards.setdefault((label, net_name), [])
            net.register_forward_hook(
                lambda mod, args, out, outputs=outputs: outputs.append((mod.training, out.detach()))
            )
    prompts = []
    decode = skd.sam.decode

    def record_decode(embeddings, dense_logits, *args, **kwargs):
        prompts.append(dense_logits)
        return decode(embeddings, dense_logits, *args, **kwargs)

    skd.sam.decode = record_decode
    calls = []
    record_hook(skd, calls)
    batch = random_batch()
    for method in (base, skd):
        torch.manual_seed(1)
        method.train_step(batch, 3)

    for net_name in base.nets:  # the plug-in runs no forward pass of X's networks of its own
        assert len(forwards[("skd", net_name)]) == len(forwards[("base", net_name)]) > 0, net_name
    assert len(prompts) == 1  # SAM decodes the batch once
    prompt = prompts[0]
    assert not prompt.requires_grad  # detached: L_sam cannot reach the student
    assert calls[0][0] == main and torch.equal(prompt, calls[0][1])
    # ... the logits of the main student's first forward passes of the step, in train mode:
    # UCMT's student 1 predicts the labeled images and its view of the unlabeled ones apart.
    passes = forwards[("skd", main)][: 2 if name == "ucmt" else 1]
    assert all(training for training, _ in passes)
    assert torch.equal(prompt, torch.cat([out for _, out in passes]))
    assert prompt.shape == (len(batch.x), 2, *batch.x.shape[-2:])


@pytest.mark.parametrize("name", ["mt", "cps", "ucmt"])
def test_skd_graphs_of_sam_and_of_the_students_are_disjoint(name):
    skd = make_method(f"{name}+skd")
    real_update = skd.update
    students = {n: net for n, net in skd.nets.items() if any(p.requires_grad for p in net.parameters())}
    seen = []

    def checked(loss, *names, **kwargs):
        into_sam = grads(loss, skd.sam)
        into_students = {n: grads(loss, net) for n, net in students.items()}
        if names == (SAM_OPTIMIZER,):  # L_sam: SAM's trainable tensors only
            assert any(has_grad(g) for g in into_sam.values())
            assert not any(has_grad(g) for gs in into_students.values() for g in gs.values())
        else:  # X's losses, KD included: X's students only
            assert not any(has_grad(g) for g in into_sam.values())
            assert all(any(has_grad(g) for g in into_students[n].values()) for n in names)
        seen.append(names)
        real_update(loss, *names, **kwargs)

    skd.update = checked
    torch.manual_seed(1)
    skd.train_step(random_batch(), 3)
    assert seen.count((SAM_OPTIMIZER,)) == 1 and len(seen) == {"mt": 2, "cps": 2, "ucmt": 3}[name]


@pytest.mark.parametrize(
    "order, error",
    [
        (["net2", "net1"], "called student_extra_loss for net2 before its main student net1"),
        (["net1", "net1"], "called student_extra_loss twice for net1 in one iteration"),
    ],
)
def test_skd_refuses_hook_calls_out_of_order(monkeypatch, order, error):
    def train_step(self, batch, step):
        for student in order:
            self.student_extra_loss(student, self.nets[student](batch.x), batch)
        return {}

    monkeypatch.setattr(get_method("cps"), "train_step", train_step)
    with pytest.raises(RuntimeError, match=error):
        make_method("cps+skd").train_step(random_batch(), 0)


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

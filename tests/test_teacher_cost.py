"""The SAM teacher's cheaper path: the same outputs and gradients as the previous one; its options
(``sam.prompt_grid``, ``sam.amp_bf16``) validated and recorded; ``plan --profile`` and ``--set``.

Tolerances: outputs within 1e-5 of their largest magnitude; gradients within 1e-4 of each
tensor's norm plus 1e-6 of the largest gradient norm (a conv bias before BatchNorm has a
gradient of 0 up to rounding). The cheaper path sums in another order (fewer rows per decoder call, fused
LayerNorm), so float rounding differs; nothing else may.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from knowsam import config, step_timing
from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.data.geometry import ViewGeometry
from knowsam.methods import MethodContext, get_method
from knowsam.methods.knowsam import supervised_loss
from knowsam.methods.registry import method_params
from knowsam.models.sam_checkpoint import load_sam_weights, resolve_checkpoint
from knowsam.models.sam_teacher import SamTeacher, embedding_shape
from knowsam.report.leaderboard import _sam_note
from knowsam.runs import RunId, config_hash, run_config
from knowsam.train import apply_speed_options
from tests.test_catalogue import cli, one_line, params_dict, write_params  # noqa: F401 (cli is a fixture)

OUTPUT_TOLERANCE, GRAD_TOLERANCE, GRAD_FLOOR = 1e-5, 1e-4, 1e-6


def previous_decode(t: SamTeacher, emb: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """The decode this project ran before: heads on the embedding's own grid, the embedding repeated
    K times, SAM's own convolution stacks, a graph through every row."""
    b, k = emb.shape[0], t.num_classes
    sparse = torch.stack([head(emb) for head in t.prompt_heads], dim=1)
    masks = F.interpolate(
        dense_logits.detach(), size=t.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False
    )
    dense = t.prompt_encoder.mask_downscaling(masks.reshape(b * k, 1, *masks.shape[-2:]))
    dec, n, c, e = t.mask_decoder, b * k, emb.shape[1], emb.shape[-1]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse.flatten(0, 1)], dim=1)
    src = emb.repeat_interleave(k, dim=0) + dense
    hs, src = dec.transformer(src, t.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1), tokens)
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, e, e))
    low = torch.einsum("nc,nchw->nhw", dec.output_hypernetworks_mlps[0](hs[:, 1, :]), upscaled)
    return F.interpolate(
        low.view(b, k, 4 * e, 4 * e), size=(t.image_size, t.image_size), mode="bilinear", align_corners=False
    )


def trainable_grads(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, got)}


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    floor = GRAD_FLOOR * max(g.norm() for g in expected.values())
    for name, g in expected.items():
        assert (got[name] - g).norm() <= GRAD_TOLERANCE * g.norm() + floor, name


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= OUTPUT_TOLERANCE * expected.abs().max()


# --- the same maths, cheaper ------------------------------------------------------------------
@pytest.mark.parametrize("arch, size", [("tiny", 64), ("lite_medsam", 64)])
def test_decode_equals_the_previous_path_outputs_and_gradients(arch, size):
    """Heads on the full grid (``prompt_grid: full``): the cheaper decode with a graph on the labeled
    rows only equals the previous decode in every logit and in every gradient of L_sam. LiteMedSAM
    with its bundled weights (the trained LayerNorms and decoder MLPs), the random ``tiny`` SAM."""
    k, n_l = 2, 2
    torch.manual_seed(0)
    t = SamTeacher(arch, size, k, encoder="cached", prompt_grid="full", load_decoder_mlp=True).train()
    if arch == "lite_medsam":
        load_sam_weights(t, resolve_checkpoint("bundled", arch, Path("unused")))
    c, e, _ = embedding_shape(arch, size)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2 * n_l, c, e, e, generator=g)
    dense = torch.randn(2 * n_l, k, size, size, generator=g) * 3
    y = torch.randint(0, k, (n_l, size, size), generator=g)
    torch.manual_seed(2)  # the prompt heads' dropout draws the same masks in both (they run first in both)
    expected = previous_decode(t, emb, dense)
    expected_grads = trainable_grads(supervised_loss(expected[:n_l], y), t)
    torch.manual_seed(2)
    got = t.decode(emb, dense, grad_rows=n_l)
    assert_close(got, expected)
    unlabeled = torch.autograd.grad(got[n_l:].sum(), t.trainable_parameters(), retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in unlabeled)  # the other rows were decoded without a graph
    assert_same_grads(trainable_grads(supervised_loss(got[:n_l], y), t), expected_grads)
    assert any(g.abs().sum() > 0 for n, g in expected_grads.items() if n.startswith("mask_decoder."))


def _knowsam(encoder: str, seed: int = 0):
    ctx = MethodContext(
        in_channels=3,
        num_classes=2,
        image_size=32,
        iterations=10,
        train=TrainParams(lr=0.01),
        sam=SamParams(arch="tiny", checkpoint="none", encoder=encoder),
        device=torch.device("cpu"),
        seed=seed,
    )
    torch.manual_seed(seed)
    method = get_method("knowsam")(ctx, method_params("knowsam", {"mixed_iterations": 0.0}))
    method.train()
    return method


def _batch(encoder: str) -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = torch.randint(0, 2, (2, 32, 32), generator=g)
    if encoder == "adapters":
        return Batch(x[:2], y, x[2:])
    emb = torch.randn(4, *embedding_shape("tiny", 32), generator=g)
    return Batch(x[:2], y, x[2:], teacher_embeddings=emb, geometry=ViewGeometry.identity(4))


@pytest.mark.parametrize("encoder", ["adapters", "cached"])
def test_knowsam_step_equals_the_previous_path(encoder, monkeypatch):
    """A whole step (mixing on): the two official updates with the cheaper teacher give the gradients
    of the previous step, one backward of L_sam + L_net with the decoder's graph over every row."""
    batch, step = _batch(encoder), 5
    new, old = _knowsam(encoder), _knowsam(encoder)
    torch.manual_seed(7)
    logged = new.train_step(batch, step)
    decode = SamTeacher.decode
    monkeypatch.setattr(SamTeacher, "decode", lambda self, emb, dense, grad_rows=None: decode(self, emb, dense))
    torch.manual_seed(7)
    terms = old.losses(batch, step)
    for opt in old.optimizers.values():
        opt.zero_grad(set_to_none=True)
    (terms["sam"] + terms["net"]).backward()
    for name, value in terms.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    assert old.mixing_at(step) and logged["unet_mix"] > 0
    for net in old.nets:
        got = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in new.nets[net].named_parameters()}
        assert_same_grads(
            got, {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in old.nets[net].named_parameters()}
        )


def test_skd_shares_the_teacher_path_and_trains_the_encoder_adapters():
    method = get_method("mt+skd")
    ctx = MethodContext(
        in_channels=3,
        num_classes=2,
        image_size=32,
        iterations=10,
        train=TrainParams(lr=0.01),
        sam=SamParams(arch="tiny", checkpoint="none"),
        device=torch.device("cpu"),
        seed=0,
    )
    m = method(ctx, method_params("mt+skd", {}))
    m.train()
    seen, decode = [], SamTeacher.decode
    with mock.patch.object(
        SamTeacher,
        "decode",
        lambda self, emb, dense, grad_rows=None: (
            seen.append((len(emb), grad_rows)) or decode(self, emb, dense, grad_rows)
        ),
    ):
        m.train_step(_batch("adapters"), 1)
    assert seen == [(4, 2)]  # the whole batch decoded at once, a graph on the 2 labeled rows
    adapters = [p.grad for n, p in m.sam.named_parameters() if n.startswith("image_encoder.") and p.requires_grad]
    assert adapters and all(g is not None and g.abs().sum() > 0 for g in adapters)
    assert m.sam in m.speed_modules()


# --- options ------------------------------------------------------------------------------------
def test_prompt_grid_pools_the_embedding_the_heads_see():
    torch.manual_seed(0)
    t = SamTeacher("lite_medsam", 64, 2, encoder="cached").eval()  # default: 16
    c, e, _ = embedding_shape("lite_medsam", 64)
    g = torch.Generator().manual_seed(0)
    stripes = (torch.arange(e) % 2 * 2 - 1).float()  # +-1 column stripes: every 4x4 block averages them out
    emb = torch.randn(2, c, e, e, generator=g) * 0.1 + torch.randn(2, c, 1, 1, generator=g) * stripes
    with torch.no_grad():
        pooled = F.avg_pool2d(emb, 4)  # 64x64 -> 16x16, each token the mean of a 4x4 block
        expected = torch.stack([head(pooled) for head in t.prompt_heads], dim=1)
        assert torch.allclose(t.prompts(emb), expected, rtol=1e-5, atol=1e-6)
        full = torch.stack([head(emb) for head in t.prompt_heads], dim=1)
        blank = torch.stack([head(torch.zeros_like(emb)) for head in t.prompt_heads], dim=1)
        # The option changes the prompts: by more than a tenth of what the embedding contributes at all.
        assert (full - expected).abs().max() > 0.1 * (full - blank).abs().max()
        t.prompt_grid = 64  # prompt_grid: full
        assert torch.allclose(t.prompts(emb), full, rtol=1e-5, atol=1e-6)
    # The ViTs' embedding at 256 px is 16x16 already: the default is a no-op there (parity unchanged).
    assert SamTeacher("tiny", 256, 2, encoder="cached").prompt_grid == 16
    assert SamTeacher("tiny", 64, 2, encoder="cached").prompt_grid == 4
    assert SamTeacher("lite_medsam", 64, 2, encoder="cached", prompt_grid="full").prompt_grid == 64


def test_bf16_teacher_is_close_to_float32_and_returns_float32():
    torch.manual_seed(0)
    fp32 = SamTeacher("tiny", 64, 2, encoder="cached").eval()
    bf16 = SamTeacher("tiny", 64, 2, encoder="cached", bf16=True).eval()
    bf16.load_state_dict(fp32.state_dict())
    g = torch.Generator().manual_seed(0)
    emb, dense = torch.randn(2, *embedding_shape("tiny", 64), generator=g), torch.randn(2, 2, 64, 64, generator=g)
    with torch.no_grad():
        a, b = fp32.decode(emb, dense), bf16.decode(emb, dense)
    assert b.dtype == torch.float32
    diff = (a - b).abs().max() / a.abs().max()
    assert 0 < diff < 0.1, diff  # bfloat16's 8-bit mantissa: about 1e-2 relative, not the same numbers


@pytest.mark.parametrize(
    "value, pattern",
    [
        (0, r"'sam.prompt_grid' must be a positive integer or 'full', got 0"),
        ("half", r"'sam.prompt_grid' must be a positive integer or 'full', got 'half'"),
        (16.0, r"'sam.prompt_grid' must be int or str, got 16.0"),
        (True, r"'sam.prompt_grid' must be int or str, got True"),
    ],
    ids=["zero", "word", "float", "bool"],
)
def test_bad_prompt_grid_is_one_line_naming_the_key(tmp_path, cli, value, pattern):  # noqa: F811
    ws = tmp_path / "ws"
    write_params(ws, params_dict(sam={"prompt_grid": value}))
    one_line(*cli(ws, "split", "demo"), 2, r"^error: params: " + pattern)
    assert not (ws / "data").exists()


def test_bad_amp_bf16_is_one_line_naming_the_key(tmp_path, cli):  # noqa: F811
    ws = tmp_path / "ws"
    write_params(ws, params_dict(sam={"amp_bf16": "yes"}))
    one_line(*cli(ws, "split", "demo"), 2, r"^error: params: 'sam.amp_bf16' must be bool, got 'yes'")


def test_options_are_in_the_run_identity_and_the_leaderboard_note():
    params = config.parse(params_dict())
    run = RunId("knowsam", "demo", 0.1, 0)
    hashes = {
        config_hash(run_config(dataclasses.replace(params, sam=dataclasses.replace(params.sam, **change)), run))
        for change in ({}, {"prompt_grid": "full"}, {"prompt_grid": 8}, {"amp_bf16": True})
    }
    assert len(hashes) == 4
    ctx = MethodContext(
        in_channels=3,
        num_classes=2,
        image_size=64,
        iterations=10,
        train=TrainParams(),
        sam=SamParams(arch="lite_medsam", checkpoint="none", amp_bf16=True),
        device=torch.device("cpu"),
        seed=0,
    )
    provenance = get_method("knowsam")(ctx, method_params("knowsam", {})).provenance()
    assert provenance["sam_options"] == "prompt heads on the 64x64 embedding pooled to 16x16, bf16 autocast"
    rows = pd.DataFrame(
        [
            {
                "variant": "",
                "method": "knowsam",
                "sam_arch": "lite_medsam",
                "sam_weights": "lite_medsam.pth sha256 79d8c9dca6db",
                "sam_encoder": "cached",
                "sam_options": provenance["sam_options"],
            }
        ]
    )
    assert _sam_note(rows) == (
        "SAM teacher weights: `lite_medsam` lite_medsam.pth sha256 79d8c9dca6db, frozen "
        "encoder, embeddings cached, prompt heads on the 64x64 embedding pooled to 16x16, "
        "bf16 autocast (knowsam)."
    )


def test_compile_covers_the_mask_decoding_of_every_teacher():
    for name in ("knowsam", "mt+skd"):
        ctx = MethodContext(
            in_channels=3,
            num_classes=2,
            image_size=32,
            iterations=10,
            train=TrainParams(),
            sam=SamParams(arch="tiny", checkpoint="none"),
            device=torch.device("cpu"),
            seed=0,
        )
        method = get_method(name)(ctx, method_params(name, {}))
        with mock.patch.object(SamTeacher, "compile") as compile_teacher, mock.patch.object(torch.nn.Module, "compile"):
            apply_speed_options(method, TrainParams(compile=True))
        assert compile_teacher.call_count == 1, name
    torch.manual_seed(0)
    t = SamTeacher("tiny", 64, 2, encoder="cached").eval()
    g = torch.Generator().manual_seed(0)
    emb, dense = torch.randn(2, *embedding_shape("tiny", 64), generator=g), torch.randn(2, 2, 64, 64, generator=g)
    with torch.no_grad():
        eager = t.decode(emb, dense)
        t.compile(backend="eager")  # dynamo's graph capture without a compiler: the wiring, in seconds
        assert hasattr(t._predict_masks, "_torchdynamo_orig_callable")
        assert_close(t.decode(emb, dense), eager)


# --- the breakdown ------------------------------------------------------------------------------
def test_nested_parts_count_their_own_seconds_only(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0])  # outer opens, inner opens, inner closes, outer closes
    monkeypatch.setattr(step_timing.time, "perf_counter", lambda: next(clock))
    with step_timing.recording() as parts:
        with step_timing.part("outer"):
            with step_timing.part("inner"):
                pass
    assert parts == {"outer": 8.0, "inner": 2.0}
    with step_timing.part("outer"):  # not recording: nothing is counted, the clock is not read
        pass


def test_plan_profile_breaks_steps_into_parts_beside_labeled_only(demo_prepared, tmp_path, capsys, monkeypatch):
    from knowsam.cli import main

    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, params_dict(str(demo_prepared / "data/prepared")))
    code = main(
        [
            "plan",
            "--params",
            str(params),
            "--profile",
            "--format",
            "json",
            "--steps",
            "1",
            "--set",
            "methods=[knowsam, mt+skd]",
            "--set",
            "train.threads=1",
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in plan["methods"]] == ["knowsam", "mt+skd"]
    rows = {m["method"]: m for m in plan["breakdown"]["methods"]}
    assert list(rows) == ["labeled-only", "knowsam", "mt+skd"] and plan["breakdown"]["reference"] == "labeled-only"
    for row in rows.values():
        assert row["vs_reference"] == pytest.approx(row["step_s"] / rows["labeled-only"]["step_s"], abs=0.02)
        assert sum(row["parts"].values()) == pytest.approx(row["step_s"], abs=2e-3)  # the parts make up the step
    assert set(step_timing.TEACHER_PARTS) - {step_timing.TEACHER_ENCODER} <= set(rows["knowsam"]["parts"])
    assert {step_timing.DECODER, step_timing.TEACHER_BACKWARD} <= set(rows["mt+skd"]["parts"])
    assert rows["labeled-only"]["teacher_s"] == 0 and rows["knowsam"]["teacher_s"] > 0
    assert {m["method"]: m["step_s"] for m in plan["methods"]} == {n: rows[n]["step_s"] for n in ("knowsam", "mt+skd")}


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("train.threads", r"--set 'train.threads': write KEY=VALUE, e.g. train.threads=2"),
        ("train.thread=2", r"params: unknown key 'train.thread'"),
        ("sam.prompt_grid=0", r"params: 'sam.prompt_grid' must be a positive integer or 'full', got 0"),
    ],
    ids=["no-equals", "unknown-key", "bad-value"],
)
def test_plan_set_errors_are_one_line(tmp_path, cli, item, pattern):  # noqa: F811
    ws = tmp_path / "ws"
    write_params(ws, params_dict())
    one_line(*cli(ws, "plan", "--set", item), 2, pattern)

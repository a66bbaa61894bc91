"""Parity of this project's KnowSAM with the official code: outputs, loss terms, gradients and updates, on CPU.

Builds the official networks and trainer from a checkout of the official KnowSAM code
(taozh2017/KnowSAM; not shipped here), builds ours, copies the official weights into ours and runs
both on the same batch (fixed seed, 4 images = 2 labeled + 2 unlabeled, 256 px), in two
configurations. Every compared quantity is of one of four kinds:

- outputs: module by module, the U-Net, V-Net and fusion outputs of the official
  ``KnowSAM.forward`` (training mode, then eval mode), the learnable prompt heads per class and a
  windowed and a global adapted ViT-B encoder block; then, in each training iteration below, SAM's
  image embedding, the logits of the U-Net, V-Net, fusion module and SAM teacher, the mixed
  images and labels, and the networks' logits on the mixed batch;
- terms: every loss term of each training iteration, the official ones read from the frames of
  ``Trainer.train`` and ``Trainer.mix_up`` as they return, ours as ``KnowSam.train_step`` returns
  them: every term of ours comes from our own forward end to end, SAM teacher included. (The
  version before fed ours the official teacher's logits as a second group; it is gone: it added
  nothing once the teacher's logits are an output of their own, compared before any term that
  uses them.)
- gradients: the ``.grad`` of every trainable tensor as its optimiser steps (official: after
  ``sam_loss.backward()`` and ``SGDL_loss.backward()``, read as Adam and SGD step; ours: in
  ``update("sam")`` and ``update("nets")`` of ``train_step``, with autograd, so a wrongly
  detached tensor shows). Official tensors are paired with ours by position and shape within
  paired modules, as the weights are copied; a gradient on one side only fails, and so does a
  trainable tensor without a counterpart that the step gives a gradient (the official build has
  52 trainable tensors that its forward never uses: ``Depth_Adapter`` and the decoder
  transformer's ``MLP_Adapter``);
- updates: the change the step makes to every trainable tensor, against what the official
  optimiser (its class, hyperparameters, learning rate and state just before its step: SGD with
  momentum 0.9 and weight decay 1e-4 for the networks, Adam for SAM) makes of our gradient, so
  that the optimisers are compared apart from the gradients (Adam divides by each element's own
  gradient, so the rounding-level differences allowed to gradients below become large update
  differences wherever a gradient element is near 0); the change of every BatchNorm running
  statistic, against the official change; and the learning rate of each optimiser's param group
  as it steps.

The training step: a fresh official ``Trainer`` (its SAM built from a random-init ViT-B saved in
SAM's checkpoint format) runs ``Trainer.train(x, y, t)`` for t = 0, 1, 2 against
``KnowSam.train_step(batch, t)``, with T = 4 iterations, a ramp of 4 stages (one per iteration,
official ``iter_num // int(T / rampup)``) and mixing after iteration 0 (official ``iter_num > 0``):
iteration 0 has no mixed stage, 1 and 2 have it; w(t) = exp(-5), exp(-45/16), exp(-5/4). Three
iterations because a first step hides the optimisers' state: SGD's first momentum buffer is the
gradient itself and Adam's first step is about lr x sign(gradient) whatever its betas. They also
test the official schedule (trainer.py:205-211): both rates are set after each iteration from its
index, so iteration t runs with lr (1 - (t - 1)/T) and iteration 0 with lr: iteration 1 with lr
(lr (1 - t/T) would give 0.75 lr), iteration 2 with 0.75 lr (a constant rate would give lr).

Before each iteration ours is given the official weights, BatchNorm statistics and optimiser state
(momentum buffers, Adam moments), so each iteration is compared as one step from the same state:
otherwise the rounding differences of one step flip thresholds in the next (the fusion module's
agreement map, 1 - XOR(p > 0.5), moved fused logits by 14% at iteration 1) and the runs part for
no fault. For the same reason the official step's SAM decoding is given our image embedding's
values (a forward hook: official + (ours - official).detach(), the official graph kept), after
the two embeddings are compared as an output (1.5e-6 apart: SAM's encoder attention is computed
otherwise here): a rounding difference at the prompt heads' input flips the sign of a LeakyReLU
pre-activation within rounding of 0 here and there, and the gradient through that one element
then changes by 99% (slope 1 against 0.01); measured, it moved whole prompt heads' gradients by up
to 2e-2 (root mean square) at 4 classes.

SAM's pseudo-labels are an argmax (trainer.py:75), and at a pixel where SAM's two best classes are
within rounding of a tie the two sides' 1.5e-6 apart logits may pick different classes: measured
once on one CPU model, one pixel of the 2-class run at iteration 2 (official softmax 0.4999999949 /
0.5000000051). Such a flip is no fault of either side, yet it changes a mixed label and, through
it, the U-Net's gradient (1.07e-3 of its norm on the first convolution). So after each iteration
the pixels where the official top-2 softmax margin is under ``TIE`` (1e-6) and the two argmaxes
differ are counted; if there are any, our iteration is rewound (our weights, BatchNorm statistics
and optimiser state as they were before it) and run again with the official label at those
pixels only, and a line names how many were given.

Dropout is on in the training step, both sides seeded alike before each iteration: the official
step draws dropout masks in the U-Net (its joint forward interleaves the U-Net and the V-Net, but
the V-Net and the fusion module have no dropout), then in the prompt heads class by class, then in
the U-Net on the mixed batch; ours draws in the same order (SAM's encoder and decoder draw
nothing), so both use the same masks (the networks' logits agree to the last bit).

Configurations (``--configs``):

- ``2``: 2 classes, our defaults, ``sam_full_graph: true`` among them (written out): the official
  SAM graph covers the whole batch, and through the prompt heads' training-mode BatchNorm
  statistics L_sam reaches the encoder adapters via the unlabeled images too. The option's other
  value (false) drops that path: every output is the same, but the encoder adapters' gradients
  differ from the official ones by up to 73% (root mean square; 19-73% over the three
  iterations, 2 classes, this random-init SAM).
- ``4``: 4 classes, the official ACDC setting (``train_semi_SAM_ACDC.py`` runs this trainer at
  ``num_classes`` 4), with ``kd_entropy_form: official-2class``: the official KD over rows of 2
  values (each pixel's classes (0, 1) and (2, 3) apart) and entropy over log 2 (defect 4); and
  ``sam_full_graph: true``. Consistency on the last class only is our default (defect 2).

256 px because the official step hard-codes the 64x64 dense-prompt size (trainer.py:149), SAM's
mask-input size at 256 px only; 2 + 2 images because the official mixing needs as many unlabeled
as labeled images (trainer.py:69). A run takes about 2 minutes per configuration on one CPU
thread.

Tolerances (``TOLERANCES``), each a difference relative to the official magnitude. Both sides
compute in float32 with the same formulas in other orders (other attention kernels, per-class
against batched decoding, other reduction trees); float32 rounding (6e-8) grows with the number of
summands and layers:

- outputs and terms, 1e-4 of the largest official magnitude (largest absolute difference): the
  networks agree to the last bit, SAM's embedding and logits to 1.5e-6, the loss terms (sums over
  2^17 to 2^18 pixels) to 1e-5;
- gradients, 1e-3 in root mean square: ||ours - official|| / ||official|| per tensor (the norm, not
  the largest element: downstream of a pre-activation within rounding of a ReLU's kink one element
  can move alone), with the official norm taken as at least ``GRADIENT_FLOOR`` (1e-2) times the
  largest in its module group,
  because the gradient of a bias followed by BatchNorm is 0 in exact arithmetic (BatchNorm removes
  any constant) and float32 leaves only rounding noise of its own size; measured: at most 2.4e-5,
  those bias gradients included;
- updates, 1e-4 of the largest official magnitude: the optimisers' changes are the same
  arithmetic on the same numbers (measured: equal to the last bit), and the BatchNorm statistics
  are averages of the networks' activations (equal to the last bit here).

One line per compared output and term, one line per group of gradients or updates, a line per
failing tensor, a summary line per configuration and, last,
``parity: N/N (outputs a/a, terms b/b, gradients c/c, updates d/d) in K configurations``; the exit
status is 1 when anything differs, the failures named again just before it, one a line.

    .venv/bin/python benchmarks/parity_official.py --official /path/to/KnowSAM [--configs 2 4]

The official code calls ``.cuda()``; the script makes that a no-op for its own process (their
files are untouched). It needs what the imported official files import: ``einops`` (not ``timm``,
``hausdorff`` or ``medpy``: the TinyViT package and the trainer's validation helpers are never
imported).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.methods import MethodContext, get_method
from knowsam.methods import knowsam as knowsam_module
from knowsam.methods.knowsam import KnowSam
from knowsam.methods.params import KnowSamParams
from knowsam.methods.sam_support import teacher_forward
from knowsam.models import build_model
from knowsam.models.sam_teacher import AdaptedBlock, ClassPromptHead, build_sam_parts

KINDS = ("outputs", "terms", "gradients", "updates")
TOLERANCES = {"outputs": 1e-4, "terms": 1e-4, "gradients": 1e-3, "updates": 1e-4}
GRADIENT_FLOOR = 1e-2  # a gradient's norm counts as at least this share of the largest in its module group
TIE = 1e-6  # SAM's two best classes closer than this (softmax) make its argmax a coin toss
SEED = 2024
BATCH, LABELED, SIZE, CHANNELS = 4, 2, 256, 3
# The official schedule over a run of T = 4 iterations: a ramp stage per iteration, mixing after
# iteration 0; the three first iterations are compared.
ITERATIONS, RAMPUP, MIXED_AFTER, COMPARED = 4, 4, 0, 3
LR, SAM_LR, CONSISTENCY = 0.01, 1e-4, 0.1  # official UNet_lr, lr and consistency (x 10 in the trainer)


@dataclass(frozen=True)
class Config:
    """One compared configuration: the class count and our options set to the official behaviour."""

    name: str
    classes: int
    options: dict = field(default_factory=dict)


CONFIGS = {
    "2": Config("2 classes", 2, {"sam_full_graph": True}),
    "4": Config(
        "4 classes, kd_entropy_form official-2class", 4, {"sam_full_graph": True, "kd_entropy_form": "official-2class"}
    ),
}


@dataclass
class Term:
    """One compared quantity (None: absent on that side, e.g. a gradient never computed)."""

    kind: str
    group: str
    name: str
    official: torch.Tensor | None
    ours: torch.Tensor | None
    scale: float = 0.0  # the least magnitude the difference is taken relative to
    per_tensor: bool = False  # one of many tensors of a group: reported as the group, and on its own if it fails


@dataclass
class Outcome:
    term: Term
    difference: float
    ok: bool


def relative_difference(
    official: torch.Tensor | None, ours: torch.Tensor | None, scale: float = 0.0, rms: bool = False
) -> float:
    """The difference relative to the official magnitude (at least ``scale``): largest absolute values, or root
    mean squares (``rms``); absent on both sides: 0, on one side or of another shape: infinite."""
    if official is None or ours is None:
        return 0.0 if official is None and ours is None else float("inf")
    if official.shape != ours.shape:
        return float("inf")
    if not official.numel():
        return 0.0
    official, diff = official.double(), official.double() - ours.double()

    def size(t: torch.Tensor) -> float:
        return float(t.pow(2).mean().sqrt() if rms else t.abs().max())

    return size(diff) / max(size(official), scale, 1e-30)


def judge(term: Term) -> Outcome:
    diff = relative_difference(term.official, term.ours, term.scale, rms=term.kind == "gradients")
    return Outcome(term, diff, diff <= TOLERANCES[term.kind])


def copy_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src``'s parameters and buffers into ``dst`` by position (the same layers, other names)."""
    s, d = list(src.state_dict().values()), dst.state_dict()
    if len(s) != len(d) or any(a.shape != b.shape for a, b in zip(s, d.values())):
        raise SystemExit(f"cannot map {type(src).__name__} onto {type(dst).__name__}: the layers differ")
    dst.load_state_dict(dict(zip(d, s)))


def _validation_only(name: str, *args: object, **kwargs: object) -> None:
    raise RuntimeError(f"{name} is a validation helper of the official trainer; the parity check never validates")


def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules compared here, imported from ``root`` with ``.cuda()`` as a no-op."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(root))
    # The image-encoder package's __init__ also imports TinyViT (and timm); the ViT blocks need
    # neither, so their parent packages are registered without running their __init__ and given
    # the two names SAM's image encoder imports from them.
    packages = []
    for name in ("Model.ImageEncoder", "Model.ImageEncoder.vit"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
        packages.append(package)
    adapter_block = importlib.import_module("Model.ImageEncoder.vit.adapter_block")
    block = importlib.import_module("Model.ImageEncoder.vit.block")
    for package in packages:
        package.AdapterBlock, package.Block = adapter_block.AdapterBlock, block.Block
    # The trainer imports its validation helpers at the top; their modules need packages that a
    # training step never uses (``hausdorff``, ``medpy``), so they are stood in for by functions
    # that fail if a validation is ever run.
    for module, name in (("utils.utils", "dice_coef"), ("prediction_ACDC", "test_single_volume")):
        stand_in = types.ModuleType(module)
        setattr(stand_in, name, partial(_validation_only, f"{module}.{name}"))
        sys.modules[module] = stand_in
    return types.SimpleNamespace(
        model=importlib.import_module("Model.model"),
        prompt=importlib.import_module("Model.prompt"),
        adapter_block=adapter_block,
        trainer=importlib.import_module("trainer"),
    )


# --- module pairs: how the official modules map onto ours ------------------------------------------
ModulePairs = list[tuple[str, nn.Module, nn.Module]]  # (group, official module, our module)


def network_pairs(theirs: nn.Module, unet: nn.Module, vnet: nn.Module, fusion: nn.Module) -> ModulePairs:
    """The official ``KnowSAM`` module's U-Net, V-Net and fusion module against ours."""
    vnet_pairs = {
        "block_one": vnet.enc[0],
        "block_one_dw": vnet.downs[0],
        "block_two": vnet.enc[1],
        "block_two_dw": vnet.downs[1],
        "block_three": vnet.enc[2],
        "block_three_dw": vnet.downs[2],
        "block_four": vnet.enc[3],
        "block_four_dw": vnet.downs[3],
        "block_five": vnet.dec[0],
        "block_five_up": vnet.ups[0],
        "block_six": vnet.dec[1],
        "block_six_up": vnet.ups[1],
        "block_seven": vnet.dec[2],
        "block_seven_up": vnet.ups[2],
        "block_eight": vnet.dec[3],
        "block_eight_up": vnet.ups[3],
        "block_nine": vnet.last,
        "out_conv": vnet.head,
    }
    return [
        ("U-Net", theirs.UNet, unet),
        *(("V-Net", getattr(theirs.VNet, name), ours) for name, ours in vnet_pairs.items()),
        ("fusion", theirs.Discriminator, fusion),
    ]


def sam_pairs(theirs: nn.Module, sam: nn.Module) -> ModulePairs:
    """The official SAM's trained parts (and the decoder MLPs, left at their random init) against ours."""
    pairs: ModulePairs = [
        ("SAM prompt heads", src, dst)
        for src, dst in zip(theirs.super_prompt.box_decoder, sam.prompt_heads, strict=True)
    ]
    for src, dst in zip(theirs.image_encoder.blocks, sam.image_encoder.blocks, strict=True):
        pairs += [
            ("SAM encoder adapters", src.Space_Adapter, dst.attn_adapter),
            ("SAM encoder adapters", src.MLP_Adapter, dst.mlp_adapter),
        ]
    official_transformer, transformer = theirs.mask_decoder.transformer, sam.mask_decoder.transformer
    for src, dst in zip(official_transformer.layers, transformer.layers, strict=True):
        # Both sides leave the decoder MLPs at their random init (the official defect 14): the
        # same layers, drawn by two different builds, so the official draw is copied in.
        pairs += [
            ("SAM decoder adapters", src.Space_Adapter, dst.attn_adapter),
            ("SAM decoder adapters", src.MLP_Adapter, dst.mlp_adapter),
            ("SAM decoder MLPs", src.mlp, dst.mlp),
        ]
    pairs.append(("SAM decoder adapters", official_transformer.Space_Adapter, transformer.attn_adapter))
    return pairs


def copy_pairs(pairs: ModulePairs) -> None:
    for _, src, dst in pairs:
        copy_in_order(src, dst)


@dataclass(frozen=True)
class TensorPair:
    group: str
    name: str  # ours
    official: torch.Tensor
    ours: torch.Tensor


def tensor_pairs(pairs: ModulePairs, named: Callable[[nn.Module], Iterable], names: dict[int, str]) -> list[TensorPair]:
    """Every tensor of ``named`` (named_parameters / named_buffers) of each pair, by position; ``names``
    gives each of our modules its name (by id)."""
    out = []
    for group, src, dst in pairs:
        for (_, a), (name, b) in zip(named(src), named(dst), strict=True):
            out.append(TensorPair(group, f"{names[id(dst)]}.{name}", a, b))
    return out


# --- module outputs ----------------------------------------------------------------------------------
def _seeded(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with the global generator reset first, so both sides draw the same dropout masks."""
    torch.manual_seed(SEED)
    with torch.no_grad():
        return fn()


def network_terms(official: types.SimpleNamespace, x: torch.Tensor, classes: int) -> list[Term]:
    """U-Net, V-Net and fusion outputs: the official joint forward against our three networks."""
    args = types.SimpleNamespace(in_channels=CHANNELS, num_classes=classes)
    torch.manual_seed(SEED)
    theirs = official.model.KnowSAM(args)
    unet = build_model("unet", in_channels=CHANNELS, num_classes=classes)
    vnet = build_model("vnet", in_channels=CHANNELS, num_classes=classes)
    fusion = build_model("fusion", num_classes=classes)
    copy_pairs(network_pairs(theirs, unet, vnet, fusion))
    if sum(p.numel() for p in theirs.parameters()) != sum(
        p.numel() for n in (unet, vnet, fusion) for p in n.parameters()
    ):
        raise SystemExit("network parameter counts differ")

    def ours_forward() -> tuple[torch.Tensor, ...]:
        u, v = unet(x), vnet(x)
        return u, v, fusion(u, v)

    terms = []
    for mode in ("train", "eval"):  # eval after train: both sides updated their BatchNorm statistics alike
        theirs.train(mode == "train")
        for net in (unet, vnet, fusion):
            net.train(mode == "train")
        u, v, _, _, f = _seeded(lambda: theirs(x))
        mine = _seeded(ours_forward)
        for name, a, b in zip(("unet", "vnet", "fusion"), (u, v, f), mine):
            terms.append(Term("outputs", "modules", f"{name} logits ({mode} mode)", a, b))
    return terms


def prompt_head_terms(official: types.SimpleNamespace, x: torch.Tensor, classes: int) -> list[Term]:
    """The learnable prompt heads' two tokens per class, from a ViT-B-sized image embedding."""
    torch.manual_seed(SEED)
    theirs = official.prompt.Super_Prompt(in_chns=CHANNELS, class_num=classes)
    embedding = torch.randn(x.shape[0], 256, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(SEED))
    heads = nn.ModuleList(ClassPromptHead(256) for _ in range(classes))
    for src, dst in zip(theirs.box_decoder, heads):
        copy_in_order(src, dst)
    if sum(p.numel() for p in theirs.parameters()) != sum(p.numel() for p in heads.parameters()):
        raise SystemExit("prompt-head parameter counts differ")
    terms = []
    for mode in ("train", "eval"):
        theirs.train(mode == "train")
        heads.train(mode == "train")
        a = torch.stack(_seeded(lambda: theirs(embedding)[1]), dim=1)
        b = _seeded(lambda: torch.stack([head(embedding) for head in heads], dim=1))
        terms += [
            Term("outputs", "modules", f"prompt head, class {c} ({mode} mode)", a[:, c], b[:, c])
            for c in range(classes)
        ]
    return terms


def adapter_block_terms(official: types.SimpleNamespace, x: torch.Tensor, classes: int) -> list[Term]:
    """Adapted ViT-B encoder blocks on a 16x16 token grid: windowed (14, padded) and global."""
    from segment_anything.modeling.image_encoder import Block

    dim, heads = 768, 12
    norm = partial(nn.LayerNorm, eps=1e-6)
    tokens = torch.randn(x.shape[0], SIZE // 16, SIZE // 16, dim, generator=torch.Generator().manual_seed(SEED))
    terms = []
    for window in (14, 0):
        torch.manual_seed(SEED)
        theirs = official.adapter_block.AdapterBlock(
            types.SimpleNamespace(thd=False), dim, heads, norm_layer=norm, window_size=window
        )
        with torch.no_grad():  # LayerNorm affine values away from 1 and 0, as in a trained SAM
            for ln in (theirs.norm1, theirs.norm2):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.5)
        ours = AdaptedBlock(Block(dim, heads, norm_layer=norm, window_size=window))
        for src, dst in (
            (theirs.norm1, ours.norm1),
            (theirs.attn, ours.attn),
            (theirs.norm2, ours.norm2),
            (theirs.mlp, ours.mlp),
            (theirs.Space_Adapter, ours.attn_adapter),
            (theirs.MLP_Adapter, ours.mlp_adapter),
        ):
            copy_in_order(src, dst)
        kind = "windowed, padded" if window else "global"
        terms.append(
            Term(
                "outputs",
                "modules",
                f"adapted encoder block ({kind})",
                _seeded(lambda theirs=theirs: theirs(tokens)),
                _seeded(lambda ours=ours: ours(tokens)),
            )
        )  # bound now: the terms run after the loop
    return terms


# --- the training step -----------------------------------------------------------------------------
def random_sam_checkpoint(folder: Path) -> Path:
    """A random-init SAM ViT-B saved in SAM's checkpoint format (stock layout: 1024 px, relative positions).

    LayerNorm affine values and the positional embedding are drawn away from their constant
    initial values, so that loading, resizing and every normalisation are exercised.
    """
    from segment_anything.modeling import Sam
    from segment_anything.modeling.common import LayerNorm2d

    torch.manual_seed(SEED)
    sam = Sam(*build_sam_parts("vit_b", 1024, use_rel_pos=True))
    with torch.no_grad():
        for module in sam.modules():
            if isinstance(module, (nn.LayerNorm, LayerNorm2d)):
                module.weight.uniform_(0.8, 1.2)
                module.bias.normal_(0, 0.1)
        sam.image_encoder.pos_embed.normal_(0, 0.1)
    path = folder / "random_sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    # The official build reads this fixed file name from the working directory (its checkpoint
    # argument is ignored), so the random checkpoint is linked there under that name.
    (folder / "sam_vit_b_01ec64.pth").symlink_to(path)
    return path


def capture_returns(run: Callable[[], object], functions: dict[str, Callable]) -> tuple[object, dict[str, dict]]:
    """Run ``run``; its result and the local variables of each of ``functions`` as it returns (by name)."""
    codes = {f.__code__: name for name, f in functions.items()}
    captured: dict[str, dict] = {}

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "return" and frame.f_code in codes:
            captured[codes[frame.f_code]] = dict(frame.f_locals)

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return result, captured


def disc_labels(n: int, classes: int) -> torch.Tensor:
    """One foreground disc per image (centre and radius drawn from the seed), in ``classes - 1`` rings."""
    g = torch.Generator().manual_seed(SEED)
    centres = torch.rand(n, 2, generator=g) * SIZE * 0.5 + SIZE * 0.25
    radii = torch.rand(n, generator=g) * SIZE * 0.2 + SIZE * 0.1
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    dist = ((rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2).sqrt()
    depth = 1 - dist / radii[:, None, None]  # 1 at the centre, 0 on the circle
    return (depth * (classes - 1)).ceil().clamp(0, classes - 1).long()


# (label, official frame, official local, our loss key) for every term of one training step.
BEFORE_MIXING = [
    ("consistency weight w(t)", "train", "consistency_weight", "cons_weight"),
    *[
        (f"{net} {what}", "train", f"{official}_{local}", f"{ours}_{key}")
        for net, official, ours in (("U-Net", "UNet", "unet"), ("V-Net", "VNet", "vnet"))
        for what, local, key in (
            ("CE+Dice", "sup_loss", "sup"),
            ("KD", "kd_loss", "kd"),
            ("entropy", "enp_loss", "ent"),
            ("consistency", "cons_loss", "cons"),
        )
    ],
    ("L_U", "train", "UNet_loss", "unet"),
    ("L_V", "train", "VNet_loss", "vnet"),
    ("L_F fusion CE+Dice", "train", "fusion_loss", "fusion"),
    ("L_sam", "train", "sam_sup_loss", "sam"),
]
MIXED_STAGE = [
    *[
        (f"{net} {what}", "mix_up", f"{official}_{local}", f"{ours}_mix_{key}")
        for net, official, ours in (("U-Net", "UNet", "unet"), ("V-Net", "VNet", "vnet"))
        for what, local, key in (
            ("CE+Dice", "sup_mixed_loss", "sup"),
            ("entropy", "enp_mixed_loss", "ent"),
            ("consistency", "cons_mixed_loss", "cons"),
            ("CE+Dice on fused argmax (unlabeled rows)", "unsup_mixed_loss", "self"),
        )
    ],
    ("L_U,mix", "mix_up", "UNet_mixed_loss", "unet_mix"),
    ("L_V,mix", "mix_up", "VNet_mixed_loss", "vnet_mix"),
    ("L_F,mix fusion CE+Dice", "mix_up", "fusion_mixed_loss", "fusion_mix"),
]
L_NET = ("L_net = (L_U + L_U,mix + L_V + L_V,mix)/2 + L_F + L_F,mix", "train", "SGDL_loss", "net")
# (label, official frame, official local, our frame, our local) of each output of a step.
STEP_OUTPUTS = [
    ("SAM image embedding", "encoder", "embedding", "teacher", "embeddings"),
    ("U-Net logits", "train", "pred_UNet", "losses", "u"),
    ("V-Net logits", "train", "pred_VNet", "losses", "v"),
    ("fusion logits", "train", "fusion_map", "losses", "fused"),
    ("SAM teacher logits", "train", "pred_sam", "losses", "sam_logits"),
]
MIXED_OUTPUTS = [
    ("mixed images", "mix_up", "volume_batch_mix", "mixed", "xm"),
    ("mixed labels", "mix_up", "label_batch_mix", "mixed", "ym"),
    ("U-Net logits, mixed batch", "mix_up", "pred_UNet_mix", "mixed", "um"),
    ("V-Net logits, mixed batch", "mix_up", "pred_VNet_mix", "mixed", "vm"),
    ("fusion logits, mixed batch", "mix_up", "fusion_map_mix", "mixed", "fm"),
]


def _value(v: object) -> torch.Tensor:
    return v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


def build_both(official: types.SimpleNamespace, checkpoint: Path, config: Config) -> tuple[nn.Module, KnowSam]:
    """The official trainer and our method, both on the random-init SAM ``checkpoint``."""
    args = types.SimpleNamespace(
        image_size=SIZE,
        num_classes=config.classes,
        in_channels=CHANNELS,
        model_type="vit_b",
        mod="sam_adpt",
        thd=False,
        multimask=False,
        point_nums=5,
        box_nums=1,
        device="cpu",
        lr=SAM_LR,
        UNet_lr=LR,
        batch_size=BATCH,
        labeled_bs=LABELED,
        max_iterations=ITERATIONS,
        mixed_iterations=MIXED_AFTER,
        consistency=CONSISTENCY,
        consistency_rampup=float(RAMPUP),
    )
    cwd = os.getcwd()
    os.chdir(checkpoint.parent)
    try:
        torch.manual_seed(SEED)
        trainer = official.trainer.Trainer(args)
    finally:
        os.chdir(cwd)
    ctx = MethodContext(
        in_channels=CHANNELS,
        num_classes=config.classes,
        image_size=SIZE,
        iterations=ITERATIONS,
        train=TrainParams(batch_size=BATCH, labeled_batch=LABELED, lr=LR),
        sam=SamParams(arch="vit_b", checkpoint=str(checkpoint)),
        device=torch.device("cpu"),
        seed=SEED,
    )
    params = KnowSamParams(
        mixed_iterations=float(MIXED_AFTER),
        consistency_rampup=RAMPUP,
        sam_lr=SAM_LR,
        consistency_weight=CONSISTENCY * 10,
        **config.options,
    )
    return trainer, get_method("knowsam")(ctx, params)


@dataclass
class StepRecord:
    """One side's training iteration: frames, what each optimiser saw as it stepped, the tensors around it."""

    result: object
    frames: dict[str, dict]
    grads: dict[int, torch.Tensor | None]  # id(tensor) -> its gradient when its optimiser stepped
    lrs: dict[str, list[float]]  # optimiser -> lr of each param group when it stepped
    # optimiser -> (class, hyperparameters of its one param group, ids of its tensors, state of each before the step)
    optimizers: dict[str, tuple[type, dict, set[int], dict[int, dict]]]
    before: dict[int, torch.Tensor]
    after: dict[int, torch.Tensor]


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def record_iteration(
    run: Callable[[], object],
    optimizers: dict[str, torch.optim.Optimizer],
    tensors: list[torch.Tensor],
    functions: dict[str, Callable],
) -> StepRecord:
    """Run one iteration, seeded, keeping what each optimiser sees as it steps and ``tensors`` around it."""
    grads: dict[int, torch.Tensor | None] = {}
    lrs: dict[str, list[float]] = {}
    seen: dict[str, tuple[type, dict, set[int], dict[int, dict]]] = {}

    def before_step(name: str, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        lrs[name] = [group["lr"] for group in optimizer.param_groups]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            grads[id(p)] = None if p.grad is None else p.grad.detach().clone()
        if len(optimizer.param_groups) != 1:
            raise SystemExit(f"optimiser {name!r} has {len(optimizer.param_groups)} param groups; one expected")
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        state = {id(p): _clone_state(optimizer.state[p]) for p in params if p in optimizer.state}
        seen[name] = (type(optimizer), hyper, {id(p) for p in params}, state)

    handles = [opt.register_step_pre_hook(partial(before_step, name)) for name, opt in optimizers.items()]
    before = {id(t): t.detach().clone() for t in tensors}
    torch.manual_seed(SEED)  # the same dropout masks on both sides
    try:
        with warnings.catch_warnings():  # the official step logs tensors with a graph: torch warns each time
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            result, frames = capture_returns(run, functions)
    finally:
        for handle in handles:
            handle.remove()
    after = {id(t): t.detach().clone() for t in tensors}
    return StepRecord(result, frames, grads, lrs, seen, before, after)


def _owners(optimizers: dict[str, torch.optim.Optimizer]) -> dict[int, torch.optim.Optimizer]:
    return {id(p): opt for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}


def synchronise(
    module_pairs: ModulePairs,
    trainable: list[TensorPair],
    official: dict[str, torch.optim.Optimizer],
    ours: dict[str, torch.optim.Optimizer],
) -> None:
    """Give ours the official weights, BatchNorm statistics and optimiser state (momentum, Adam moments).

    Every iteration then starts from the same state, so each is compared as one step: without it,
    the rounding differences of one step flip the thresholds of the next (the fusion module's
    agreement map, SAM's argmax pseudo-labels) and the two runs part for reasons that are no fault.
    """
    copy_pairs(module_pairs)
    official_owner, our_owner = _owners(official), _owners(ours)
    for p in trainable:
        source = official_owner[id(p.official)].state
        target = our_owner.get(id(p.ours))
        if target is None:
            continue  # not optimised here: its update is compared, and fails, below
        target.state.pop(p.ours, None)
        if p.official in source:
            target.state[p.ours] = _clone_state(source[p.official])


def replayed_updates(theirs: StepRecord, mine: StepRecord, trainable: list[TensorPair]) -> dict[int, torch.Tensor]:
    """Per our tensor: the change the official optimiser's step makes given OUR gradient.

    Each official optimiser is rebuilt as it was just before its step (class, hyperparameters,
    learning rate, the state of each tensor) over copies of our tensors before the step, given our
    gradients, and stepped.
    """
    expected = {}
    for cls, hyper, ids, state in theirs.optimizers.values():
        members = [p for p in trainable if id(p.official) in ids]
        leaves = [mine.before[id(p.ours)].clone().requires_grad_(True) for p in members]
        for p, leaf in zip(members, leaves):
            leaf.grad = mine.grads.get(id(p.ours))
        optimizer = cls([{"params": leaves, **hyper}])
        for p, leaf in zip(members, leaves):
            if id(p.official) in state:
                optimizer.state[leaf] = _clone_state(state[id(p.official)])
        optimizer.step()
        expected.update({id(p.ours): leaf.detach() - mine.before[id(p.ours)] for p, leaf in zip(members, leaves)})
    return expected


def given_values(
    values: torch.Tensor, seen: dict[str, torch.Tensor], module: nn.Module, args: object, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook: ``module``'s output takes ``values``, its own graph kept; what it computed goes to ``seen``."""
    seen["embedding"] = output.detach().clone()
    return output + (values - output).detach()


def align(trainer: nn.Module, ours: KnowSam) -> tuple[ModulePairs, list[TensorPair], list[TensorPair]]:
    """Copy the official weights into ours; (module pairs, trainable tensor pairs, buffer pairs)."""
    pairs = network_pairs(trainer.SGDL, ours.nets["unet"], ours.nets["vnet"], ours.nets["fusion"])
    pairs += sam_pairs(trainer.sam_model, ours.nets["sam"])
    copy_pairs(pairs)
    names = {
        id(m): f"{net}.{name}".rstrip(".") for net, module in ours.nets.items() for name, m in module.named_modules()
    }
    params = tensor_pairs(pairs, lambda m: m.named_parameters(), names)
    trainable = [t for t in params if t.official.requires_grad or t.ours.requires_grad]
    return pairs, trainable, tensor_pairs(pairs, lambda m: m.named_buffers(), names)


def unpaired_trainables(trainer: nn.Module, ours: KnowSam, pairs: list[TensorPair]) -> tuple[dict, dict]:
    """Trainable tensors (name -> tensor) of each side that no pair covers."""
    official_ids, our_ids = {id(t.official) for t in pairs}, {id(t.ours) for t in pairs}
    official = {
        f"{prefix}.{n}": p
        for prefix, module in (("SGDL", trainer.SGDL), ("sam_model", trainer.sam_model))
        for n, p in module.named_parameters()
        if p.requires_grad and id(p) not in official_ids
    }
    mine = {
        f"{net}.{n}": p
        for net, module in ours.nets.items()
        for n, p in module.named_parameters()
        if p.requires_grad and id(p) not in our_ids
    }
    return official, mine


def iteration_terms(
    t: int, theirs: StepRecord, mine: StepRecord, trainable: list[TensorPair], buffers: list[TensorPair]
) -> list[Term]:
    """Every output, loss term, gradient and update of iteration ``t``."""
    group = f"iteration {t}"
    official_frames, our_frames, our_terms = theirs.frames, mine.frames, mine.result
    mixing = "mix_up" in official_frames
    terms = []
    for label, frame, local, our_frame, our_local in STEP_OUTPUTS + (MIXED_OUTPUTS if mixing else []):
        ours_value = our_frames.get(our_frame, {}).get(our_local)
        terms.append(
            Term(
                "outputs",
                group,
                label,
                _value(official_frames[frame][local]),
                None if ours_value is None else _value(ours_value),
            )
        )
    for label, frame, local, key in BEFORE_MIXING + (MIXED_STAGE if mixing else []) + [L_NET]:
        terms.append(Term("terms", group, label, _value(official_frames[frame][local]), _value(our_terms[key])))
    terms.append(
        Term("terms", group, "mixed stage runs", _value(float(mixing)), _value(float(our_terms["fusion_mix"] != 0.0)))
    )
    scales: dict[str, float] = {}  # module group -> the largest root mean square of an official gradient in it
    for p in trainable:
        g = theirs.grads.get(id(p.official))
        if g is not None:
            scales[p.group] = max(scales.get(p.group, 0.0), float(g.double().pow(2).mean().sqrt()))
    terms += [
        Term(
            "gradients",
            f"{group}, gradients, {p.group}",
            p.name,
            theirs.grads.get(id(p.official)),
            mine.grads.get(id(p.ours)),
            GRADIENT_FLOOR * scales.get(p.group, 0.0),
            per_tensor=True,
        )
        for p in trainable
    ]
    expected = replayed_updates(theirs, mine, trainable)
    terms += [
        Term(
            "updates",
            f"{group}, updates (official rule, our gradient), {p.group}",
            p.name,
            expected[id(p.ours)],
            mine.after[id(p.ours)] - mine.before[id(p.ours)],
            per_tensor=True,
        )
        for p in trainable
    ]
    for p in buffers:
        official, ours = (
            theirs.after[id(p.official)] - theirs.before[id(p.official)],
            mine.after[id(p.ours)] - mine.before[id(p.ours)],
        )
        terms.append(
            Term(
                "updates",
                f"{group}, updates, {p.group} BatchNorm statistics",
                p.name,
                official.double(),
                ours.double(),
                per_tensor=True,
            )
        )
    for label, name in (("SAM (Adam)", "sam"), ("networks (SGD)", "nets")):
        official_lrs, our_lrs = theirs.lrs.get(name, []), mine.lrs.get(name, [])
        for i in range(max(len(official_lrs), len(our_lrs), 1)):
            terms.append(
                Term(
                    "updates",
                    f"{group}, learning rates",
                    f"{label}, param group {i}",
                    _value(official_lrs[i]) if i < len(official_lrs) else None,
                    _value(our_lrs[i]) if i < len(our_lrs) else None,
                )
            )
    return terms


def pseudo_label_tie_flips(official_frames: dict[str, dict], our_frames: dict[str, dict]) -> torch.Tensor:
    """Unlabeled pixels where SAM's argmax differs on the two sides and the official top-2 margin is under ``TIE``."""
    if "mix_up" not in official_frames or "mixed" not in our_frames:
        return torch.zeros(0, dtype=torch.bool)
    official_soft = official_frames["mix_up"]["pseudo_label"].detach()  # pred_sam_soft of the unlabeled rows
    top2 = official_soft.topk(2, dim=1).values
    ours = our_frames["mixed"]["teacher"].detach().argmax(1)[-len(official_soft) :]
    return (top2[:, 0] - top2[:, 1] < TIE) & (ours != official_frames["mix_up"]["unlabel_pseudo_label"])


def rewind(record: StepRecord, tensors: list[torch.Tensor], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Put ``tensors`` and the optimisers' state back as they were before ``record``'s iteration."""
    with torch.no_grad():
        for t in tensors:
            t.copy_(record.before[id(t)])
    for name, optimizer in optimizers.items():
        state = record.optimizers[name][3] if name in record.optimizers else {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state.pop(p, None)
                if id(p) in state:
                    optimizer.state[p] = _clone_state(state[id(p)])


@contextlib.contextmanager
def given_pseudo_labels(where: torch.Tensor, labels: torch.Tensor) -> Iterator[None]:
    """Our uncertainty mixing takes the official pseudo-label of the unlabeled rows at ``where``."""
    original = knowsam_module.uncertainty_mix

    def mix(x: torch.Tensor, y_l: torch.Tensor, pseudo: torch.Tensor, *rest: object) -> tuple:
        pseudo = pseudo.clone()
        pseudo[-len(labels) :] = torch.where(where, labels, pseudo[-len(labels) :])
        return original(x, y_l, pseudo, *rest)

    knowsam_module.uncertainty_mix = mix
    try:
        yield
    finally:
        knowsam_module.uncertainty_mix = original


def training_step_terms(
    official: types.SimpleNamespace, checkpoint: Path, config: Config, x: torch.Tensor
) -> list[Term]:
    """Every output, loss term, gradient and update of the official first iterations against ours."""
    trainer, ours = build_both(official, checkpoint, config)
    ours.train()
    pairs, trainable, buffers = align(trainer, ours)
    terms = [
        Term(
            "gradients",
            "trainable tensors",
            f"{p.name}: trainable on one side only (official {p.official.requires_grad}, ours {p.ours.requires_grad})",
            None,
            p.ours,
        )
        for p in trainable
        if p.official.requires_grad != p.ours.requires_grad
    ]
    official_extra, our_extra = unpaired_trainables(trainer, ours, trainable)
    extra = sorted({".".join(n.split(".")[-3:-1]) for n in official_extra})
    print(
        f"info: {len(trainable)} trainable tensors paired; official trainable tensors without a counterpart "
        f"here: {len(official_extra)} ({', '.join(extra) or 'none'}), ours: {len(our_extra)}"
    )
    tracked = [t for p in trainable + buffers for t in (p.official, p.ours)]
    y = disc_labels(BATCH, config.classes)
    batch = Batch(x[:LABELED], y[:LABELED], x[LABELED:])
    official_optimizers = {"sam": trainer.optimizer_sam, "nets": trainer.optimizer_SGDL}
    our_frames = {"losses": KnowSam.losses, "mixed": KnowSam._mixed_stage, "teacher": teacher_forward}

    def our_iteration(t: int) -> StepRecord:
        return record_iteration(lambda: ours.train_step(batch, t), ours.optimizers, tracked, our_frames)

    for t in range(COMPARED):
        synchronise(pairs, trainable, official_optimizers, ours.optimizers)
        mine = our_iteration(t)
        official_embedding: dict[str, torch.Tensor] = {}
        hook = trainer.sam_model.image_encoder.register_forward_hook(
            partial(given_values, mine.frames["teacher"]["embeddings"].detach(), official_embedding)
        )
        try:
            theirs = record_iteration(
                lambda t=t: trainer.train(x, y, t),
                official_optimizers,
                tracked,
                {"train": type(trainer).train, "mix_up": type(trainer).mix_up},
            )
        finally:
            hook.remove()
        theirs.frames["encoder"] = official_embedding
        flips = pseudo_label_tie_flips(theirs.frames, mine.frames)
        if flips.any():
            print(
                f"info: iteration {t}: {int(flips.sum())} pixel(s) of SAM's pseudo-labels at a tie (official top-2 "
                f"softmax margin < {TIE:g}) took other classes on the two sides; ours rerun with the official label there"
            )
            rewind(mine, [p.ours for p in trainable + buffers], ours.optimizers)
            with given_pseudo_labels(flips, theirs.frames["mix_up"]["unlabel_pseudo_label"]):
                mine = our_iteration(t)
        terms += iteration_terms(t, theirs, mine, trainable, buffers)
        # Trained officially but absent here (or the reverse): fine only while the step gives it no gradient.
        for side, tensors, record in (("official", official_extra, theirs), ("ours", our_extra, mine)):
            with_grad = sorted(n for n, p in tensors.items() if record.grads.get(id(p)) is not None)
            terms.append(
                Term(
                    "gradients",
                    f"iteration {t}",
                    f"trainable tensors only {side} with a gradient "
                    f"(of {len(tensors)}): {', '.join(with_grad) or 'none'}",
                    _value(len(with_grad)),
                    _value(0),
                )
            )
    return terms


SECTIONS = (network_terms, prompt_head_terms, adapter_block_terms)


def report(outcomes: list[Outcome]) -> None:
    """One line per output or term, one per group of gradients or updates, one per failing tensor."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if not o.term.per_tensor:
            official = o.term.official
            size = (
                f"official |{float(official.abs().max()):.4g}|"
                if official is not None and official.numel()
                else "official none"
            )
            print(
                f"{'ok ' if o.ok else 'BAD'} {o.term.group}: {o.term.name}: {size}, relative difference "
                f"{o.difference:.2e}"
            )
        else:
            groups.setdefault(o.term.group, []).append(o)
    for group, members in groups.items():
        bad = [o for o in members if not o.ok]
        worst = max(members, key=lambda o: o.difference if o.difference != float("inf") else -1)
        print(
            f"{'ok ' if not bad else 'BAD'} {group}: {len(members) - len(bad)}/{len(members)} tensors, worst "
            f"relative difference {worst.difference:.2e} ({worst.term.name})"
        )
        for o in bad:
            print(f"BAD {group}: {o.term.name}: relative difference {o.difference:.2e}")


def counts(outcomes: list[Outcome]) -> str:
    parts = []
    for kind in KINDS:
        members = [o for o in outcomes if o.term.kind == kind]
        parts.append(f"{kind} {sum(o.ok for o in members)}/{len(members)}")
    return ", ".join(parts)


def run_configuration(official: types.SimpleNamespace, checkpoint: Path, config: Config) -> list[Outcome]:
    x = torch.rand(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED))
    print(
        f"== {config.name}: batch {BATCH} ({LABELED} labeled + {BATCH - LABELED} unlabeled), {SIZE} px, "
        f"seed {SEED}, CPU; our options {config.options}"
    )
    outcomes = [judge(term) for section in SECTIONS for term in section(official, x, config.classes)]
    report(outcomes)
    step = [judge(term) for term in training_step_terms(official, checkpoint, config, x)]
    report(step)
    return outcomes + step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of the official KnowSAM code")
    ap.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=list(CONFIGS),
        help="configurations to compare (class counts; default: all)",
    )
    args = ap.parse_args(argv)
    root = args.official.resolve()
    if not (root / "Model" / "model.py").is_file():
        ap.error(f"{root} is not a checkout of the official KnowSAM code (no Model/model.py)")
    official = import_official(root)
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory(prefix="knowsam-parity-") as folder:  # the checkpoint: about 360 MB
        checkpoint = random_sam_checkpoint(Path(folder))
        for key in args.configs:
            config = CONFIGS[key]
            results[config.name] = run_configuration(official, checkpoint, config)
    for name, outcomes in results.items():
        print(f"{name}: {sum(o.ok for o in outcomes)}/{len(outcomes)} ({counts(outcomes)})")
    everything = [o for outcomes in results.values() for o in outcomes]
    for name, outcomes in results.items():
        for o in outcomes:
            if not o.ok:
                print(f"FAILED {name}: {o.term.group}: {o.term.name} (relative difference {o.difference:.2e})")
    print(
        f"parity: {sum(o.ok for o in everything)}/{len(everything)} ({counts(everything)}) "
        f"in {len(results)} configuration{'s' if len(results) > 1 else ''}"
    )
    return 0 if all(o.ok for o in everything) else 1


if __name__ == "__main__":
    sys.exit(main())

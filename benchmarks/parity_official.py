"""Parity of this project's KnowSAM with the official code, module outputs and loss terms, on CPU.

Builds the official networks from a checkout of the official KnowSAM code (taozh2017/KnowSAM; not
shipped here), builds ours, copies the official weights into ours and feeds both the same batch
(fixed seed, 4 images = 2 labeled + 2 unlabeled, 256 px). One line per compared term, then
``parity: N/N terms within 1e-4 relative``; the exit status is 1 when any term differs.

    .venv/bin/python benchmarks/parity_official.py --official /path/to/KnowSAM

Compared, module by module: the U-Net, V-Net and fusion outputs of the official
``KnowSAM.forward`` (training mode with the dropout masks drawn from the same seed, then eval
mode), the learnable prompt heads per class, and a windowed and a global adapted ViT-B encoder
block. Then one training step with mixing on: the official ``Trainer.train`` itself is run (its
SAM built from a random-init ViT-B saved in SAM's checkpoint format, dropout off on both sides)
and every loss term is read from its frames as they return; ours are the terms of
``KnowSam.losses`` on the same batch and iteration, with the same weights. Two groups:

- SAM teacher: the teacher's logits, L_sam and the distillation terms, our SAM against theirs;
- loss terms with SAM's output shared: ours fed the official teacher's logits, so every term
  before mixing and in the mixed stage is compared on the same inputs whatever the teachers do.

The official code calls ``.cuda()``; the script makes that a no-op for its own process (their
files are untouched). It needs what the imported official files import: ``einops`` (not ``timm``,
``hausdorff`` or ``medpy``: the TinyViT package and the trainer's validation helpers are never
imported).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.methods import MethodContext, get_method
from knowsam.methods.knowsam import KnowSam
from knowsam.methods.params import KnowSamParams
from knowsam.models import build_model
from knowsam.models.sam_teacher import AdaptedBlock, ClassPromptHead, build_sam_parts

TOLERANCE = 1e-4
SEED = 2024
BATCH, LABELED, SIZE, CLASSES, CHANNELS = 4, 2, 256, 2, 3
# The training step compared: iteration 500 of 1000 with mixing after iteration 100, so the
# consistency weight is mid-ramp (exp(-5/4)) and the mixed stage runs.
ITERATIONS, MIXED_AFTER, STEP = 1000, 100, 500


@dataclass
class Term:
    """One compared quantity: the official value and ours, each computed on demand."""

    name: str
    official: Callable[[], torch.Tensor]
    ours: Callable[[], torch.Tensor]


def relative_difference(official: torch.Tensor, ours: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest official magnitude."""
    if official.shape != ours.shape:
        return float("inf")
    scale = official.abs().max().clamp_min(1e-12)
    return float((official.double() - ours.double()).abs().max() / scale)


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


def _seeded(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` with the global generator reset first, so both sides draw the same dropout masks."""

    def run() -> torch.Tensor:
        torch.manual_seed(SEED)
        return fn()

    return run


def _no_grad_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def copy_networks(theirs: nn.Module, unet: nn.Module, vnet: nn.Module, fusion: nn.Module) -> None:
    """The official ``KnowSAM`` module's U-Net, V-Net and fusion weights into ours."""
    copy_in_order(theirs.UNet, unet)
    vnet_pairs = {
        "block_one": vnet.enc[0], "block_one_dw": vnet.downs[0], "block_two": vnet.enc[1],
        "block_two_dw": vnet.downs[1], "block_three": vnet.enc[2], "block_three_dw": vnet.downs[2],
        "block_four": vnet.enc[3], "block_four_dw": vnet.downs[3], "block_five": vnet.dec[0],
        "block_five_up": vnet.ups[0], "block_six": vnet.dec[1], "block_six_up": vnet.ups[1],
        "block_seven": vnet.dec[2], "block_seven_up": vnet.ups[2], "block_eight": vnet.dec[3],
        "block_eight_up": vnet.ups[3], "block_nine": vnet.last, "out_conv": vnet.head,
    }
    for name, ours in vnet_pairs.items():
        copy_in_order(getattr(theirs.VNet, name), ours)
    copy_in_order(theirs.Discriminator, fusion)
    if sum(p.numel() for p in theirs.VNet.parameters()) != sum(p.numel() for p in vnet.parameters()):
        raise SystemExit("V-Net parameter counts differ")


def network_terms(official: types.SimpleNamespace, x: torch.Tensor) -> list[Term]:
    """U-Net, V-Net and fusion outputs: the official joint forward against our three networks."""
    args = types.SimpleNamespace(in_channels=CHANNELS, num_classes=CLASSES)
    torch.manual_seed(SEED)
    theirs = official.model.KnowSAM(args)
    unet = build_model("unet", in_channels=CHANNELS, num_classes=CLASSES)
    vnet = build_model("vnet", in_channels=CHANNELS, num_classes=CLASSES)
    fusion = build_model("fusion", num_classes=CLASSES)
    copy_networks(theirs, unet, vnet, fusion)

    cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def forward(side: str, mode: str) -> tuple[torch.Tensor, ...]:
        """(U-Net, V-Net, fusion) outputs; each side and mode runs once, training mode first."""
        key = f"{side}-{mode}"
        if key not in cache:
            with torch.no_grad():
                torch.manual_seed(SEED)
                if side == "official":
                    theirs.train(mode == "train")
                    u, v, _, _, f = theirs(x)
                else:
                    for net in (unet, vnet, fusion):
                        net.train(mode == "train")
                    u, v = unet(x), vnet(x)
                    f = fusion(u, v)
            cache[key] = (u, v, f)
        return cache[key]

    terms = []
    for mode in ("train", "eval"):  # eval after train: both sides updated their BatchNorm statistics alike
        for i, name in enumerate(("unet", "vnet", "fusion")):
            terms.append(Term(f"{name} logits ({mode} mode)", partial(lambda m, i: forward("official", m)[i], mode, i),
                              partial(lambda m, i: forward("ours", m)[i], mode, i)))
    return terms


def prompt_head_terms(official: types.SimpleNamespace, x: torch.Tensor) -> list[Term]:
    """The learnable prompt heads' two tokens per class, from a ViT-B-sized image embedding."""
    torch.manual_seed(SEED)
    theirs = official.prompt.Super_Prompt(in_chns=CHANNELS, class_num=CLASSES)
    embedding = torch.randn(x.shape[0], 256, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(SEED))
    heads = nn.ModuleList(ClassPromptHead(256) for _ in range(CLASSES))
    for src, dst in zip(theirs.box_decoder, heads):
        copy_in_order(src, dst)
    if sum(p.numel() for p in theirs.parameters()) != sum(p.numel() for p in heads.parameters()):
        raise SystemExit("prompt-head parameter counts differ")

    def run(side: str, c: int, mode: str) -> torch.Tensor:
        module = theirs if side == "official" else heads
        module.train(mode == "train")
        with torch.no_grad():
            if side == "official":
                return theirs(embedding)[1][c]
            return torch.stack([head(embedding) for head in heads], dim=1)[:, c]

    return [Term(f"prompt head, class {c} ({mode} mode)", _seeded(partial(run, "official", c, mode)),
                 _seeded(partial(run, "ours", c, mode)))
            for mode in ("train", "eval") for c in range(CLASSES)]


def adapter_block_terms(official: types.SimpleNamespace, x: torch.Tensor) -> list[Term]:
    """Adapted ViT-B encoder blocks on a 16x16 token grid: windowed (14, padded) and global."""
    from segment_anything.modeling.image_encoder import Block

    dim, heads = 768, 12
    norm = partial(nn.LayerNorm, eps=1e-6)
    tokens = torch.randn(x.shape[0], SIZE // 16, SIZE // 16, dim, generator=torch.Generator().manual_seed(SEED))
    terms = []
    for window in (14, 0):
        torch.manual_seed(SEED)
        theirs = official.adapter_block.AdapterBlock(types.SimpleNamespace(thd=False), dim, heads, norm_layer=norm,
                                                     window_size=window)
        with torch.no_grad():  # LayerNorm affine values away from 1 and 0, as in a trained SAM
            for ln in (theirs.norm1, theirs.norm2):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.5)
        ours = AdaptedBlock(Block(dim, heads, norm_layer=norm, window_size=window))
        for src, dst in ((theirs.norm1, ours.norm1), (theirs.attn, ours.attn), (theirs.norm2, ours.norm2),
                         (theirs.mlp, ours.mlp), (theirs.Space_Adapter, ours.attn_adapter),
                         (theirs.MLP_Adapter, ours.mlp_adapter)):
            copy_in_order(src, dst)
        kind = "windowed, padded" if window else "global"
        terms.append(Term(f"adapted encoder block ({kind})", partial(_no_grad_call, theirs, tokens),
                          partial(_no_grad_call, ours, tokens)))
    return terms


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
    return path


def dropout_off(*modules: nn.Module) -> None:
    """Dropout off everywhere: the two sides draw their masks in different orders."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.p = 0.0


def capture_returns(run: Callable[[], object], functions: dict[str, Callable]) -> dict[str, dict]:
    """Run ``run`` and keep the local variables of each of ``functions`` as it returns (by name)."""
    codes = {f.__code__: name for name, f in functions.items()}
    captured: dict[str, dict] = {}

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "return" and frame.f_code in codes:
            captured[codes[frame.f_code]] = dict(frame.f_locals)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return captured


def disc_labels(n: int) -> torch.Tensor:
    """One foreground disc per image, centre and radius drawn from the seed."""
    g = torch.Generator().manual_seed(SEED)
    centres = torch.rand(n, 2, generator=g) * SIZE * 0.5 + SIZE * 0.25
    radii = torch.rand(n, generator=g) * SIZE * 0.2 + SIZE * 0.1
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    dist = ((rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2).sqrt()
    return (dist < radii[:, None, None]).long()


# (label, official frame, official local, our loss key) for every term of one training step.
BEFORE_MIXING = [
    ("consistency weight w(t)", "train", "consistency_weight", "cons_weight"),
    *[(f"{net} {what}", "train", f"{official}_{local}", f"{ours}_{key}")
      for net, official, ours in (("U-Net", "UNet", "unet"), ("V-Net", "VNet", "vnet"))
      for what, local, key in (("CE+Dice", "sup_loss", "sup"), ("KD", "kd_loss", "kd"),
                               ("entropy", "enp_loss", "ent"), ("consistency", "cons_loss", "cons"))],
    ("L_U", "train", "UNet_loss", "unet"),
    ("L_V", "train", "VNet_loss", "vnet"),
    ("L_F fusion CE+Dice", "train", "fusion_loss", "fusion"),
    ("L_sam", "train", "sam_sup_loss", "sam"),
]
MIXED_STAGE = [
    *[(f"{net} {what}", "mix_up", f"{official}_{local}", f"{ours}_mix_{key}")
      for net, official, ours in (("U-Net", "UNet", "unet"), ("V-Net", "VNet", "vnet"))
      for what, local, key in (("CE+Dice", "sup_mixed_loss", "sup"), ("entropy", "enp_mixed_loss", "ent"),
                               ("consistency", "cons_mixed_loss", "cons"),
                               ("CE+Dice on fused argmax (unlabeled rows)", "unsup_mixed_loss", "self"))],
    ("L_U,mix", "mix_up", "UNet_mixed_loss", "unet_mix"),
    ("L_V,mix", "mix_up", "VNet_mixed_loss", "vnet_mix"),
    ("L_F,mix fusion CE+Dice", "mix_up", "fusion_mixed_loss", "fusion_mix"),
    ("L_net = (L_U + L_U,mix + L_V + L_V,mix)/2 + L_F + L_F,mix", "train", "SGDL_loss", "net"),
]


def _value(v: object) -> torch.Tensor:
    return v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


def build_both(official: types.SimpleNamespace, folder: Path) -> tuple[nn.Module, KnowSam]:
    """The official trainer and our method, both on one random-init SAM checkpoint written to ``folder``."""
    checkpoint = random_sam_checkpoint(folder)
    # The official build reads this fixed file name from the working directory (its checkpoint
    # argument is ignored), so the random checkpoint is linked there under that name.
    (folder / "sam_vit_b_01ec64.pth").symlink_to(checkpoint)
    args = types.SimpleNamespace(
        image_size=SIZE, num_classes=CLASSES, in_channels=CHANNELS, model_type="vit_b", mod="sam_adpt", thd=False,
        multimask=False, point_nums=5, box_nums=1, device="cpu", lr=1e-4, UNet_lr=0.01, batch_size=BATCH,
        labeled_bs=LABELED, max_iterations=ITERATIONS, mixed_iterations=MIXED_AFTER, consistency=0.1,
        consistency_rampup=200.0,
    )
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        torch.manual_seed(SEED)
        trainer = official.trainer.Trainer(args)
    finally:
        os.chdir(cwd)
    saved = torch.load(checkpoint, weights_only=True)
    left_random = [k for k in trainer.sam_model.state_dict() if k not in saved]
    decoder = [k for k in left_random if k.startswith("mask_decoder.") and "Adapter" not in k]
    print(f"info: the official SAM build leaves {len(left_random)} tensors out of the checkpoint: "
          f"{sum('Adapter' in k for k in left_random)} adapter tensors (encoder and mask decoder), "
          f"{sum(k.startswith('super_prompt.') for k in left_random)} prompt-module tensors and "
          f"{len(decoder)} mask-decoder tensors whose names differ from SAM's ({decoder[0]}, ...)")
    ctx = MethodContext(in_channels=CHANNELS, num_classes=CLASSES, image_size=SIZE, iterations=ITERATIONS,
                        train=TrainParams(batch_size=BATCH, labeled_batch=LABELED),
                        sam=SamParams(arch="vit_b", checkpoint=str(checkpoint)), device=torch.device("cpu"),
                        seed=SEED)
    return trainer, get_method("knowsam")(ctx, KnowSamParams(mixed_iterations=float(MIXED_AFTER)))


def training_step_terms(official: types.SimpleNamespace, x: torch.Tensor) -> list[Term]:
    """Every loss term of one official training step with mixing on, against ours."""
    with tempfile.TemporaryDirectory(prefix="knowsam-parity-") as folder:  # the checkpoint: about 360 MB
        trainer, ours = build_both(official, Path(folder))
    ours.train()
    copy_networks(trainer.SGDL, ours.nets["unet"], ours.nets["vnet"], ours.nets["fusion"])
    sam = ours.nets["sam"]
    for src, dst in zip(trainer.sam_model.super_prompt.box_decoder, sam.prompt_heads):
        copy_in_order(src, dst)
    for src, dst in zip(trainer.sam_model.image_encoder.blocks, sam.image_encoder.blocks):
        copy_in_order(src.Space_Adapter, dst.attn_adapter)
        copy_in_order(src.MLP_Adapter, dst.mlp_adapter)
    # Both sides leave the decoder MLPs at their random init (the official defect): the same
    # layers, drawn by two different builds, so the official draw is copied in.
    official_transformer, transformer = trainer.sam_model.mask_decoder.transformer, sam.mask_decoder.transformer
    for src, dst in zip(official_transformer.layers, transformer.layers):
        for a, b in ((src.Space_Adapter, dst.attn_adapter), (src.MLP_Adapter, dst.mlp_adapter), (src.mlp, dst.mlp)):
            copy_in_order(a, b)
    copy_in_order(official_transformer.Space_Adapter, transformer.attn_adapter)
    dropout_off(trainer.SGDL, trainer.sam_model, *ours.nets.values())

    y = disc_labels(BATCH)
    batch = Batch(x[:LABELED], y[:LABELED], x[LABELED:])
    own_sam: dict[str, torch.Tensor] = {}
    sam_logits = ours._sam_logits

    def recording(*args: object) -> torch.Tensor:
        own_sam["logits"] = sam_logits(*args)
        return own_sam["logits"]

    ours._sam_logits = recording
    with torch.no_grad():
        own = ours.losses(batch, STEP)
    if not ours.mixing_at(STEP):
        raise SystemExit("our method does not mix at the compared iteration")
    with warnings.catch_warnings():  # the official step logs tensors with a graph: torch warns each time
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        frames = capture_returns(lambda: trainer.train(x, y, STEP),
                                 {"train": type(trainer).train, "mix_up": type(trainer).mix_up})
    official_sam = frames["train"]["pred_sam"].detach()
    ours._sam_logits = lambda *args: official_sam
    with torch.no_grad():
        shared = ours.losses(batch, STEP)

    terms = [Term("SAM teacher: logits (our SAM)", lambda: official_sam, lambda: own_sam["logits"])]
    for label, local, key in (("L_sam", "sam_sup_loss", "sam"), ("U-Net KD", "UNet_kd_loss", "unet_kd"),
                              ("V-Net KD", "VNet_kd_loss", "vnet_kd")):
        terms.append(Term(f"SAM teacher: {label} (our SAM)", partial(_value, frames["train"][local]),
                          partial(_value, own[key])))
    for stage, table in (("before mixing", BEFORE_MIXING), ("mixed stage", MIXED_STAGE)):
        for label, frame, local, key in table:
            terms.append(Term(f"{stage}: {label}", partial(_value, frames[frame][local]),
                              partial(_value, shared[key])))
    return terms


SECTIONS = (network_terms, prompt_head_terms, adapter_block_terms, training_step_terms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of the official KnowSAM code")
    root = ap.parse_args().official.resolve()
    if not (root / "Model" / "model.py").is_file():
        ap.error(f"{root} is not a checkout of the official KnowSAM code (no Model/model.py)")
    official = import_official(root)
    x = torch.rand(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED))
    print(f"batch {BATCH} ({LABELED} labeled + {BATCH - LABELED} unlabeled), {SIZE} px, {CLASSES} classes, "
          f"seed {SEED}, CPU")
    passed = total = 0
    for section in SECTIONS:
        for term in section(official, x):
            theirs, ours = term.official(), term.ours()
            diff = relative_difference(theirs, ours)
            ok = diff <= TOLERANCE
            passed, total = passed + ok, total + 1
            print(f"{'ok ' if ok else 'BAD'} {term.name}: official max |{theirs.abs().max():.4g}|, "
                  f"relative difference {diff:.2e}")
    print(f"parity: {passed}/{total} terms within {TOLERANCE:g} relative")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())

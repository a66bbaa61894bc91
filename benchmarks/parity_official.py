"""Parity of this project's KnowSAM modules with the official code, compared output by output on CPU.

Builds the official networks from a checkout of the official KnowSAM code (taozh2017/KnowSAM; not
shipped here), builds ours, copies the official weights into ours and feeds both the same batch
(fixed seed, 4 images = 2 labeled + 2 unlabeled, 256 px). One line per compared term, then
``parity: N/N terms within 1e-4 relative``; the exit status is 1 when any term differs.

    .venv/bin/python benchmarks/parity_official.py --official /path/to/KnowSAM

Compared today, module by module: the U-Net, V-Net and fusion outputs of the official
``KnowSAM.forward`` (training mode with the dropout masks drawn from the same seed, then eval
mode), the learnable prompt heads per class, and a windowed and a global adapted ViT-B encoder
block. The official code calls ``.cuda()``; the script makes that a no-op for its own process
(their files are untouched). It needs what the compared official files import: ``einops``.

Each section is a function returning ``Term`` objects; loss terms of a whole training step are
added the same way, as further sections.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from knowsam.models import build_model
from knowsam.models.sam_teacher import AdaptedBlock, ClassPromptHead

TOLERANCE = 1e-4
SEED = 2024
BATCH, LABELED, SIZE, CLASSES, CHANNELS = 4, 2, 256, 2, 3


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


def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules compared here, imported from ``root`` with ``.cuda()`` as a no-op."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(root))
    # The image-encoder package's __init__ also imports TinyViT (and timm); the ViT adapter block
    # needs neither, so its parent packages are registered without running their __init__.
    for name in ("Model.ImageEncoder", "Model.ImageEncoder.vit"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    return types.SimpleNamespace(
        model=importlib.import_module("Model.model"),
        prompt=importlib.import_module("Model.prompt"),
        adapter_block=importlib.import_module("Model.ImageEncoder.vit.adapter_block"),
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


def network_terms(official: types.SimpleNamespace, x: torch.Tensor) -> list[Term]:
    """U-Net, V-Net and fusion outputs: the official joint forward against our three networks."""
    args = types.SimpleNamespace(in_channels=CHANNELS, num_classes=CLASSES)
    torch.manual_seed(SEED)
    theirs = official.model.KnowSAM(args)
    unet = build_model("unet", in_channels=CHANNELS, num_classes=CLASSES)
    vnet = build_model("vnet", in_channels=CHANNELS, num_classes=CLASSES)
    fusion = build_model("fusion", num_classes=CLASSES)
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


SECTIONS = (network_terms, prompt_head_terms, adapter_block_terms)


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

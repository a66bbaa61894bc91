"""KnowSAM's SAM teacher: SAM with adapters in the image encoder and learnable class prompts.

Built from ``segment_anything``'s own modules so that a SAM checkpoint loads by key name
(see :mod:`knowsam.models.sam_checkpoint`). Differences from stock SAM, all from KnowSAM:

* the image encoder runs at ``image_size`` (256 in the paper) instead of 1024, with relative
  positions off, so only the absolute positional embedding depends on the input size;
* every encoder block gets an attention adapter and a parallel MLP adapter (:class:`AdaptedBlock`);
* the sparse prompt is not a box but two tokens per class predicted from the image embedding
  (Learnable Prompt Strategy, :class:`ClassPromptHead`); the dense prompt is a logit map given
  by the caller (the fused sub-network output), embedded by SAM's frozen mask encoder;
* the mask decoder's two-way transformer is the official adapted one
  (:mod:`knowsam.models.adapted_decoder`; ``decoder="stock"``: SAM's own), and its MLPs keep their
  random initialisation instead of the checkpoint's, as in the official runs
  (``load_decoder_mlp=True`` loads them);
* the decoder runs once per class, every (image, class) pair in one batched call.

Cheaper than a literal transcription, with the same outputs and gradients: each image's
embedding is broadcast over its classes instead of copied K times; the decoder keeps a graph
only for the rows a loss reads (``decode(..., grad_rows=n)``): it couples no rows, so the rows
of the other images are decoded without one; SAM's convolution stacks (mask downscaling, output
upscaling) run on channels-last maps with each ``LayerNorm2d`` as one ``layer_norm`` call. Two
options change the maths (``sam.prompt_grid``: the grid the prompt heads see; ``sam.amp_bf16``:
bfloat16 autocast in the teacher), both in docs/knowsam-options.md.

Only the adapters and the prompt heads train; the rest of SAM is frozen. SAM's modules contain
no dropout or batch norm (only LayerNorm), so train/eval mode does not change the frozen parts.

``arch="lite_medsam"`` swaps the ViT for LiteMedSAM's TinyViT (:mod:`knowsam.models.lite_medsam`):
input fixed at 256 px (images of another size are resized for the encoder), 64x64 embedding,
adapters in its attention blocks. With ``encoder="cached"`` the encoder is frozen without adapters
and its embeddings come from a cache computed once (:mod:`knowsam.models.embedding_cache`): only
the prompt heads train.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from knowsam import step_timing
from knowsam.config import SAM_DECODERS, SAM_ENCODERS, SamParams
from knowsam.errors import ConfigError
from knowsam.models import lite_medsam
from knowsam.models.adapter import Adapter
from knowsam.models.unet import ConvBlock


def _defer_segment_anything_init() -> None:
    """Let ``segment_anything.modeling`` load without the package's ``__init__`` running first.

    That ``__init__`` also imports SAM's predictor and mask generator, which import torchvision
    (seconds on a CPU, paid by every pipeline stage that builds a teacher); the modeling
    subpackage needs only torch. The package module is registered unexecuted, and its own
    ``__init__`` runs on the first access to any other top-level name (PEP 562 ``__getattr__``),
    so ``from segment_anything import sam_model_registry`` still works, later, at its usual cost.
    """
    if "segment_anything" in sys.modules:
        return
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.loader is None:
        return  # not installed: the import below raises the usual ModuleNotFoundError
    package = importlib.util.module_from_spec(spec)

    def complete(name: str):
        if name.startswith("__"):  # introspection probes (e.g. __all__) do not need the full package
            raise AttributeError(f"module 'segment_anything' has no attribute {name!r}")
        del package.__getattr__  # runs once: the real __init__ defines everything else
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete
    sys.modules["segment_anything"] = package


_defer_segment_anything_init()
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402
from segment_anything.modeling.common import LayerNorm2d  # noqa: E402
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition  # noqa: E402

from knowsam.models.adapted_decoder import AdaptedTwoWayTransformer  # noqa: E402

PATCH_SIZE = 16
# SAM's pixel statistics on the 0-255 scale (used only with normalize_pixels=True).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """Sizes of one SAM variant; the official three match ``segment_anything.build_sam``."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_dim: int = 256  # channels of the image embedding, prompt tokens and decoder
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16


ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    # Same structure at toy width for CPU tests, profiles and demos (no official weights):
    # 4 blocks of width 128 (4 heads), windows of 4 tokens with global attention in blocks 1
    # and 3 (the windowed/global mix of the real models), 64-channel embedding, and a 2-layer
    # decoder (4 heads, MLP 256). About 1.9 M parameters (0.77 M trainable at 2 classes, mostly
    # the prompt heads); forward + backward of a batch of 4 at 128 px takes a fraction of a second
    # on 2 CPU threads.
    "tiny": SamArch(128, 4, 4, (1, 3), window_size=4, prompt_dim=64, decoder_mlp_dim=256, decoder_heads=4),
}
TEACHER_ARCHS = (*ARCHS, lite_medsam.ARCH)


def embedding_shape(arch: str, image_size: int) -> tuple[int, int, int]:
    """(C, E, E) of the encoder's image embedding for ``arch`` at ``image_size`` (the cache's row shape)."""
    if arch == lite_medsam.ARCH:
        return lite_medsam.EMBED_DIM, lite_medsam.EMBED_GRID, lite_medsam.EMBED_GRID
    if arch not in ARCHS:
        raise ConfigError(f"unknown SAM arch {arch!r}; known: {', '.join(TEACHER_ARCHS)}")
    return ARCHS[arch].prompt_dim, image_size // PATCH_SIZE, image_size // PATCH_SIZE


def build_sam_parts(
    arch: str, image_size: int, *, use_rel_pos: bool = False
) -> tuple[ImageEncoderViT, PromptEncoder, MaskDecoder]:
    """SAM's three modules for ``arch`` at ``image_size``, configured as ``segment_anything.build_sam``.

    ``use_rel_pos=True`` with ``image_size=1024`` gives exactly the stock SAM layout (used to make
    checkpoints in SAM's format); the teacher uses ``use_rel_pos=False`` as KnowSAM does.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown SAM arch {arch!r}; known: {', '.join(ARCHS)}")
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ConfigError(
            f"image size {image_size} cannot be patched by SAM (patch {PATCH_SIZE}): use a multiple of {PATCH_SIZE}"
        )
    a = ARCHS[arch]
    grid = image_size // PATCH_SIZE
    encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=PATCH_SIZE,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=a.num_heads,
        mlp_ratio=4,
        out_chans=a.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=use_rel_pos,
        window_size=a.window_size,
        global_attn_indexes=a.global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=a.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=a.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=a.decoder_depth, embedding_dim=a.prompt_dim, mlp_dim=a.decoder_mlp_dim, num_heads=a.decoder_heads
        ),
        transformer_dim=a.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=a.prompt_dim,
    )
    return encoder, prompt_encoder, decoder


class AdaptedBlock(nn.Module):
    """SAM's encoder ``Block`` with KnowSAM's adapters.

    Takes over the original block's submodules under their original names (``norm1``, ``attn``,
    ``norm2``, ``mlp``), so SAM checkpoint keys ``image_encoder.blocks.<i>.*`` still match.
    """

    MLP_ADAPTER_SCALE = 0.5

    def __init__(self, block: Block):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        self.attn_adapter = Adapter(dim, skip=True)  # after attention, before the residual sum
        self.mlp_adapter = Adapter(dim, skip=False)  # in parallel with the MLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_adapter(self._attention(self.norm1(x)))
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.MLP_ADAPTER_SCALE * self.mlp_adapter(xn)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's (windowed) self-attention of normalised tokens (B, H, W, C), computed more cheaply.

        The official adapted block pads the token grid to whole windows *before* ``norm1`` and
        the qkv and output projections (``Model/ImageEncoder/vit/adapter_block.py`` 66-96; a
        16x16 grid becomes 28x28 with 14-token windows: three times the tokens). A padded token
        is zero, so after ``norm1`` it is LayerNorm's bias and its q, k, v are the qkv projection
        of that bias; its output is thrown away. Here the projections run on the real tokens
        only, padded positions get exactly those q, k, v, and attention is PyTorch's fused
        kernel: the same function with about a third of the projection work in windowed blocks.
        """
        attn = self.attn
        if attn.use_rel_pos:  # not used by the teacher; keep SAM's own path for it
            return self._stock_attention(x)
        b, h, w, c = x.shape
        qkv = attn.qkv(x)
        ws = self.window_size
        if ws > 0:
            hp, wp = h + (-h) % ws, w + (-w) % ws
            if (hp, wp) != (h, w):
                padded_token = attn.qkv(self.norm1(x.new_zeros(c)))  # a zero token, normalised and projected
                padded = padded_token.expand(b, hp, wp, 3 * c).clone()
                padded[:, :h, :w] = qkv
                qkv = padded
            qkv, _ = window_partition(qkv, ws)  # (B * windows, ws, ws, 3C): already whole windows
        n, gh, gw = qkv.shape[:3]
        q, k, v = qkv.reshape(n, gh * gw, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (n, heads, tokens, head_dim)
        out = out.transpose(1, 2).reshape(n, gh, gw, c)
        if ws > 0:
            out = window_unpartition(out, ws, (hp, wp), (h, w))
        return attn.proj(out)

    def _stock_attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size == 0:
            return self.attn(x)
        h, w = x.shape[1], x.shape[2]
        windows, pad_hw = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, pad_hw, (h, w))


class ClassPromptHead(nn.Sequential):
    """LPS head for one class: image embedding (B, C, E, E) -> two prompt tokens (B, 2, C).

    The official head (``Model/prompt.py`` 29-59, 183-212): conv block, downsampling block, conv
    block, downsampling block, 1x1 conv, global average pooling and a feed-forward net
    C -> 4C -> 2C. A conv block is the U-Net's (two 3x3 conv + BatchNorm + LeakyReLU, dropout
    between them), here with dropout 0.1, the FFN's dropout too. BatchNorm makes a training-mode
    prompt depend on the rest of the batch; the frozen SAM parts have no such layer.

    Pooling uses ``ceil_mode`` (the official floors; the same on the even grids of 64 px and up)
    so that token grids smaller than 4x4 end in a 1x1 map rather than an empty one. The last
    block's training-mode BatchNorm then needs more than one image per call at such sizes
    (under 128 px); the official size, 256 px, leaves it a 4x4 map.
    """

    DROPOUT = 0.1

    def __init__(self, dim: int):
        p = self.DROPOUT
        super().__init__(
            ConvBlock(dim, dim, p),
            nn.MaxPool2d(2, ceil_mode=True),
            ConvBlock(dim, dim, p),
            ConvBlock(dim, dim, p),
            nn.MaxPool2d(2, ceil_mode=True),
            ConvBlock(dim, dim, p),
            nn.Conv2d(dim, dim, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(4 * dim, 2 * dim),
            nn.Dropout(p),
            nn.Unflatten(1, (2, dim)),
        )


def channels_last_stack(stack: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's convolution stack ``stack`` on ``x`` with the same values, fewer passes over memory.

    Each ``LayerNorm2d`` (written by SAM as mean, subtraction, power, mean, square root, division,
    scale and shift: a pass over the map each) runs as one ``layer_norm`` over the channels of a
    channels-last view, and the maps stay channels-last for the convolutions around it.
    """
    for layer in stack:
        if isinstance(layer, LayerNorm2d):
            x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], layer.weight, layer.bias, layer.eps)
            x = x.permute(0, 3, 1, 2)
        else:
            x = layer(x)
    return x


class SamTeacher(nn.Module):
    """SAM teacher producing per-class logits (B, K, H, W) at ``image_size``.

    Input images are in [0, 1], shape (B, in_channels, image_size, image_size); grey images are
    repeated to RGB. ``normalize_pixels=True`` applies SAM's pixel mean/std on the 0-255 scale;
    the official KnowSAM code feeds [0, 1] inputs unnormalised, hence the default False.
    ``prompt_grid``: the prompt heads see the embedding average-pooled to at most that many
    tokens a side (``"full"``: its own grid). ``bf16``: bfloat16 autocast around decoding (and
    encoding, with encoder adapters; a cached encoder's embeddings are the embed stage's).
    """

    def __init__(
        self,
        arch: str,
        image_size: int,
        num_classes: int,
        in_channels: int = 3,
        normalize_pixels: bool = False,
        encoder: str = "adapters",
        decoder: str = "adapted",
        load_decoder_mlp: bool = False,
        prompt_grid: int | str = SamParams.prompt_grid,
        bf16: bool = False,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"SAM teacher takes 1 or 3 input channels, got in_channels={in_channels}")
        if num_classes < 1:
            raise ConfigError(f"SAM teacher needs num_classes >= 1, got {num_classes}")
        if encoder not in SAM_ENCODERS:
            raise ConfigError(f"unknown SAM encoder mode {encoder!r}; known: {', '.join(SAM_ENCODERS)}")
        self.arch, self.image_size, self.num_classes = arch, image_size, num_classes
        self.in_channels, self.normalize_pixels, self.encoder_mode = in_channels, normalize_pixels, encoder
        if arch == lite_medsam.ARCH:
            lite_medsam.check_options(normalize_pixels)
            self.image_encoder, self.prompt_encoder, self.mask_decoder = lite_medsam.build_parts()
            self.encoder_size = lite_medsam.INPUT_SIZE
            if encoder == "adapters":
                lite_medsam.add_adapters(self.image_encoder, Adapter)
        elif arch in ARCHS:
            self.image_encoder, self.prompt_encoder, self.mask_decoder = build_sam_parts(arch, image_size)
            self.encoder_size = image_size
            if encoder == "adapters":
                self.image_encoder.blocks = nn.ModuleList(AdaptedBlock(b) for b in self.image_encoder.blocks)
        else:
            raise ConfigError(f"unknown SAM arch {arch!r}; known: {', '.join(TEACHER_ARCHS)}")
        if decoder not in SAM_DECODERS:
            raise ConfigError(f"unknown SAM decoder {decoder!r}; known: {', '.join(SAM_DECODERS)}")
        if decoder == "adapted":
            self.mask_decoder.transformer = AdaptedTwoWayTransformer(self.mask_decoder.transformer)
        # SAM tensors a checkpoint load leaves at their (seeded) initial values: the adapted decoder's
        # MLPs, which the official build never loads (its MLP layers have other names).
        self.unloaded_sam_names = frozenset(
            name
            for name, _ in self.named_parameters()
            if decoder == "adapted" and not load_decoder_mlp and self.is_decoder_mlp_name(name)
        )
        dim = self.mask_decoder.transformer_dim
        self.prompt_heads = nn.ModuleList(ClassPromptHead(dim) for _ in range(num_classes))
        grid = embedding_shape(arch, image_size)[-1]
        self.prompt_grid = grid if prompt_grid == "full" else min(grid, prompt_grid)
        self.bf16 = bf16
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()
        self.train()

    def train(self, mode: bool = True) -> SamTeacher:
        """Train mode for the prompt heads; TinyViT's frozen BatchNorm statistics and cached attention
        biases need its eval mode always (calling it also refreshes that cache after new weights load)."""
        super().train(mode)
        if self.arch == lite_medsam.ARCH:
            self.image_encoder.train(False)
        return self

    @staticmethod
    def is_added_name(name: str) -> bool:
        """True for tensors KnowSAM adds to SAM (adapters, prompt heads): exactly the trainable ones."""
        return name.startswith("prompt_heads.") or ".attn_adapter." in name or ".mlp_adapter." in name

    @staticmethod
    def is_decoder_mlp_name(name: str) -> bool:
        return name.startswith("mask_decoder.transformer.layers.") and ".mlp." in name

    def freeze(self) -> None:
        """Make exactly the adapters and prompt heads trainable; freeze the rest of SAM."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_added_name(name))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def compile(self, *args, **kwargs) -> None:
        """``train.compile``: compile, in place, what a training step runs (a step never calls ``forward``):
        the mask decoding and, with encoder adapters, the image encoder. Checkpoint keys stay those
        of the plain modules. The prompt heads stay eager: compiled, their dropout would draw other
        masks than eager's from the same seed, and on the prompt grid they are a small part."""
        if self.encoder_mode == "adapters":
            self.image_encoder.compile(*args, **kwargs)
        self._predict_masks = torch.compile(self._predict_masks, *args, **kwargs)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, S, S) in [0, 1] -> image embeddings (B, prompt_dim, E, E).

        E is S/16 for the ViTs; LiteMedSAM resizes every image to 256 px and gives E = 64.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            s = self.image_size
            raise ValueError(f"SAM teacher expects (B, {self.in_channels}, {s}, {s}), got {tuple(x.shape)}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize_pixels:
            x = (x * 255.0 - self.pixel_mean) / self.pixel_std
        if self.encoder_size != self.image_size:
            x = F.interpolate(x, size=(self.encoder_size, self.encoder_size), mode="bilinear", align_corners=False)
        # A cached encoder runs only in the embed stage, whose own setting (train.amp_bf16) is part of the cache.
        bf16 = self._autocast(x.device) if self.encoder_mode == "adapters" else contextlib.nullcontext()
        with step_timing.part(step_timing.TEACHER_ENCODER), bf16:
            return self.image_encoder(x)

    def prompts(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The learnable sparse prompts (B, K, 2, C): each class's head on the embedding pooled to the prompt grid."""
        with step_timing.part(step_timing.PROMPT_HEADS), self._autocast(embeddings.device):
            if embeddings.shape[-1] > self.prompt_grid:
                embeddings = F.adaptive_avg_pool2d(embeddings, self.prompt_grid)
            return torch.stack([head(embeddings) for head in self.prompt_heads], dim=1)

    def decode(
        self, embeddings: torch.Tensor, dense_logits: torch.Tensor, grad_rows: int | None = None
    ) -> torch.Tensor:
        """Per-class SAM logits (B, K, S, S), float32, from image embeddings and dense logit prompts (B, K, h, w).

        ``dense_logits`` is detached here as well: the dense prompt must never pass SAM's loss
        back into the sub-networks that produced it. ``grad_rows``: only the first that many
        images keep a graph through the mask decoder (None: all). The decoder couples no rows
        (the prompt heads' BatchNorm does, and they always see the whole batch), so this changes
        no output and no gradient of a loss that reads those rows only.
        """
        b, k = embeddings.shape[0], self.num_classes
        if dense_logits.ndim != 4 or dense_logits.shape[:2] != (b, k):
            raise ValueError(f"dense prompt must be (B={b}, K={k}, h, w), got {tuple(dense_logits.shape)}")
        sparse = self.prompts(embeddings)
        with step_timing.part(step_timing.DECODER), self._autocast(embeddings.device):
            masks = F.interpolate(
                dense_logits.detach().to(embeddings.dtype),
                size=self.prompt_encoder.mask_input_size,
                mode="bilinear",
                align_corners=False,
            )
            masks = masks.reshape(b * k, 1, *masks.shape[-2:])
            dense = channels_last_stack(self.prompt_encoder.mask_downscaling, masks)  # (B*K, C, E, E)
            g = b if grad_rows is None else grad_rows
            low_res = self._predict_masks(embeddings[:g], sparse[:g].flatten(0, 1), dense[: g * k])
            if g < b:
                with torch.no_grad():
                    rest = self._predict_masks(embeddings[g:], sparse[g:].flatten(0, 1), dense[g * k :])
                low_res = torch.cat([low_res, rest])
            low_res = low_res.view(b, k, *low_res.shape[-2:])
            size = (self.image_size, self.image_size)
            return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False).float()

    def forward(self, x: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), dense_logits)

    def decode_boxes(self, embeddings: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """SAM's own box prompting, without the learnable prompts: what the pretrained model does alone.

        ``boxes`` (N, 4) are (x0, y0, x1, y1) in the encoder's input pixels, box n on image
        ``rows[n]`` of ``embeddings``; returns logits (N, S_enc, S_enc) at the encoder's input size.
        """
        with self._autocast(embeddings.device):
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype), masks=None)
            low_res = self._predict_masks(embeddings[rows], sparse, dense)
            size = (self.encoder_size, self.encoder_size)
            return F.interpolate(low_res[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].float()

    def _predict_masks(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """SAM's single-mask prediction for N = B*K prompts over B images, in one decoder call.

        ``MaskDecoder.predict_masks`` repeats the image embedding once per prompt assuming a single
        image; here row b*K + k pairs image b with class k, the embedding broadcast over the K
        classes as it is added to the dense prompt (no repeated copy), every map channels-last so
        that the transformer's tokens and the upscaling's input are views, not copies. Output is
        mask token 0, as SAM's ``multimask_output=False``.
        """
        dec = self.mask_decoder
        n, (b, c, e) = dense.shape[0], embeddings.shape[:3]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        # Channels-last maps: the transformer's (N, E*E, C) token views of them are then plain views.
        cl = torch.channels_last
        src = (embeddings.contiguous(memory_format=cl).unsqueeze(1) + dense.reshape(b, n // b, c, e, e)).flatten(0, 1)
        pos = self.prompt_encoder.get_dense_pe().contiguous(memory_format=cl).expand(n, -1, -1, -1)
        hs, src = dec.transformer(src, pos, tokens)
        mask_token = hs[:, 1, :]  # index 0 is the IoU token
        image = src.reshape(n, e, e, c).permute(0, 3, 1, 2)  # the tokens as a channels-last map: no copy
        upscaled = channels_last_stack(dec.output_upscaling, image)  # (N, C/8, 4E, 4E)
        hyper = dec.output_hypernetworks_mlps[0](mask_token)  # (N, C/8)
        return torch.einsum("nc,nchw->nhw", hyper, upscaled)

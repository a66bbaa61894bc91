"""The frozen-encoder teacher: its embedding cache, and its logits moved exactly as the student's view."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from knowsam.data.augment import _REFLECT, WeakStrongAugment, weak_augment_with_geometry
from knowsam.data.batch import Batch
from knowsam.data.dataset import FORMAT_VERSION, PreparedDataset
from knowsam.data.geometry import ViewGeometry, warp_from_albumentations
from knowsam.errors import KnowsamError
from knowsam.methods.sam_support import teacher_forward
from knowsam.models import embedding_cache
from knowsam.models.sam_teacher import SamTeacher


def smooth_field(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random but smooth images: interpolation errors stay small, a wrong mirror does not."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_shared_augmentation_every_flip_and_rotation_is_followed_exactly():
    n, k = 64, 3
    y0 = torch.randint(0, k, (n, 8, 8), generator=torch.Generator().manual_seed(0))
    x0 = F.one_hot(y0, k).permute(0, 3, 1, 2).float()
    x, y, geometry = weak_augment_with_geometry(x0, y0, torch.Generator().manual_seed(1), jitter=0.0)
    drawn = {(bool(h), bool(v), int(r)) for h, v, r in zip(geometry.hflip, geometry.vflip, geometry.rot)}
    assert len(drawn) == 16  # every flip pair with every quarter turn occurs
    teacher_logits = F.one_hot(y0, k).permute(0, 3, 1, 2).float()  # a teacher that predicts the labels
    assert torch.equal(geometry.apply(teacher_logits).argmax(1), y)  # moved onto the student's view
    assert torch.equal(geometry.invert(F.one_hot(y, k).permute(0, 3, 1, 2).float()).argmax(1), y0)


@pytest.mark.parametrize(
    "transform",
    [
        A.HorizontalFlip(p=1.0),
        A.VerticalFlip(p=1.0),
        A.Affine(
            translate_percent=(-0.0625, 0.0625), scale=(0.95, 1.05), rotate=(-10, 10), border_mode=_REFLECT, p=1.0
        ),
        A.GridDistortion(num_steps=5, distort_limit=0.05, border_mode=_REFLECT, p=1.0),
        A.ElasticTransform(alpha=1, sigma=50, border_mode=_REFLECT, p=1.0),
    ],
    ids=lambda t: type(t).__name__,
)
def test_each_albumentations_transform_the_loader_draws_is_followed(transform):
    size = 64
    pipeline = A.Compose([A.HorizontalFlip(p=1.0), transform], save_applied_params=True)
    pipeline.set_random_seed(3)
    x0 = smooth_field(1, 3, size)
    out = pipeline(image=x0[0].permute(1, 2, 0).numpy())
    view = torch.from_numpy(out["image"]).permute(2, 0, 1)[None]
    hflip, vflip, warp, unwarp = warp_from_albumentations(out["applied_transforms"], size)
    geometry = ViewGeometry(
        torch.tensor([hflip]),
        torch.tensor([vflip]),
        torch.zeros(1, dtype=torch.int64),
        None if warp is None else torch.from_numpy(warp)[None],
        None if unwarp is None else torch.from_numpy(unwarp)[None],
    )
    error = (geometry.apply(x0) - view).abs().mean()
    mirrored = ViewGeometry(
        torch.tensor([not hflip]),
        torch.tensor([vflip]),
        torch.zeros(1, dtype=torch.int64),
        geometry.warp,
        geometry.unwarp,
    )
    assert error < 0.01 < (mirrored.apply(x0) - view).abs().mean()
    inner = slice(8, -8)  # what the view never showed comes back by reflection only
    back = geometry.invert(geometry.apply(x0))
    assert (back - x0)[..., inner, inner].abs().mean() < 0.01


def test_weak_strong_loader_views_align_with_the_recorded_geometry():
    size = 256  # the strong pipeline's 12 px holes cover little of the image at the official size
    aug = WeakStrongAugment(size, record_geometry=True)
    x0 = smooth_field(8, 3, size, seed=4)
    y0 = (x0[:, 0] > 0.5).long()
    x_l, _, x_u = aug(x0[:4], y0[:4], x0[4:], torch.Generator().manual_seed(2))
    view = torch.cat([x_l, x_u])
    moved = aug.geometry.apply(x0)
    for a, b in zip(moved, view):  # brightness/contrast change values linearly: correlation ignores them
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


def make_prepared(root: Path, n: int = 5, n_test: int = 3, size: int = 32) -> PreparedDataset:
    root.mkdir(parents=True)
    images = (smooth_field(n + n_test, 3, size, seed=5) * 255).to(torch.uint8).numpy()
    np.save(root / "train_images.npy", images[:n])
    np.save(root / "train_masks.npy", (images[:n, 0] > 127).astype(np.uint8))
    (root / "train_index.csv").write_text("name,case\n" + "".join(f"im{i},im{i}\n" for i in range(n)))
    np.save(root / "Test-A_images.npy", images[n:])
    (root / "Test-A_index.csv").write_text("name,case\n" + "".join(f"t{i},t{i}\n" for i in range(n_test)))
    (root / "meta.json").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "num_classes": 2,
                "in_channels": 3,
                "image_size": size,
                "test_sets": {"Test-A": n_test},
            }
        )
    )
    return PreparedDataset(root)


def test_embedding_cache_equals_a_fresh_encoder_pass_and_resumes(tmp_path):
    data = make_prepared(tmp_path / "prepared")
    torch.manual_seed(0)
    teacher = SamTeacher("tiny", 32, 2, encoder="cached").eval()
    expected = embedding_cache.identity(data, "tiny", "test weights")
    assert list(expected["parts"]) == ["train", "Test-A"]
    folder = tmp_path / "emb"

    def stop_after(count):
        def progress(done, total):
            assert total == 8
            if done >= count:
                raise KeyboardInterrupt

        return progress

    with pytest.raises(KeyboardInterrupt):
        embedding_cache.embed_dataset(data, folder, teacher.encode, expected, batch=2, progress=stop_after(2))
    with pytest.raises(KnowsamError, match=r"incomplete \(train: 2 of 5\)"):
        embedding_cache.open_cache(folder, expected)
    with pytest.raises(KeyboardInterrupt):  # resumed, stopped again inside the test part
        embedding_cache.embed_dataset(data, folder, teacher.encode, expected, batch=2, progress=stop_after(7))
    with pytest.raises(KnowsamError, match=r"incomplete \(Test-A: 2 of 3\)"):
        embedding_cache.open_cache(folder, expected)
    meta = embedding_cache.embed_dataset(data, folder, teacher.encode, expected, batch=2)
    assert meta["last_call"]["images"] == 1 and meta["done"] == {"train": 5, "Test-A": 3}
    cache = embedding_cache.open_cache(folder, expected)
    with torch.no_grad():
        for part in ("train", "Test-A"):
            fresh = teacher.encode(torch.from_numpy(data.images(part).astype(np.float32) / 255))
            torch.testing.assert_close(torch.from_numpy(np.array(cache[part])).float(), fresh, rtol=2e-3, atol=2e-3)
    with pytest.raises(KnowsamError, match="made for other weights"):
        embedding_cache.open_cache(folder, {**expected, "weights": "other"})
    # Another encoder starts over: no row of the old cache survives under the new identity.
    other = {**expected, "weights": "other"}
    meta = embedding_cache.embed_dataset(data, folder, lambda x: teacher.encode(x) * 0, other, batch=4)
    assert meta["last_call"]["images"] == 8
    assert not np.asarray(embedding_cache.open_cache(folder, other)["train"]).any()


def test_cached_teacher_logits_follow_the_view():
    """Decoding the un-augmented embedding and moving the logits = the teacher's frame moved to the view."""
    torch.manual_seed(0)
    teacher = SamTeacher("tiny", 32, 2, encoder="cached").eval()
    x0 = smooth_field(4, 3, 32)
    y0 = (x0[:, 0] > 0.5).long()
    x, y, geometry = weak_augment_with_geometry(x0, y0, torch.Generator().manual_seed(0), jitter=0.0)
    dense_on_view = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        batch = Batch(x[:2], y[:2], x[2:], teacher_embeddings=teacher.encode(x0), geometry=geometry)
        got = teacher_forward(teacher, batch, dense_on_view)
        own_frame = teacher.decode(teacher.encode(x0), geometry.invert(dense_on_view))
    torch.testing.assert_close(got, geometry.apply(own_frame))
    torch.testing.assert_close(geometry.invert(got), own_frame)


@pytest.fixture(scope="module")
def cached_teacher_runs(demo_prepared, tmp_path_factory):
    """knowsam and mt+skd trained with a frozen, cached tiny SAM (a checkpoint file, so the teacher is
    not re-drawn per method); returns (params, runs root, embeddings folder, training summaries)."""
    import dataclasses

    from segment_anything.modeling import Sam

    from knowsam.data.splits import split_path, write_split
    from knowsam.embed import embed
    from knowsam.models.sam_teacher import build_sam_parts
    from knowsam.runs import RunId
    from knowsam.train import train_run
    from tests.conftest import small_params

    work = tmp_path_factory.mktemp("cached")
    torch.manual_seed(0)
    torch.save(Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True)).state_dict(), work / "tiny_sam.pth")
    params = small_params(demo_prepared, iterations=3, eval_every=3)
    params = dataclasses.replace(
        params,
        methods=["knowsam", "mt+skd"],
        sam=dataclasses.replace(
            params.sam, encoder="cached", checkpoint=str(work / "tiny_sam.pth"), embeddings_root=str(work / "emb")
        ),
    )
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(params.data.splits_root, "demo", 0.1, 0), 0.1, 0, 0.1)
    meta = embed(params, "demo")
    assert meta["done"] == {"train": 48, "Demo-Kvasir": 6, "Demo-Colon": 6}
    summaries = {
        m: train_run(params, RunId(m, "demo", 0.1, 0), runs_root=work / "runs", progress=False) for m in params.methods
    }
    return params, work, data, summaries


def test_teacher_rows_of_knowsam_and_skd_decode_the_cached_test_embeddings(cached_teacher_runs):
    from knowsam.evaluate import evaluate_group, predict_probs
    from knowsam.runs import RunId, build_method

    params, work, data, _ = cached_teacher_runs
    summaries = evaluate_group(
        params, "demo", 0.1, 0, runs_root=work / "runs", eval_root=work / "eval", metrics_root=work / "metrics"
    )
    cache = embedding_cache.open_cache(
        work / "emb" / "demo",
        {**embedding_cache.identity(data, "tiny", summaries["knowsam"]["provenance"]["sam_weights"]), "bf16": False},
    )
    for name in ("knowsam", "mt+skd"):
        assert set(summaries[name]["variants"]) == {"sam"}
        assert set(summaries[name]["variants"]["sam"]) == {"Demo-Kvasir", "Demo-Colon"}
        run = RunId(name, "demo", 0.1, 0)
        method = build_method(params, run, data, torch.device("cpu"), training=False)
        method.load_eval_state_dict(torch.load(run.train_dir(work / "runs") / "best.pt", weights_only=True)["weights"])
        images = data.images("Demo-Kvasir")
        from_cache = predict_probs(method, images, torch.device("cpu"), variant="sam", embeddings=cache["Demo-Kvasir"])
        live = predict_probs(method, images, torch.device("cpu"), variant="sam")  # the encoder runs on the images
        torch.testing.assert_close(from_cache, live, rtol=0, atol=2e-2)  # fp16 storage of the embeddings
        assert not torch.equal(from_cache, predict_probs(method, images, torch.device("cpu")))  # not the student's


def test_validation_scores_the_teacher_of_every_method_that_has_one(cached_teacher_runs):
    _, _, _, summaries = cached_teacher_runs
    for name in ("knowsam", "mt+skd"):
        record = summaries[name]["final_losses"]
        assert 0.0 <= record["val_dice_sam"] <= 1.0 and "val_dice" in record

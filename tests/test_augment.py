"""The official KnowSAM augmentation: weak for labeled rows, strong for unlabeled rows, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knowsam.data.augment import WeakStrongAugment

SIZE = 64


def _zero_pixels(x: torch.Tensor) -> np.ndarray:
    """Per image, pixels set to 0 in every channel: coarse-dropout holes on a grey image."""
    return (x == 0).all(dim=1).sum(dim=(1, 2)).numpy()


def _changed_level(x: torch.Tensor) -> np.ndarray:
    """Per image, whether brightness/contrast moved the (constant, grey) image's level."""
    level = torch.where(x == 0, torch.nan, x).nanmedian(dim=-1).values.nanmedian(dim=-1).values.mean(dim=1)
    return (level - 0.5).abs().numpy() > 1e-3


def test_labeled_rows_get_weak_and_unlabeled_rows_strong_augmentation():
    # The same grey image in both streams: flips and shifts with reflected borders leave it grey,
    # so only holes (5-8 of 3 px vs 10-20 of 12 px) and brightness/contrast (p 0.2 vs 0.6) show.
    n = 64
    grey = torch.full((n, 3, SIZE, SIZE), 0.5)
    aug = WeakStrongAugment(SIZE)
    x_l, y_l, x_u = aug(
        grey, torch.zeros(n, SIZE, SIZE, dtype=torch.int64), grey.clone(), torch.Generator().manual_seed(0)
    )
    assert x_l.shape == x_u.shape == grey.shape and y_l.shape == (n, SIZE, SIZE) and y_l.dtype == torch.int64
    weak_holes, strong_holes = _zero_pixels(x_l), _zero_pixels(x_u)
    assert weak_holes.max() <= 8 * 3 * 3  # at most 8 holes of 64 // 20 = 3 px
    assert (strong_holes > 8 * 3 * 3).mean() > 0.5  # mostly 10-20 holes of 12 px (p 0.7)
    assert 0.05 < _changed_level(x_l).mean() < 0.4  # brightness/contrast p 0.2
    assert _changed_level(x_u).mean() > 0.45  # p 0.6


def test_labeled_masks_move_with_their_images():
    n = 16
    x = torch.zeros(n, 1, SIZE, SIZE)
    x[:, :, 8:24, 4:20] = 1.0  # an off-centre bright square, its mask below
    y = (x[:, 0] > 0.5).to(torch.int64)
    x_l, y_l, _ = WeakStrongAugment(SIZE)(x, y, x[:0], torch.Generator().manual_seed(1))
    bright = x_l[:, 0] > 0.75
    holes = x_l[:, 0] == 0
    assert not torch.equal(y_l, y)  # flips and shifts moved the squares
    assert (bright == (y_l == 1))[~holes].float().mean() > 0.97  # masks follow (interpolated borders aside)


@pytest.mark.parametrize("n_u", [0, 3])
def test_same_generator_state_same_batch(n_u: int):
    x_l, y_l, x_u = torch.rand(2, 3, SIZE, SIZE), torch.randint(0, 2, (2, SIZE, SIZE)), torch.rand(n_u, 3, SIZE, SIZE)
    aug = WeakStrongAugment(SIZE)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    first = aug(x_l, y_l, x_u, gen)
    second = aug(x_l, y_l, x_u, gen)
    gen.set_state(state)
    again = aug(x_l, y_l, x_u, gen)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], second[0])
    assert first[2].shape == (n_u, 3, SIZE, SIZE)


def test_train_stream_weak_strong_option(demo_prepared):
    from knowsam.data.dataset import PreparedDataset
    from knowsam.data.loader import TrainStream

    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    cases = sorted(data.index("train")["case"].unique())
    split = {"labeled": cases[:4], "unlabeled": cases[4:], "validation": []}
    kwargs = dict(
        label_pool="labeled", uses_unlabeled=True, batch_size=6, labeled_batch=3, seed=0, device=torch.device("cpu")
    )
    stream = TrainStream(data, split, augmentation="weak-strong", **kwargs)
    batch = stream.next_batch()
    assert batch.x_l.shape == batch.x_u.shape == (3, data.in_channels, 32, 32)
    assert batch.y_l.shape == (3, 32, 32) and batch.y_l.dtype == torch.int64
    assert 0 <= batch.x.min() and batch.x.max() <= 1
    state = stream.state_dict()
    following = stream.next_batch()
    stream.load_state_dict(state)
    assert torch.equal(stream.next_batch().x, following.x)  # resumable like the shared augmentation
    with pytest.raises(ValueError, match="weak-strong"):
        TrainStream(data, split, augmentation="strong", **kwargs)

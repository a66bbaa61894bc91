"""Synthetic demo dataset: layout, exact masks, determinism, atomic replacement, difficulty."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from knowsam.data import demo
from knowsam.data.demo import DEMO_CITATION, generate_demo, render_sample
from knowsam.errors import ConfigError, KnowsamError

TEST_SETS = {"Demo-Kvasir": 6, "Demo-Colon": 6}
N_TRAIN = 24


def split_dirs(root: Path) -> dict[str, Path]:
    return {"TrainDataset": root / "TrainDataset", **{name: root / "TestDataset" / name for name in TEST_SETS}}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_pairs(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.asarray(Image.open(jpg)), np.asarray(Image.open(folder / "masks" / f"{jpg.stem}.png")))
        for jpg in sorted((folder / "images").glob("*.jpg"))
    ]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a") / "demo"
    counts = generate_demo(root, seed=0, n_train=N_TRAIN, test_sets=TEST_SETS)
    assert counts == {"TrainDataset": N_TRAIN, **TEST_SETS}
    return root


def test_layout_counts_and_matching_stems(demo_root):
    expected = {"TrainDataset": N_TRAIN, **TEST_SETS}
    for split, folder in split_dirs(demo_root).items():
        images = sorted(p.stem for p in (folder / "images").iterdir())
        masks = sorted(p.stem for p in (folder / "masks").iterdir())
        assert len(images) == expected[split]
        assert images == masks
        assert {p.suffix for p in (folder / "images").iterdir()} == {".jpg"}
        assert {p.suffix for p in (folder / "masks").iterdir()} == {".png"}
    marker = json.loads((demo_root / "demo.json").read_text())
    assert marker["description"] == DEMO_CITATION and marker["counts"]["Demo-Colon"] == 6
    assert not [p for p in demo_root.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_masks_are_binary_and_sizes_vary(demo_root):
    sizes = set()
    for folder in split_dirs(demo_root).values():
        for jpg in (folder / "images").glob("*.jpg"):
            image, mask = Image.open(jpg), Image.open(folder / "masks" / f"{jpg.stem}.png")
            assert image.mode == "RGB" and mask.mode == "L"
            assert image.size == mask.size
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
            sizes.add(image.size)
    assert len(sizes) > 10
    assert all(80 <= w <= 140 and 70 <= h <= 140 and w != h for w, h in sizes)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(demo_root, tmp_path):
    again = generate_demo(tmp_path / "again", seed=0, n_train=N_TRAIN, test_sets=TEST_SETS)
    assert again == {"TrainDataset": N_TRAIN, **TEST_SETS}
    first, second = tree_bytes(demo_root), tree_bytes(tmp_path / "again")
    assert first == second and len(first) == 2 * (N_TRAIN + 12) + 1
    generate_demo(tmp_path / "other", seed=1, n_train=2, test_sets={"Demo-Kvasir": 1})
    other = tree_bytes(tmp_path / "other")
    assert other["TrainDataset/images/train_0000.jpg"] != first["TrainDataset/images/train_0000.jpg"]
    assert (
        other["TestDataset/Demo-Kvasir/images/demo-kvasir_0000.jpg"]
        != first["TestDataset/Demo-Kvasir/images/demo-kvasir_0000.jpg"]
    )


def test_images_do_not_depend_on_how_many_are_requested(demo_root, tmp_path):
    generate_demo(tmp_path / "few", seed=0, n_train=3, test_sets={"Demo-Kvasir": 2, "Demo-Colon": 1})
    few, full = tree_bytes(tmp_path / "few"), tree_bytes(demo_root)
    shared = [name for name in few if name != "demo.json"]
    assert len(shared) == 2 * 6
    assert all(few[name] == full[name] for name in shared)


def test_lesion_count_mix_and_components():
    samples = [render_sample(0, "TrainDataset", i) for i in range(60)]
    counts = np.bincount([s.n_lesions for s in samples], minlength=3)
    assert 2 <= counts[0] <= 12 and counts[1] >= 30 and counts[2] >= 5  # about 10% empty
    for sample in samples:
        assert ndimage.label(sample.mask)[1] == sample.n_lesions  # lesions never touch
        assert sample.mask.shape == sample.image.shape[:2]


def test_written_masks_show_empty_and_two_lesion_frames(demo_root):
    components = [
        ndimage.label(mask > 0)[1] for folder in split_dirs(demo_root).values() for _, mask in read_pairs(folder)
    ]
    assert 0 in components and 2 in components


def test_no_single_channel_threshold_separates_lesions(demo_root):
    """The best global threshold on any one channel, chosen with the answers, stays far from exact."""
    for name in TEST_SETS:
        pairs = read_pairs(demo_root / "TestDataset" / name)
        pixels = np.concatenate([image.reshape(-1, 3) for image, _ in pairs]).astype(np.int16)
        truth = np.concatenate([mask.ravel() > 0 for _, mask in pairs])
        assert 0.05 < truth.mean() < 0.5
        best = 0.0
        for channel in range(3):
            for threshold in range(0, 256, 4):
                above = pixels[:, channel] > threshold
                for predicted in (above, ~above):
                    best = max(best, 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
        assert best < 0.75, (name, best)


def test_lesions_differ_from_their_surroundings():
    """Learnable: inside a lesion the colour departs from the mucosa just outside it."""
    contrasts = []
    for index in range(20):
        sample = render_sample(0, "TrainDataset", index)
        if not sample.mask.any():
            continue
        ring = ndimage.binary_dilation(sample.mask, iterations=4) & ~sample.mask
        inside = sample.image[sample.mask].mean(axis=0)
        outside = sample.image[ring].mean(axis=0)
        contrasts.append(np.abs(inside - outside).max())
    assert np.median(contrasts) > 35


def test_second_test_set_is_shifted_in_colour():
    def mean_green_over_red(split: str, style: demo.DemoStyle) -> float:
        images = [render_sample(0, split, i, style).image.reshape(-1, 3).astype(float) for i in range(12)]
        pixels = np.concatenate(images)
        return float(pixels[:, 1].mean() / pixels[:, 0].mean())

    in_domain = mean_green_over_red("Demo-Kvasir", demo.TRAIN_STYLE)
    shifted = mean_green_over_red("Demo-Kvasir", demo.SHIFTED_STYLE)
    assert shifted > in_domain + 0.02


def test_replaces_an_earlier_demo_but_never_other_data(tmp_path):
    root = tmp_path / "demo"
    generate_demo(root, seed=0, n_train=3, test_sets={"Demo-Kvasir": 1})
    generate_demo(root, seed=0, n_train=1, test_sets={"Other": 1})
    assert sorted(p.name for p in (root / "TrainDataset/images").iterdir()) == ["train_0000.jpg"]
    assert [p.name for p in (root / "TestDataset").iterdir()] == ["Other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(KnowsamError, match="mine"):
        generate_demo(foreign, n_train=1, test_sets={})
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_the_previous_tree(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    generate_demo(root, seed=0, n_train=2, test_sets={"Demo-Kvasir": 1})
    before = tree_bytes(root)
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(args)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return render_sample(*args, **kwargs)

    monkeypatch.setattr(demo, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(root, seed=5, n_train=4, test_sets={"Demo-Kvasir": 1})
    assert tree_bytes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"n_train": -1}, "TrainDataset"),
        ({"test_sets": {"a/b": 2}}, "a/b"),
        ({"test_sets": {"TrainDataset": 2}}, "TrainDataset"),
        ({"seed": -3}, "seed"),
    ],
)
def test_invalid_arguments_are_config_errors(tmp_path, kwargs, culprit):
    with pytest.raises(ConfigError, match=culprit) as error:
        generate_demo(tmp_path / "demo", **kwargs)
    assert error.value.exit_code == 2
    assert not (tmp_path / "demo").exists()

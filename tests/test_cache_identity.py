"""The embedding cache knows the pixels it was made from, and mends a damaged file.

Through the real command line: ``prepare`` then ``embed`` after a training image changed, or after
``data.interpolation`` changed, re-encodes the images (never "0 images" with the old embeddings
decoded), and the cache then equals a fresh encoder pass over the new prepared images; a truncated
cache file is found by ``embed`` and that part embedded again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from knowsam.data.dataset import PreparedDataset
from tests.test_catalogue import cli, one_line, params_dict, write_params  # noqa: F401 (cli is a fixture)

N_TRAIN, N_TEST = 6, 2


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory) -> Path:
    """A SAM checkpoint file of the tiny arch (random weights): a frozen, cached encoder needs a file."""
    from segment_anything.modeling import Sam

    from knowsam.models.sam_teacher import build_sam_parts

    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.manual_seed(0)
    torch.save(Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True)).state_dict(), path)
    return path


@pytest.fixture
def ws(tmp_path, small_raw_for_cache, tiny_sam_file) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(small_raw_for_cache, ws / "data/raw/demo")
    write_params(ws, params_dict(sam={"arch": "tiny", "checkpoint": str(tiny_sam_file), "encoder": "cached"}))
    return ws


@pytest.fixture(scope="module")
def small_raw_for_cache(tmp_path_factory) -> Path:
    from knowsam.data.demo import generate_demo

    root = tmp_path_factory.mktemp("raw") / "demo"
    generate_demo(root, seed=3, n_train=N_TRAIN, test_sets={"Demo-Kvasir": N_TEST})
    return root


def run(cli, ws: Path, capsys, *args: str) -> str:
    """The command's stdout and stderr; it must succeed."""
    from knowsam.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out + err


def embedded_this_call(output: str) -> int:
    return int(re.search(r"this call (\d+) images", output).group(1))


def fresh_encoder_pass(ws: Path, part: str) -> torch.Tensor:
    """The teacher's embeddings of the prepared images, computed here without the cache."""
    from knowsam import validation
    from knowsam.data.dataset import to_float
    from knowsam.methods import MethodContext
    from knowsam.methods.sam_support import build_sam_teacher

    params = validation.load(ws / "params.yaml")
    data = PreparedDataset(ws / "data/prepared/demo")
    ctx = MethodContext(
        in_channels=3,
        num_classes=2,
        image_size=data.image_size,
        iterations=1,
        train=params.train,
        sam=params.sam,
        device=torch.device("cpu"),
        training=False,
    )
    teacher, _ = build_sam_teacher(ctx)
    with torch.no_grad():
        return teacher.eval().encode(torch.from_numpy(to_float(np.asarray(data.images(part)))))


def cached(ws: Path, part: str) -> np.ndarray:
    return np.load(ws / f"data/embeddings/demo/{part}_embeddings.npy")


def test_changed_training_image_is_encoded_again(ws, cli, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    run(cli, ws, capsys, "prepare", "demo")
    run(cli, ws, capsys, "split", "demo")
    assert embedded_this_call(run(cli, ws, capsys, "embed", "demo")) == N_TRAIN + N_TEST
    assert embedded_this_call(run(cli, ws, capsys, "embed", "demo")) == 0  # unchanged: nothing to do
    before = cached(ws, "train")

    frame = sorted((ws / "data/raw/demo/TrainDataset/images").iterdir())[2]
    pixels = np.asarray(Image.open(frame).convert("RGB"))
    Image.fromarray(255 - pixels).save(frame)  # same name, same size, other pixels
    run(cli, ws, capsys, "prepare", "demo")
    one_line(
        *cli(ws, "train", "demo", "--method", "knowsam", "--ratio", "0.1", "--seed", "0", "--no-progress"),
        1,
        r"data/embeddings/demo: embedding cache was made for other prepared images; run `knowsam-bench embed "
        r"demo`",
    )
    assert embedded_this_call(run(cli, ws, capsys, "embed", "demo")) == N_TRAIN + N_TEST
    after = cached(ws, "train")
    assert not np.array_equal(after[2], before[2])  # the changed frame has a new embedding
    np.testing.assert_array_equal(np.delete(after, 2, 0), np.delete(before, 2, 0))  # the others are the same
    torch.testing.assert_close(torch.from_numpy(after).float(), fresh_encoder_pass(ws, "train"), rtol=2e-3, atol=2e-3)


def test_changed_interpolation_is_encoded_again(ws, cli, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    run(cli, ws, capsys, "prepare", "demo")
    run(cli, ws, capsys, "embed", "demo")
    before = cached(ws, "Demo-Kvasir")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["data"]["interpolation"] = "nearest"
    write_params(ws, raw)
    run(cli, ws, capsys, "prepare", "demo")
    assert embedded_this_call(run(cli, ws, capsys, "embed", "demo")) == N_TRAIN + N_TEST
    after = cached(ws, "Demo-Kvasir")
    assert not np.array_equal(after, before)
    torch.testing.assert_close(
        torch.from_numpy(after).float(), fresh_encoder_pass(ws, "Demo-Kvasir"), rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("keep", [0, 100, "half"], ids=["emptied", "header-only", "half"])
def test_truncated_cache_file_is_embedded_again(ws, cli, capsys, monkeypatch, keep):
    monkeypatch.chdir(ws)
    run(cli, ws, capsys, "prepare", "demo")
    run(cli, ws, capsys, "embed", "demo")
    whole = cached(ws, "train")
    path = ws / "data/embeddings/demo/train_embeddings.npy"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2 if keep == "half" else keep)
    output = run(cli, ws, capsys, "embed", "demo")
    warnings = [line for line in output.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "train_embeddings.npy: damaged embedding cache file" in warnings[0], output
    assert embedded_this_call(output) == N_TRAIN  # the damaged part only
    np.testing.assert_array_equal(cached(ws, "train"), whole)
    assert path.stat().st_size == size

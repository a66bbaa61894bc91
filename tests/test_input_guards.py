"""Inputs that used to be dropped, misread or answered with a traceback: each is one line naming the
file (or the right number), through the real command line.

A broken symbolic link among the raw frames; a full disk during ``prepare`` (numpy's own short
write has no errno) and ``embed`` (its cache is allocated after a free-space check, never a SIGBUS);
garbage where a torch checkpoint belongs (torch's several-line ``weights_only`` advice);
``teacher-check`` with an unknown arch, and with a case whose ground truth is empty.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import knowsam.data.dataset
import knowsam.models.embedding_cache
from knowsam.data.demo import generate_demo
from tests.test_catalogue import (  # noqa: F401 (cli, raw_ws, small_raw, train_ws, train_ws_base are fixtures)
    EVAL,
    RUN,
    RUN_DIR,
    assert_nothing_prepared,
    cli,
    mask_of,
    one_line,
    params_dict,
    raw_ws,
    small_raw,
    train_images,
    train_ws,
    train_ws_base,
    write_params,
)

REAL_OPEN = open


# --- a broken symbolic link among the raw frames --------------------------------------------------


@pytest.mark.parametrize("where", ["train image", "test image", "train mask"])
def test_broken_symlink_among_raw_frames(raw_ws, cli, where):
    raw = raw_ws / "data/raw/demo"
    if where == "test image":
        victim = sorted((raw / "TestDataset/Demo-Kvasir/images").iterdir())[0]
    elif where == "train mask":
        victim = mask_of(train_images(raw_ws)[1])
    else:
        victim = train_images(raw_ws)[1]
    victim.unlink()
    victim.symlink_to(raw_ws / "moved-away.png")
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        rf"{victim.name}: broken symbolic link \(to '\S+moved-away.png', which does not exist\); "
        "restore its target or remove the link",
    )
    assert_nothing_prepared(raw_ws)


# --- disk full during prepare -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 128])
def test_prepare_on_a_full_disk(raw_ws, cli, monkeypatch, size):
    """Every array is written to /dev/full, whose writes fail with the kernel's real ENOSPC."""

    def full_device(file, mode="r", *args, **kwargs):
        return REAL_OPEN("/dev/full" if "w" in mode else file, mode, *args, **kwargs)

    monkeypatch.setattr(knowsam.data.dataset, "open", full_device, raising=False)
    raw = params_dict()
    raw["data"]["image_size"] = size
    write_params(raw_ws, raw)
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        r"train_images.npy: no space left on device \(\d+ MB free in \S+\); free some space and rerun",
    )
    assert_nothing_prepared(raw_ws)


@pytest.mark.parametrize("images", [4, 64, 1024])
def test_array_writes_keep_the_error_number(tmp_path, images):
    """A write that stops after the header, as on a disk that fills during an array: the OSError keeps the
    kernel's errno (EFBIG here, under a file-size limit; ENOSPC on a full disk), which the disk-full check
    reads. numpy's ``tofile`` would raise "<n> requested and <m> written" without one."""
    import resource
    import signal

    from knowsam.data.dataset import write_npy

    array = np.ones((images, 3, 32, 32), np.uint8)
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))  # the header fits, the pixels do not
    try:
        with pytest.raises(OSError) as info:
            write_npy(tmp_path / "images.npy", array)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []  # no temporary file left


class Disk:
    """A disk with ``free`` bytes left: writes past them fail with ENOSPC, as the OS's own do."""

    def __init__(self, free: float):
        self.free, self.written = free, 0

    def take(self, n: int) -> None:
        if self.written + n > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += n


class FileOnDisk:
    def __init__(self, fh, disk: Disk):
        self._fh, self._disk = fh, disk

    def write(self, data) -> int:
        self._disk.take(memoryview(data).nbytes)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def on_disk(monkeypatch, disk: Disk) -> None:
    """Every file ``prepare`` writes (arrays, compressed masks, tables, JSON) goes through ``disk``."""

    def open_on_disk(file, mode="r", *args, **kwargs):
        fh = REAL_OPEN(file, mode, *args, **kwargs)
        return FileOnDisk(fh, disk) if "w" in mode else fh

    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        disk.take(len(data))
        return real_write_bytes(self, data)

    monkeypatch.setattr(knowsam.data.dataset, "open", open_on_disk, raising=False)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_prepare_runs_out_of_space_at_any_point(raw_ws, cli, monkeypatch):
    measured = Disk(float("inf"))
    with monkeypatch.context() as patch:
        on_disk(patch, measured)
        code, err = cli(raw_ws, "prepare", "demo")
    assert code == 0, err
    total = measured.written
    shutil.rmtree(raw_ws / "data/prepared")
    shutil.rmtree(raw_ws / "reports")
    for free in (0, 100, 5000, total // 3, total // 2, total - 10):
        on_disk(monkeypatch, Disk(free))
        one_line(
            *cli(raw_ws, "prepare", "demo"),
            1,
            r": no space left on device \(\d+ MB free in \S+\); "
            "free some space and rerun",
        )
        assert_nothing_prepared(raw_ws)


# --- disk full during embed -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory) -> Path:
    from segment_anything.modeling import Sam

    from knowsam.models.sam_teacher import build_sam_parts

    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.manual_seed(0)
    torch.save(Sam(*build_sam_parts("tiny", 1024, use_rel_pos=True)).state_dict(), path)
    return path


@pytest.fixture
def embed_ws(raw_ws, cli, tiny_sam_file) -> Path:
    write_params(raw_ws, params_dict(sam={"arch": "tiny", "checkpoint": str(tiny_sam_file), "encoder": "cached"}))
    code, err = cli(raw_ws, "prepare", "demo")
    assert code == 0, err
    return raw_ws


def cache_files(ws: Path) -> list[Path]:
    return sorted((ws / "data/embeddings/demo").glob("*_embeddings.npy"))


def test_embed_checks_free_space_before_writing(embed_ws, cli, monkeypatch):
    monkeypatch.setattr(knowsam.models.embedding_cache.shutil, "disk_usage", lambda _p: SimpleNamespace(free=1000))
    one_line(
        *cli(embed_ws, "embed", "demo"),
        1,
        r"data/embeddings/demo: the embedding cache needs 1 MB, 0 MB free on its disk; free some space",
    )
    assert cache_files(embed_ws) == []


def test_embed_allocation_on_a_full_disk(embed_ws, cli, monkeypatch):
    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    one_line(
        *cli(embed_ws, "embed", "demo"),
        1,
        r"data/embeddings/demo/train_embeddings.npy: no space left on device \(\d+ MB free in "
        r"data/embeddings/demo\); free some space and rerun",
    )


def test_embed_writing_rows_on_a_full_disk(embed_ws, cli, monkeypatch):
    def open_full(file, mode="r", *args, **kwargs):
        fh = REAL_OPEN(file, mode, *args, **kwargs)
        return FileOnDisk(fh, Disk(0)) if mode == "r+b" else fh

    monkeypatch.setattr(knowsam.models.embedding_cache, "open", open_full, raising=False)
    one_line(
        *cli(embed_ws, "embed", "demo"),
        1,
        r"train_embeddings.npy: no space left on device \(\d+ MB free in \S+\); free some space and rerun",
    )
    monkeypatch.undo()
    code, err = cli(embed_ws, "embed", "demo")  # space again: the same command completes the cache
    assert code == 0, err


def test_embed_cache_files_are_allocated_not_sparse(embed_ws, cli):
    """Every block of a cache file exists before a row is written: a memory map of it never meets a full disk."""
    code, err = cli(embed_ws, "embed", "demo")
    assert code == 0, err
    for path in cache_files(embed_ws):
        st = path.stat()
        assert st.st_blocks * 512 >= st.st_size, path
        assert np.load(path, mmap_mode="r").any()  # rows written


# --- garbage where a torch checkpoint belongs -------------------------------------------------------


def garbage_pickle(path: Path) -> Path:
    """A real pickle that ``torch.load(weights_only=True)`` refuses with its several-line advice."""
    torch.save(argparse.Namespace(x=1), path)
    return path


@pytest.mark.parametrize("kind", ["bytes", "pickle"])
def test_garbage_sam_checkpoint_in_train(train_ws, cli, kind):
    path = train_ws / "weights.pth"
    if kind == "bytes":
        path.write_bytes(b"not a checkpoint at all")
    else:
        garbage_pickle(path)
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["sam"]["checkpoint"] = str(path)
    write_params(train_ws, raw)
    one_line(
        *cli(train_ws, "train", "demo", "--method", "knowsam", *RUN[3:], "--no-progress"),
        1,
        r"^error: SAM checkpoint \S+weights.pth: not a torch checkpoint or unreadable \(UnpicklingError\)$",
    )
    assert not (train_ws / "data/runs/demo/ratio-0.1_seed-0/knowsam").exists()


def test_garbage_sam_checkpoint_in_teacher_check(raw_ws, cli):
    path = garbage_pickle(raw_ws / "weights.pth")
    one_line(
        *cli(raw_ws, "teacher-check", "demo", "--arch", "tiny", "--checkpoint", str(path)),
        1,
        r"^error: SAM checkpoint \S+weights.pth: not a torch checkpoint or unreadable \(UnpicklingError\)$",
    )


@pytest.mark.parametrize("garbage", ["pickle", "tensor"])
def test_garbage_run_checkpoint_on_resume(train_ws, cli, capsys, garbage):
    """The newest checkpoint unreadable: one warning naming it, and the run resumes from the previous one
    to exactly the result it had."""
    run = train_ws / RUN_DIR
    finished = json.loads((run / "train_log.json").read_text())["summary"]
    if garbage == "pickle":
        garbage_pickle(run / "checkpoint.pt")
    else:
        torch.save(torch.zeros(3), run / "checkpoint.pt")
    code, err = cli(train_ws, "train", *RUN, "--no-progress")
    assert code == 0, err
    lines = err.strip().splitlines()
    kind = "UnpicklingError" if garbage == "pickle" else "TypeError"
    assert lines == [
        f"warning: {run.relative_to(train_ws)}/checkpoint.pt: unreadable checkpoint ({kind}); trying an older one"
    ], err
    resumed = json.loads((run / "train_log.json").read_text())["summary"]
    for key in ("iterations", "best_step", "best_val_dice", "final_losses"):
        assert resumed[key] == finished[key], key


def test_garbage_best_weights_in_evaluate(train_ws, cli):
    garbage_pickle(train_ws / RUN_DIR / "best.pt")
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        r"best.pt: unreadable or not this method's weights \(UnpicklingError\); re-run the train stage",
    )


# --- teacher-check ------------------------------------------------------------------------------------


def test_teacher_check_unknown_arch_is_named_before_the_checkpoint(raw_ws, cli):
    """params say sam.checkpoint none, which alone would be refused: the arch is the first thing wrong."""
    one_line(
        *cli(raw_ws, "teacher-check", "demo", "--arch", "vit_q"),
        2,
        r"^error: --arch 'vit_q' is not a SAM arch; known: vit_b, vit_l, vit_h, tiny, lite_medsam$",
    )


def test_teacher_check_unknown_prompt_is_named_before_any_weights(raw_ws, cli):
    one_line(
        *cli(raw_ws, "teacher-check", "demo", "--prompt", "boxes"),
        2,
        r"^error: --prompt 'boxes': use one of box, none$",
    )


@pytest.fixture
def empty_truth_raw(tmp_path) -> tuple[Path, Path, list[Path]]:
    """Two raw demo folders: four test cases, the last given an empty ground truth (the demo may draw more
    empty ones); and the same without the cases whose ground truth is empty. Returns those cases' frames."""
    from knowsam.data.frames import read_mask

    with_empty = tmp_path / "with-empty"
    generate_demo(with_empty, seed=2, n_train=2, test_sets={"Demo-Kvasir": 4})
    images = sorted((with_empty / "TestDataset/Demo-Kvasir/images").iterdir())
    mask = mask_of(images[-1])
    Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    empty = [image for image in images if not read_mask(mask_of(image)).any()]
    assert 1 <= len(empty) < len(images)
    without = tmp_path / "without"
    shutil.copytree(with_empty, without)
    for image in empty:
        mask_of(without / "TestDataset/Demo-Kvasir/images" / image.name).unlink()
        (without / "TestDataset/Demo-Kvasir/images" / image.name).unlink()
    return with_empty, without, empty


def teacher_check_json(capsys, raw: Path, sam: Path) -> dict:
    from knowsam.cli import main

    capsys.readouterr()
    code = main(
        [
            "teacher-check",
            "demo",
            "--raw",
            str(raw),
            "--arch",
            "tiny",
            "--checkpoint",
            str(sam),
            "--prompt",
            "box",
            "--prompt",
            "none",
            "--format",
            "json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["scores"]


def test_teacher_check_box_prompt_leaves_out_an_empty_ground_truth(
    tmp_path, capsys, monkeypatch, empty_truth_raw, tiny_sam_file
):
    from knowsam.data.frames import read_image, resize_image
    from knowsam.metrics import binary_metrics
    from knowsam.teacher_check import pretrained_teacher

    with_empty, without, empty = empty_truth_raw
    n_all = len(list((with_empty / "TestDataset/Demo-Kvasir/images").iterdir()))
    n_scored = n_all - len(empty)
    ws = tmp_path / "ws"
    write_params(ws, params_dict())
    monkeypatch.chdir(ws)
    scores = teacher_check_json(capsys, with_empty, tiny_sam_file)
    reference = teacher_check_json(capsys, without, tiny_sam_file)
    box, none = scores["box"]["Demo-Kvasir"], scores["none"]["Demo-Kvasir"]
    # box: a case without ground truth has no box to give; it is named, and the score is that of the others
    assert box["n"] == n_scored and box["excluded"] == [image.stem for image in empty]
    assert box["mDice"] == reference["box"]["Demo-Kvasir"]["mDice"]
    # none: every case is scored, an empty ground truth by the empty-mask policy (1 when nothing is predicted)
    teacher, _ = pretrained_teacher("tiny", str(tiny_sam_file), "unused", SimpleNamespace(threads=0, device="cpu"))
    empty_dice = []
    for image in empty:
        pixels = torch.from_numpy(resize_image(read_image(image), 256, "bilinear"))[None].float() / 255
        with torch.no_grad():
            predicted = (
                teacher.decode_boxes(
                    teacher.encode(pixels), torch.tensor([[0.0, 0.0, 255.0, 255.0]]), torch.tensor([0])
                )
                > 0
            ).numpy()[0]
        empty_dice.append(binary_metrics(predicted, np.zeros((256, 256), bool))["dice"])
        assert empty_dice[-1] == (0.0 if predicted.any() else 1.0)
    assert none["n"] == n_all and none["excluded"] == []
    assert none["mDice"] == pytest.approx(
        (reference["none"]["Demo-Kvasir"]["mDice"] * n_scored + sum(empty_dice)) / n_all
    )

    capsys.readouterr()
    from knowsam.cli import main

    assert (
        main(
            [
                "teacher-check",
                "demo",
                "--raw",
                str(with_empty),
                "--arch",
                "tiny",
                "--checkpoint",
                str(tiny_sam_file),
                "--prompt",
                "box",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        f"--prompt box  Demo-Kvasir: mDice {box['mDice']:.4f} (n={n_scored}); {len(empty)} excluded, an empty "
        f"ground truth gives no box: {', '.join(image.stem for image in empty)}"
    ) in out, out

"""The error catalogue (docs/errors.md): every bad input gives one line on stderr naming the
culprit, a non-zero exit status, and leaves no half-written output behind.

Most cases drive the real command line (``knowsam.cli.main``) from a workspace folder, the
way a user or DVC stage runs it; a few library-level guards (archives, SAM checkpoint
checksums) are called directly and checked for the same one-line ``KnowsamError``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from knowsam.errors import KnowsamError
from knowsam.runs import RunId
from tests.conftest import REPO

RUN = ["demo", "--method", "labeled-only", "--ratio", "0.1", "--seed", "0"]
EVAL = ["demo", "--ratio", "0.1", "--seed", "0", "--methods", "labeled-only"]
RUN_DIR = Path("data/runs/demo/ratio-0.1_seed-0/labeled-only")


# --- helpers ----------------------------------------------------------------------------------


def params_dict(prepared_root: str = "data/prepared", **sections) -> dict:
    raw = yaml.safe_load((REPO / "knowsam/profiles/demo.yaml").read_text())
    raw["methods"] = ["labeled-only", "knowsam"]
    raw["data"].update(prepared_root=prepared_root, image_size=32)
    raw["train"].update(iterations=2, batch_size=4, labeled_batch=2, eval_every=1, checkpoint_every=1, threads=1)
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw


def write_params(ws: Path, raw: dict | str) -> Path:
    ws.mkdir(parents=True, exist_ok=True)
    path = ws / "params.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden temporaries included) with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the CLI in a workspace; return (exit status, stderr)."""
    from knowsam.cli import main

    def run(ws: Path, *args: str) -> tuple[int, str]:
        monkeypatch.chdir(ws)
        monkeypatch.delenv("KNOWSAM_MIRROR", raising=False)
        capsys.readouterr()
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


def one_line(code: int, err: str, status: int, pattern: str) -> str:
    """The promise: exit ``status``, exactly one stderr line, ``error: ...`` matching ``pattern``."""
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def library_error(fn, pattern: str, status: int = 1) -> str:
    with pytest.raises(KnowsamError) as info:
        fn()
    message = str(info.value)
    assert info.value.exit_code == status
    assert "\n" not in message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory) -> Path:
    """A raw demo dataset of 6 training and 2 test images."""
    from knowsam.data.demo import generate_demo

    root = tmp_path_factory.mktemp("raw") / "demo"
    generate_demo(root, seed=1, n_train=6, test_sets={"Demo-Kvasir": 2})
    return root


@pytest.fixture
def raw_ws(tmp_path, small_raw) -> Path:
    """A workspace with its own copy of the raw data, ready for `prepare demo`."""
    ws = tmp_path / "ws"
    shutil.copytree(small_raw, ws / "data/raw/demo")
    write_params(ws, params_dict())
    return ws


def train_images(ws: Path) -> list[Path]:
    return sorted((ws / "data/raw/demo/TrainDataset/images").iterdir())


def mask_of(image: Path) -> Path:
    return next((image.parent.parent / "masks").glob(image.stem + ".*"))


def assert_nothing_prepared(ws: Path) -> None:
    prepared = ws / "data/prepared"
    assert not (prepared / "demo").exists()
    assert not prepared.exists() or not any(prepared.iterdir()), list(prepared.iterdir())
    assert not (ws / "reports/fingerprints/demo.json").exists()


@pytest.fixture(scope="module")
def train_ws_base(demo_prepared, tmp_path_factory) -> Path:
    """Workspace using the shared prepared demo data, with a split and a trained 2-iteration run."""
    from knowsam import validation
    from knowsam.data.dataset import PreparedDataset
    from knowsam.data.splits import split_path, write_split
    from knowsam.runs import RunId
    from knowsam.train import train_run

    ws = tmp_path_factory.mktemp("trained")
    write_params(ws, params_dict(prepared_root=str(demo_prepared / "data/prepared")))
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(ws / "data/splits", "demo", 0.1, 0), 0.1, 0, 0.1)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        train_run(validation.load("params.yaml"), RunId("labeled-only", "demo", 0.1, 0), progress=False)
    finally:
        os.chdir(cwd)
    return ws


@pytest.fixture
def train_ws(train_ws_base, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(train_ws_base, ws)
    return ws


def own_prepared(ws: Path, demo_prepared: Path) -> Path:
    """Give ``ws`` its own copy of the prepared data (for cases that damage it)."""
    prepared = ws / "data/prepared/demo"
    shutil.copytree(demo_prepared / "data/prepared/demo", prepared)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["data"]["prepared_root"] = "data/prepared"
    write_params(ws, raw)
    return prepared


# --- raw data (prepare) -------------------------------------------------------------------------


def test_corrupt_image(raw_ws, cli):
    train_images(raw_ws)[2].write_bytes(b"this is not an image at all" * 10)
    one_line(*cli(raw_ws, "prepare", "demo"), 1, r"TrainDataset/images/\S+: unreadable image \(")
    assert_nothing_prepared(raw_ws)


def test_truncated_image(raw_ws, cli):
    image = train_images(raw_ws)[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    one_line(*cli(raw_ws, "prepare", "demo"), 1, rf"{re.escape(image.name)}: unreadable image \(")
    assert_nothing_prepared(raw_ws)


def test_mask_size_differs_from_image(raw_ws, cli):
    mask = mask_of(train_images(raw_ws)[1])
    Image.open(mask).resize((17, 13)).save(mask)
    one_line(
        *cli(raw_ws, "prepare", "demo"), 1, rf"masks/{re.escape(mask.name)}: mask size 17x13 differs from its image's"
    )
    assert_nothing_prepared(raw_ws)


def test_missing_mask(raw_ws, cli):
    image = train_images(raw_ws)[3]
    mask_of(image).unlink()
    one_line(
        *cli(raw_ws, "prepare", "demo"), 1, rf"{re.escape(image.name)}: no mask named {image.stem} or p{image.stem}"
    )
    assert_nothing_prepared(raw_ws)


def test_nonbinary_mask_is_binarised_and_reported(raw_ws, cli):
    """Not an error: grey values are thresholded at > 127 and counted in the fingerprint."""
    mask = mask_of(train_images(raw_ws)[0])
    grey = np.asarray(Image.open(mask).convert("L")).copy()
    grey[:4, :4] = 100  # below the threshold: background
    grey[-4:, -4:] = 200  # above: foreground
    Image.fromarray(grey).save(mask)
    code, err = cli(raw_ws, "prepare", "demo")
    assert code == 0, err
    fingerprint = json.loads((raw_ws / "reports/fingerprints/demo.json").read_text())
    assert fingerprint["train"]["nonbinary_masks"] == 1


def test_empty_raw_dataset_folder(raw_ws, cli):
    shutil.rmtree(raw_ws / "data/raw/demo")
    (raw_ws / "data/raw/demo").mkdir()
    one_line(*cli(raw_ws, "prepare", "demo"), 1, r"data/raw/demo: raw dataset folder is empty")
    assert_nothing_prepared(raw_ws)


def test_raw_dataset_without_test_folder(raw_ws, cli):
    shutil.rmtree(raw_ws / "data/raw/demo/TestDataset")
    one_line(*cli(raw_ws, "prepare", "demo"), 1, r"data/raw/demo/TestDataset: folder not found")
    assert_nothing_prepared(raw_ws)


def test_file_name_not_utf8(raw_ws, cli):
    image = train_images(raw_ws)[0]
    bad = os.fsdecode(b"frame-\xff\xfe" + image.suffix.encode())
    os.rename(image, image.with_name(bad))
    os.rename(mask_of(image), mask_of(image).with_name(bad))
    line = one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        r"TrainDataset/images: file name b'frame-\\xff\\xfe\.\w+' is not valid UTF-8",
    )
    assert "\\udc" not in line
    assert_nothing_prepared(raw_ws)


def test_unreadable_file(raw_ws, cli):
    image = train_images(raw_ws)[0]
    image.chmod(0)
    try:
        if os.access(image, os.R_OK):
            pytest.skip("running as a user that reads files despite mode 000 (root)")
        one_line(*cli(raw_ws, "prepare", "demo"), 1, rf"{re.escape(image.name)}: unreadable image \(PermissionError")
        assert_nothing_prepared(raw_ws)
    finally:
        image.chmod(0o644)


def test_unknown_dataset_name(raw_ws, cli):
    one_line(*cli(raw_ws, "prepare", "nosuch"), 2, r"unknown dataset 'nosuch'; known: .*demo")
    assert_nothing_prepared(raw_ws)


def test_duplicate_frame_stems(raw_ws, cli):
    image = train_images(raw_ws)[0]
    twin = image.with_suffix(".jpeg")
    shutil.copy(image, twin)
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        rf"TrainDataset/images: {twin.name} and {image.name} share the stem '{image.stem}'; keep one of them",
    )
    assert_nothing_prepared(raw_ws)


def test_file_in_no_image_format(raw_ws, cli):
    masks = mask_of(train_images(raw_ws)[0]).parent
    (masks / "notes.txt").write_text("annotator's notes")
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        r"TrainDataset/masks: 1 file\(s\) in no image format this version reads: notes.txt; convert or remove them",
    )
    assert_nothing_prepared(raw_ws)


def test_masks_that_mostly_decode_empty(raw_ws, cli):
    """Masks whose foreground value is neither 1 nor above 127 read as empty: refused, not scored 100."""
    for image in train_images(raw_ws):
        mask = mask_of(image)
        grey = np.asarray(Image.open(mask).convert("L"))
        Image.fromarray((grey > 127).astype(np.uint8) * 60).save(mask)
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        r"TrainDataset/masks: [4-6] of 6 masks decode empty \(e.g. \S+.png: mode L, values 0(, 60)?\); "
        r"a misread mask encoding\? See 'Mask encodings' in docs/datasets.md",
    )
    assert_nothing_prepared(raw_ws)


def test_frame_above_the_decompression_bomb_limit(raw_ws, cli, monkeypatch):
    width, height = Image.open(train_images(raw_ws)[0]).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", width * height // 3)  # every frame is over twice the limit
    one_line(
        *cli(raw_ws, "prepare", "demo"),
        1,
        r"TrainDataset/images/\S+.jpg: unreadable image \(DecompressionBombError: Image size \(\d+ pixels\) exceeds",
    )
    assert_nothing_prepared(raw_ws)


def _acdc_ws(tmp_path: Path) -> Path:
    from tests.test_prepare_real import write_acdc

    ws = tmp_path / "ws"
    write_acdc(ws / "data/raw/acdc")
    write_params(ws, params_dict())
    return ws


def _h5_slice(ws: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    import h5py

    path = ws / "data/raw/acdc/data/patient001_frame01_slice_2.h5"
    with h5py.File(path, "r") as h5:
        return path, h5["image"][()], h5["label"][()]


def test_h5_image_that_is_a_group(tmp_path, cli):
    import h5py

    ws = _acdc_ws(tmp_path)
    path, image, label = _h5_slice(ws)
    with h5py.File(path, "w") as h5:
        h5.create_group("image").create_dataset("slice", data=image)
        h5.create_dataset("label", data=label)
    one_line(
        *cli(ws, "prepare", "acdc"),
        1,
        r"patient001_frame01_slice_2.h5: 'image' in this h5 file is a group, not an array",
    )
    assert not (ws / "data/prepared").exists()


def test_h5_training_slice_that_is_not_2d(tmp_path, cli):
    from tests.test_prepare_real import _h5

    ws = _acdc_ws(tmp_path)
    path, image, label = _h5_slice(ws)
    _h5(path, np.stack([image, image], axis=-1), np.stack([label, label], axis=-1))
    one_line(
        *cli(ws, "prepare", "acdc"),
        1,
        r"patient001_frame01_slice_2.h5: expected a 2D training slice, got image shape \(40, 36, 2\)",
    )
    assert not (ws / "data/prepared").exists()


def test_masks_in_every_encoding_frames_in_any_format_prepare_alike(raw_ws, tmp_path, cli):
    """Not errors: {0, 1}, 16-bit, palette, colour and alpha masks; .webp/.jfif frames; EXIF-rotated pairs;
    macOS ._ files. Each gives exactly the arrays of the plain {0, 255} PNG masks and JPEG frames."""
    plain = tmp_path / "plain"
    shutil.copytree(raw_ws, plain)
    assert cli(plain, "prepare", "demo")[0] == 0
    images = train_images(raw_ws)
    masks = [mask_of(image) for image in images]
    binary = [np.asarray(Image.open(m).convert("L")) > 127 for m in masks]
    encodings = [
        Image.fromarray(binary[0].astype(np.uint8)),  # {0, 1}
        Image.fromarray(binary[1].astype(np.uint16)),  # 16-bit {0, 1}
        Image.fromarray(binary[2].astype(np.uint8), mode="P"),  # palette, index 1 = (128, 0, 0)
        Image.fromarray(np.dstack([binary[3] * 255, 0 * binary[3], 0 * binary[3]]).astype(np.uint8)),  # red
        Image.fromarray(np.dstack([0 * binary[4]] * 3 + [binary[4] * 255]).astype(np.uint8)),  # alpha only
    ]
    encodings[2].putpalette([0, 0, 0, 128, 0, 0])
    for mask, encoded in zip(masks, encodings):
        encoded.save(mask)
    Image.open(images[0]).save(images[0].with_suffix(".webp"), lossless=True)
    images[0].unlink()
    images[1].rename(images[1].with_suffix(".jfif"))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored turned 90 degrees counter-clockwise, shown upright
    frame = np.asarray(Image.open(images[5]))
    Image.fromarray(np.rot90(frame).copy()).save(images[5].with_suffix(".png"), exif=exif.tobytes())
    images[5].unlink()
    Image.fromarray(np.rot90(binary[5]).astype(np.uint8) * 255).save(masks[5], exif=exif.tobytes())
    for folder in (images[0].parent, masks[0].parent):
        (folder / f"._{images[2].stem}.png").write_bytes(b"\0\5\26\7 resource fork")
        (folder / ".DS_Store").write_bytes(b"Bud1")
    (raw_ws / "data/raw/demo/TestDataset/.Trashes").mkdir()  # not a test set
    assert cli(raw_ws, "prepare", "demo")[0] == 0
    prepared, expected = raw_ws / "data/prepared/demo", plain / "data/prepared/demo"
    for name in ("train_masks.npy", "train_images.npy"):
        np.testing.assert_array_equal(np.load(prepared / name), np.load(expected / name), err_msg=name)
    assert json.loads((prepared / "fingerprint.json").read_text())["train"]["nonbinary_masks"] == 0


# --- params -------------------------------------------------------------------------------------

PARAMS_CASES = {
    "unknown dataset": (dict(datasets=["demo", "kvasir2"]), r"'datasets\[1\]' unknown dataset 'kvasir2'"),
    "unknown method": (dict(methods=["labeled-only", "knowsam++"]), r"'methods\[1\]' unknown method 'knowsam\+\+'"),
    "ratio 0": (dict(ratios=[0]), r"'ratios\[0\]' = 0.0 must be in \(0, 1\]"),
    "ratio above 1": (dict(ratios=[0.1, 1.5]), r"'ratios\[1\]' = 1.5 must be in \(0, 1\]"),
    "empty seed list": (dict(seeds=[]), r"'seeds' is empty; list at least one"),
    "seed beyond numpy's range": (dict(seeds=[0, 2**32]), r"'seeds\[1\]' = 4294967296 must be in \[0, 2\*\*32\)"),
    "image size SAM cannot patch": (
        dict(data={"image_size": 40}),
        r"'data.image_size' = 40 must be a positive multiple of 16",
    ),
    "labeled batch larger than batch": (
        dict(train={"batch_size": 4, "labeled_batch": 6}),
        r"'train.labeled_batch' = 6 must be in \[1, train.batch_size = 4\]",
    ),
    "wrong type": (dict(train={"iterations": "ten"}), r"'train.iterations' must be int, got 'ten'"),
    "bool for int": (dict(train={"iterations": True}), r"'train.iterations' must be int, got True"),
    "unknown key": (dict(train={"iteratons": 5}), r"unknown key 'train.iteratons'"),
    "unknown method option": (
        dict(method_params={"knowsam": {"no_such_option": 1}}),
        r"unknown key 'method_params.knowsam.no_such_option'",
    ),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_params(tmp_path, cli, case):
    overrides, pattern = PARAMS_CASES[case]
    ws = tmp_path / "ws"
    write_params(ws, params_dict(**overrides))
    one_line(*cli(ws, "split", "demo"), 2, r"^error: params: " + pattern)
    assert not (ws / "data").exists()


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("datasets: [demo\nmethods: x\n", r"params.yaml: not valid YAML \("),
        ("- a\n- list\n", r"params.yaml: expected a mapping at the top level"),
        (b"\xff\xfe binary".decode("latin-1"), r"params.yaml: not valid YAML"),
    ],
    ids=["not-yaml", "not-a-mapping", "not-utf8"],
)
def test_params_file_not_yaml(tmp_path, cli, text, pattern):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_bytes(text.encode("latin-1"))
    one_line(*cli(ws, "split", "demo"), 2, pattern)
    assert not (ws / "data").exists()


def test_missing_params_file(tmp_path, cli):
    one_line(*cli(tmp_path, "train", *RUN, "--params", "nope.yaml"), 2, r"nope.yaml: params file not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["compare", "--methods", "ucmt,knowsam", "--format", "csv"], r"Invalid value for '--format'.*'table', 'md'"),
        (["train", *RUN[:3], "--ratio", "ten", "--seed", "0"], r"Invalid value for '--ratio'"),
        (["train", "demo", "--ratio", "0.1"], r"Missing option '--method'"),
        (["no-such-command"], r"No such command 'no-such-command'"),
        (["methods", "--json"], r"No such option: --json"),
        (["plan", "--format", "md"], r"Invalid value for '--format'.*'table', 'json'"),
    ],
    ids=["bad-choice", "not-a-number", "missing-option", "unknown-command", "unknown-option", "bad-format"],
)
def test_usage_errors_are_one_line_with_status_2(tmp_path, cli, argv, pattern):
    one_line(*cli(tmp_path, *argv), 2, pattern)
    assert list(tmp_path.iterdir()) == []


def test_verbose_and_quiet_exclude_each_other(tmp_path, cli):
    one_line(*cli(tmp_path, "-v", "-q", "methods"), 2, r"^error: give at most one of --verbose and --quiet$")


def test_verbose_training_says_one_line_per_validation(train_ws, cli, capsys):
    from knowsam.cli import main

    shutil.rmtree(train_ws / RUN_DIR)
    monkey_cwd = os.getcwd()
    os.chdir(train_ws)
    try:
        capsys.readouterr()
        assert main(["-v", "train", *RUN, "--no-progress"]) == 0
        out = capsys.readouterr()
    finally:
        os.chdir(monkey_cwd)
    lines = out.err.strip().splitlines()
    # eval_every 1, 2 iterations: two validations, each with its Dice, the best so far and the time left
    assert [re.sub(r"[\d.]+", "N", line.split(", loss")[0].split(" (best")[0]) for line in lines] == [
        "labeled-only-demo-N-N: step N/N, validation Dice N",
    ] * 2, out.err
    assert lines[0].startswith("labeled-only-demo-0.1-0: step 1/2") and lines[1].endswith("0 min left")
    assert "best validation Dice" in out.out  # the result line stays on stdout


def test_shell_completion_completes_commands_choices_and_names(tmp_path):
    env = {**os.environ, "_KNOWSAM_BENCH_COMPLETE": "complete_bash"}
    for words, cword, expected in (
        ("knowsam-bench comp", 1, ["compare"]),
        ("knowsam-bench compare --format ", 3, ["table", "md", "json"]),
        ("knowsam-bench plan --format ", 3, ["table", "json"]),
        ("knowsam-bench train p", 2, ["polyp", "promise12"]),
        ("knowsam-bench train demo --method ucmt", 4, ["ucmt", "ucmt+skd"]),
        ("knowsam-bench compare --methods ucmt,kno", 3, ["ucmt,knowsam"]),
        ("knowsam-bench describe cps a", 3, ["acdc"]),
        ("knowsam-bench profile ", 2, ["cpu", "demo", "paper"]),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "knowsam"],
            env={**env, "COMP_WORDS": words, "COMP_CWORD": str(cword)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and done.stdout.split() == expected, done.stderr


def test_unknown_profile(tmp_path, cli):
    before = write_params(tmp_path, params_dict()).read_bytes()
    one_line(*cli(tmp_path, "profile", "turbo"), 2, r"unknown profile 'turbo'; known: .*demo")
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_method_not_in_params(train_ws, cli):
    one_line(
        *cli(train_ws, "train", "demo", "--method", "cps", *RUN[3:]), 2, r"method 'cps' is not in params 'methods'"
    )


def test_dataset_not_in_params(train_ws, cli):
    one_line(
        *cli(train_ws, "train", "acdc", "--method", "labeled-only", *RUN[3:]),
        2,
        r"dataset 'acdc' is not in params 'datasets'",
    )


@pytest.mark.parametrize(
    "flag, value, pattern",
    [
        ("--ratio", "0", r"--ratio 0 must be in \(0, 1\]"),
        ("--ratio", "1.5", r"--ratio 1.5 must be in \(0, 1\]"),
        ("--seed", "-1", r"--seed -1 must be in \[0, 2\*\*32\)"),
        ("--seed", str(2**32), r"--seed 4294967296 must be in \[0, 2\*\*32\)"),
    ],
)
def test_split_command_ratio_and_seed(train_ws, cli, flag, value, pattern):
    before = tree(train_ws / "data/splits")
    one_line(*cli(train_ws, "split", "demo", flag, value), 2, pattern)
    assert tree(train_ws / "data/splits") == before


# --- splits, prepared data, runs ----------------------------------------------------------------


def _split_file(ws: Path) -> Path:
    return ws / "data/splits/demo/ratio-0.1_seed-0.json"


def _fresh_run(ws: Path) -> None:
    shutil.rmtree(ws / "data/runs")


def test_split_names_unknown_images(train_ws, cli):
    path = _split_file(train_ws)
    split = json.loads(path.read_text())
    split["labeled"].append("no-such-frame")
    path.write_text(json.dumps(split))
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"ratio-0.1_seed-0.json: 'labeled' names 1 case\(s\) not in the prepared training set, e.g. 'no-such-frame'",
    )
    assert not (train_ws / "data/runs").exists()


def test_split_not_json(train_ws, cli):
    _split_file(train_ws).write_text('{"version": 1, "labeled": [')
    _fresh_run(train_ws)
    one_line(*cli(train_ws, "train", *RUN, "--no-progress"), 1, r"ratio-0.1_seed-0.json: not a valid JSON split file")
    assert not (train_ws / "data/runs").exists()


def test_split_labels_a_test_case(train_ws, demo_prepared, cli):
    """A test case named as labeled: by a name only a test set has ..."""
    from knowsam.data.dataset import PreparedDataset

    test_case = PreparedDataset(demo_prepared / "data/prepared/demo").index("Demo-Colon")["case"].iloc[0]
    path = _split_file(train_ws)
    split = json.loads(path.read_text())
    split["labeled"].append(test_case)
    path.write_text(json.dumps(split))
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        rf"'labeled' names case '{re.escape(test_case)}' of test set 'Demo-Colon'; training and test cases must not overlap",
    )
    assert not (train_ws / "data/runs").exists()


def test_split_case_duplicated_in_a_test_set(train_ws, demo_prepared, cli):
    """... or a training case that a test set holds too, same name and same pixels."""
    import pandas as pd

    prepared = own_prepared(train_ws, demo_prepared)
    labeled = json.loads(_split_file(train_ws).read_text())["labeled"][0]
    train_index = pd.read_csv(prepared / "train_index.csv", dtype=str)
    row = int(np.flatnonzero(train_index["case"] == labeled)[0])
    test_index = pd.read_csv(prepared / "Demo-Kvasir_index.csv", dtype={"name": str, "case": str})
    test_index.loc[0, ["name", "case"]] = labeled
    test_index.to_csv(prepared / "Demo-Kvasir_index.csv", index=False)
    images = np.load(prepared / "Demo-Kvasir_images.npy")
    images[0] = np.load(prepared / "train_images.npy")[row]
    np.save(prepared / "Demo-Kvasir_images.npy", images)
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        rf"'labeled' names case '{re.escape(labeled)}' of test set 'Demo-Kvasir'",
    )
    assert not (train_ws / "data/runs").exists()


def test_prepared_dataset_of_an_older_format(train_ws, demo_prepared, cli):
    prepared = own_prepared(train_ws, demo_prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = 0
    (prepared / "meta.json").write_text(json.dumps(meta))
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"meta.json: prepared with format version 0, this version reads 1; re-run the prepare stage",
    )
    assert not (train_ws / "data/runs").exists()


def test_prepared_dataset_missing_an_array(train_ws, demo_prepared, cli):
    prepared = own_prepared(train_ws, demo_prepared)
    (prepared / "train_masks.npy").unlink()
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"train_masks.npy: missing or unreadable \(FileNotFoundError\); re-run the prepare stage",
    )
    assert not (train_ws / "data/runs").exists()


def test_prepared_dataset_not_found(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["data"]["prepared_root"] = "nowhere"
    write_params(train_ws, raw)
    one_line(*cli(train_ws, "split", "demo"), 1, r"nowhere/demo/meta.json: prepared dataset not found")


def test_run_folder_of_another_configuration(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["train"]["lr"] = 0.02
    write_params(train_ws, raw)
    before = tree(train_ws / RUN_DIR)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"checkpoint.pt: checkpoint from a different configuration or version; delete \S+ratio-0.1_seed-0/labeled-only ",
    )
    assert tree(train_ws / RUN_DIR) == before


def test_run_folder_of_another_version(train_ws, cli):
    ckpt = train_ws / RUN_DIR / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["version"] = 0
    torch.save(state, ckpt)
    before = tree(train_ws / RUN_DIR)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"checkpoint.pt: checkpoint from a different configuration or version",
    )
    assert tree(train_ws / RUN_DIR) == before


def test_evaluate_before_train(train_ws, cli):
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        r"best.pt: trained weights not found; run the train stage for labeled-only-demo-0.1-0",
    )
    assert not (train_ws / "reports").exists() and not (train_ws / "data/eval").exists()


def test_evaluate_weights_of_other_parameters(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["train"]["iterations"] = 3
    write_params(train_ws, raw)
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        r"best.pt: trained with other parameters, code or version \(see \S+config.json\); re-run the train stage",
    )
    assert not (train_ws / "reports").exists() and not (train_ws / "data/eval").exists()


def test_evaluate_corrupt_weights(train_ws, cli):
    best = train_ws / RUN_DIR / "best.pt"
    best.write_bytes(best.read_bytes()[:200])
    one_line(*cli(train_ws, "evaluate", *EVAL), 1, r"best.pt: unreadable or not this method's weights \(")
    assert not (train_ws / "reports").exists() and not (train_ws / "data/eval").exists()


def test_evaluate_corrupt_training_curves(train_ws, cli):
    curve = train_ws / RUN_DIR / "live/plots/metrics/train/loss.tsv"
    curve.write_text(curve.read_text()[:3])  # cut short
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        r"loss.tsv: unreadable training curves; re-run the train stage for labeled-only-demo-0.1-0",
    )
    assert not (train_ws / "reports").exists() and not (train_ws / "data/eval").exists()


# --- SAM checkpoints ----------------------------------------------------------------------------


def test_missing_sam_checkpoint(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["sam"]["checkpoint"] = str(train_ws / "weights/sam_tiny.pth")
    write_params(train_ws, raw)
    one_line(
        *cli(train_ws, "train", "demo", "--method", "knowsam", *RUN[3:], "--no-progress"),
        1,
        r"SAM checkpoint \S+/weights/sam_tiny.pth not found",
    )
    assert not (train_ws / "data/runs/demo/knowsam").exists()


def test_sam_checkpoint_with_wrong_checksum(tmp_path):
    from knowsam.models.sam_checkpoint import resolve_checkpoint

    fake = tmp_path / "sam_vit_b_01ec64.pth"  # the official file name, other bytes
    fake.write_bytes(b"not the real weights")
    library_error(
        lambda: resolve_checkpoint(str(fake), "vit_b", tmp_path / "cache"),
        r"SAM checkpoint \S+sam_vit_b_01ec64.pth has sha256 [0-9a-f]{64}, expected [0-9a-f]{64} \(corrupt or wrong file",
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(fake, cache / fake.name)  # a damaged file in the download cache is caught too
    library_error(lambda: resolve_checkpoint("official", "vit_b", cache, download=False), r"has sha256 \w+, expected")


def test_official_checkpoint_for_another_arch(tmp_path):
    from knowsam.models.sam_checkpoint import resolve_checkpoint

    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"x")
    library_error(
        lambda: resolve_checkpoint(str(fake), "tiny", tmp_path),
        r"is the official vit_b file but arch is tiny",
        status=2,
    )


# --- archives -----------------------------------------------------------------------------------


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("TrainDataset/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


def test_archive_with_traversal_entry(tmp_path):
    from knowsam.data.extract import safe_extract

    evil = tarfile.TarInfo("TrainDataset/../../evil.txt")
    evil.size = 4
    archive = _tar_with(tmp_path / "data.tar.gz", evil, b"evil")
    library_error(
        lambda: safe_extract(archive, tmp_path / "out"),
        r"cannot extract \S+data.tar.gz: member 'TrainDataset/../../evil.txt' has a '..' component",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.tar.gz"]


def test_archive_with_link(tmp_path):
    from knowsam.data.extract import safe_extract

    link = tarfile.TarInfo("TrainDataset/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_with(tmp_path / "data.tar.gz", link)
    library_error(
        lambda: safe_extract(archive, tmp_path / "out"),
        r"member 'TrainDataset/link' is a link to '/etc/passwd' \(links are not extracted\)",
    )
    zipped = tmp_path / "data.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        info = zipfile.ZipInfo("a/link")
        info.create_system, info.external_attr = 3, (0o120777 << 16)
        zf.writestr(info, "../../outside")
    library_error(lambda: safe_extract(zipped, tmp_path / "out2"), r"member 'a/link' is a symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.tar.gz", "data.zip"]


# --- score --------------------------------------------------------------------------------------


def test_score_predictions_with_wrong_names(tmp_path, cli):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder, stems in ((pred, ["a", "b"]), (gt, ["x", "y"])):
        folder.mkdir()
        for stem in stems:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{stem}.png")
    one_line(
        *cli(tmp_path, "score", str(pred), str(gt), "--out", "scores.csv"),
        1,
        r"no prediction in \S+pred shares a file stem with a mask in \S+gt \(e.g. 'a' vs 'x'\)",
    )
    assert not (tmp_path / "scores.csv").exists()


def _score_folders(tmp_path: Path, pred_values=None) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder in (pred, gt):
        folder.mkdir()
    for stem in ("a", "b"):
        mask = np.zeros((20, 30), np.uint8)
        mask[4:12, 5:20] = 255
        Image.fromarray(mask).save(gt / f"{stem}.png")
        Image.fromarray(mask if pred_values is None else pred_values(mask)).save(pred / f"{stem}.png")
    return pred, gt


def test_score_prediction_of_another_size(tmp_path, cli):
    pred, gt = _score_folders(tmp_path)
    Image.fromarray(np.asarray(Image.open(pred / "b.png")).T.copy()).save(pred / "b.png")
    one_line(
        *cli(tmp_path, "score", str(pred), str(gt), "--out", "scores.csv"),
        1,
        r"pred/b.png: prediction size 20x30 differs from its mask's 30x20; 1 of 2 prediction\(s\) differ in size "
        r"from their masks \(pass --resize to resize them\)$",
    )
    assert not (tmp_path / "scores.csv").exists()


def test_score_out_names_a_folder(tmp_path, cli):
    pred, gt = _score_folders(tmp_path)
    (tmp_path / "report").mkdir()
    one_line(
        *cli(tmp_path, "score", str(pred), str(gt), "--out", "report"),
        1,
        r"^error: report: --out names a folder; give the path of the per-image CSV file to write",
    )
    assert list((tmp_path / "report").iterdir()) == []


def test_score_out_unwritable(tmp_path, cli):
    pred, gt = _score_folders(tmp_path)
    (tmp_path / "notes").write_text("a file where --out expects a folder")
    one_line(
        *cli(tmp_path, "score", str(pred), str(gt), "--out", "notes/scores.csv"),
        1,
        r"^error: notes/scores.csv: cannot write the per-image CSV \((FileExists|NotADirectory)Error: ",
    )
    assert (tmp_path / "notes").read_text() == "a file where --out expects a folder"


def test_score_truth_that_decodes_empty(tmp_path, cli):
    """Masks in 0..127 (here {0, 60}) are no encoding of the policy: every mask would read empty."""
    pred, gt = _score_folders(tmp_path, pred_values=lambda mask: np.zeros_like(mask))
    for path in gt.iterdir():
        Image.fromarray(np.asarray(Image.open(path)) // 255 * 60).save(path)
    one_line(
        *cli(tmp_path, "score", str(pred), str(gt)),
        1,
        r"gt: 2 of 2 masks decode empty \(e.g. a.png: mode L, values 0, 60\); a misread mask encoding\?",
    )


def test_score_missing_prediction_folder(tmp_path, cli):
    (tmp_path / "gt").mkdir()
    one_line(
        *cli(tmp_path, "score", str(tmp_path / "nope"), str(tmp_path / "gt")),
        1,
        r"prediction folder \S+nope does not exist or is not a folder",
    )


def test_profile_keeps_an_edited_params_file(tmp_path, cli, capsys):
    edited = (REPO / "knowsam/profiles/demo.yaml").read_text().replace("iterations: 80", "iterations: 81")
    write_params(tmp_path, edited)
    code, _ = cli(tmp_path, "profile", "cpu")
    assert code == 0
    assert (tmp_path / "params.yaml.bak.1").read_text() == edited
    assert (tmp_path / "params.yaml").read_text() == (REPO / "knowsam/profiles/cpu.yaml").read_text()
    (tmp_path / "params.yaml.bak.1").unlink()
    assert cli(tmp_path, "profile", "demo")[0] == 0  # a profile's own text needs no backup
    assert not list(tmp_path.glob("params.yaml.bak*"))


# --- labeled ratio 1.0 ------------------------------------------------------------------------


def test_ratio_written_as_an_integer(tmp_path, cli):
    write_params(tmp_path, params_dict(ratios=[1]))
    one_line(*cli(tmp_path, "split", "demo"), 2, r"params: 'ratios\[0\]' = 1: write it as 1.0 ")


def test_dvc_stage_paths_are_where_the_harness_writes(tmp_path):
    """DVC renders `${item.ratio}` and the data roots from params.yaml; the writers must use exactly those paths."""
    import subprocess
    import sys

    from knowsam.data.splits import split_path

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    roots = {"raw_root": "elsewhere/raw", "prepared_root": "elsewhere/prepared", "splits_root": "elsewhere/splits"}
    write_params(tmp_path, params_dict(ratios=[0.05, 1.0], data=roots))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listing = subprocess.run([*dvc, "stage", "list"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    for ratio in (0.05, 1.0):
        assert str(split_path("elsewhere/splits", "demo", ratio, 0)) in listing, listing
    assert "Outputs elsewhere/raw/demo\n" in listing and "Outputs elsewhere/prepared/demo," in listing, listing


def test_semi_supervised_method_at_ratio_one(train_ws, demo_prepared, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw.update(ratios=[1.0], methods=["labeled-only", "mt"])
    write_params(train_ws, raw)
    code, _ = cli(train_ws, "split", "demo")
    assert code == 0 and (train_ws / "data/splits/demo/ratio-1.0_seed-0.json").is_file()
    one_line(
        *cli(train_ws, "train", "demo", "--method", "mt", "--ratio", "1.0", "--seed", "0", "--no-progress"),
        1,
        r"labeled ratio 1 leaves no unlabeled image for a semi-supervised method",
    )
    assert not (train_ws / "data/runs/demo/ratio-1.0_seed-0/mt").exists()


# --- the machine: disk full, out of memory ----------------------------------------------------


def test_disk_full_while_saving_a_checkpoint(train_ws, cli, monkeypatch):
    """torch's own short-write error (what a full disk gives it) becomes one line; nothing half-written."""
    import knowsam.fileio

    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, _path: save(obj, "/dev/full"))  # every write fails as on a full disk
    monkeypatch.setattr(knowsam.fileio.shutil, "disk_usage", lambda _p: SimpleNamespace(free=2**20))  # 1 MB left
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"labeled-only/(best|checkpoint).pt: no space left on device \(1 MB free in \S+labeled-only\); "
        r"free some space and rerun",
    )
    assert not list((train_ws / RUN_DIR).rglob("*.tmp")) and not list((train_ws / RUN_DIR).glob("*.pt"))


def test_disk_full_while_writing_a_file(tmp_path, cli, monkeypatch):
    """An OSError ENOSPC from the file system (here /dev/full's real one) is named as such."""
    from knowsam import fileio as kio

    def write_to_full_device(self, data):
        with open("/dev/full", "wb") as full:
            full.write(data)

    monkeypatch.setattr(Path, "write_bytes", write_to_full_device)
    message = library_error(
        lambda: kio.write_text(tmp_path / "out.json", "{}"),
        r"out.json: no space left on device \(\d+ MB free in \S+\); free some space and rerun",
    )
    assert str(tmp_path) in message and not list(tmp_path.iterdir())


def test_out_of_memory_is_one_line(train_ws, cli, monkeypatch):
    from knowsam.methods.supervised import LabeledOnly

    def allocate_too_much(self, batch, step):
        return torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's real refusal

    monkeypatch.setattr(LabeledOnly, "train_step", allocate_too_much)
    _fresh_run(train_ws)
    one_line(
        *cli(train_ws, "train", *RUN, "--no-progress"),
        1,
        r"out of memory \(.*can't allocate memory.*\); lower train.batch_size or data.image_size",
    )


# --- the catalogue document ---------------------------------------------------------------------


def test_catalogue_document_lists_every_case():
    text = (REPO / "docs/errors.md").read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| Input") and not set(line) <= set("|- ")
    ]
    assert len(rows) >= 25


# --- run identity, completion and ownership --------------------------------------------------------


def test_evaluate_an_unfinished_run(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["train"]["iterations"] = 4
    write_params(train_ws, raw)
    config = json.loads((train_ws / RUN_DIR / "config.json").read_text())  # as if stopped at step 2 of 4
    config["train"]["iterations"] = 4
    from knowsam.runs import config_hash

    config.pop("config_hash")
    config["config_hash"] = config_hash(config)
    (train_ws / RUN_DIR / "config.json").write_text(json.dumps(config))
    one_line(
        *cli(train_ws, "evaluate", *EVAL),
        1,
        r"ratio-0.1_seed-0/labeled-only: training stopped at step 2 of 4 \(unfinished\); re-run the train stage "
        r"for labeled-only-demo-0.1-0",
    )
    assert not (train_ws / "data/eval").exists()


def test_leaderboard_leaves_out_a_summary_of_a_training_since_restarted(train_ws, cli):
    """Scored, then restarted (e.g. its code changed) and stopped: the old scores no longer stand for the run."""
    from knowsam import validation
    from knowsam.report.results import LeftOut, load_summaries

    assert cli(train_ws, "evaluate", *EVAL)[0] == 0
    run = RunId("labeled-only", "demo", 0.1, 0)  # cwd is the workspace (the cli fixture moved there)
    params = validation.load("params.yaml")
    results = load_summaries(params, [run])
    assert not results.left_out and set(results.table.method) == {"labeled-only"}
    config = json.loads((train_ws / RUN_DIR / "config.json").read_text())
    config["config_hash"] = "0" * 16  # what a restarted training under another configuration writes first
    (train_ws / RUN_DIR / "config.json").write_text(json.dumps(config))
    results = load_summaries(params, [run])
    assert results.left_out == [LeftOut(run, "retrained since scored", scored=True)] and results.table.empty


def test_second_trainer_on_a_run_folder(train_ws, cli):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
            "os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'%d' % os.getpid(), 0); "
            "print(flush=True); time.sleep(60)",
            str(train_ws / RUN_DIR / ".train.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        holder.stdout.readline()
        one_line(
            *cli(train_ws, "train", *RUN, "--no-progress"),
            1,
            rf"labeled-only: already being trained by process {holder.pid}; wait for it or stop it first",
        )
    finally:
        holder.kill()
        holder.wait()
    code, err = cli(train_ws, "train", *RUN, "--no-progress")  # the holder died: its lock went with it
    assert code == 0, err


def test_location_settings_keep_runs_valid(train_ws, cli):
    raw = yaml.safe_load((train_ws / "params.yaml").read_text())
    raw["data"]["mirror"] = "/somewhere/else"
    raw["sam"]["cache_dir"] = "/another/cache"
    write_params(train_ws, raw)
    before = (train_ws / RUN_DIR / "checkpoint.pt").read_bytes()
    code, err = cli(train_ws, "train", *RUN, "--no-progress")
    assert code == 0, err
    assert (train_ws / RUN_DIR / "checkpoint.pt").read_bytes() == before  # resumed complete, nothing retrained
    code, err = cli(train_ws, "evaluate", *EVAL)
    assert code == 0, err


def test_changed_training_code_retrains_from_scratch(train_ws, cli, monkeypatch):
    from knowsam import runs
    from knowsam.methods.supervised import LabeledOnly

    steps = []
    original = LabeledOnly.train_step
    monkeypatch.setattr(
        LabeledOnly, "train_step", lambda self, batch, step: steps.append(step) or original(self, batch, step)
    )
    code, err = cli(train_ws, "train", *RUN, "--no-progress", "--restart-stale")
    assert code == 0 and steps == [], err  # same code: the finished run is kept
    edited = train_ws / "src"  # the package with one method edited
    shutil.copytree(runs.SOURCE_ROOT / "knowsam", edited / "knowsam")
    with open(edited / "knowsam/methods/supervised.py", "a") as fh:
        fh.write("\n# an edit\n")
    monkeypatch.setattr(runs, "SOURCE_ROOT", edited)
    one_line(*cli(train_ws, "train", *RUN, "--no-progress"), 1, r"checkpoint from a different configuration")
    one_line(*cli(train_ws, "evaluate", *EVAL), 1, r"trained with other parameters, code or version")
    code, err = cli(train_ws, "train", *RUN, "--no-progress", "--restart-stale")
    assert code == 0 and steps == [0, 1], err
    code, err = cli(train_ws, "evaluate", *EVAL)
    assert code == 0, err

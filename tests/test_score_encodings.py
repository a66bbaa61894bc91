"""`score` reads predictions and ground truth by one policy: every prediction encoding against every
ground-truth encoding. Each expected Dice is computed here, from the arrays that were encoded (for
JPEG files, from the pixels PIL decodes back), by the rule the docs state; each refusal is one line
that names the file."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from knowsam.data.masks import decode_mask
from knowsam.errors import KnowsamError
from knowsam.report.score import score_folders
from tests.test_masks import ROWS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(40, 48), (36, 36), (30, 44)]
VIRIDIS = np.rint(matplotlib.colormaps["viridis"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def truth_mask(i: int) -> np.ndarray:
    h, w = SHAPES[i]
    mask = np.zeros((h, w), bool)
    mask[5 + i : h - 6, 7 : w - 9 + i] = True
    return mask


def probability(i: int) -> np.ndarray:
    """A probability map that overlaps its truth in part, with levels on both sides of 0.5, as 8-bit levels."""
    h, w = SHAPES[i]
    rng = np.random.default_rng(i)
    p = np.full((h, w), 0.2)
    p[9 : h - 3, 12 : w - 4] = 0.8
    p[2:6, :] = 0.55
    p += rng.uniform(-0.12, 0.12, (h, w))
    return np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * (pred & truth).sum() / total


def decoded(path: Path) -> np.ndarray:
    """The pixels PIL decodes from ``path`` (what a lossy file holds after saving)."""
    with Image.open(path) as image:
        return np.asarray(image)


@dataclass(frozen=True)
class Refused:
    pattern: str


# An encoding: (i -> write(path stem) -> path, {option: (expected foreground(path, i) or Refused, rule)});
# option "truth" is how a ground-truth file of that encoding reads.


def png(array: np.ndarray) -> Callable[[Path], Path]:
    def write(stem: Path) -> Path:
        Image.fromarray(array).save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")

    return write


def jpeg(array: np.ndarray) -> Callable[[Path], Path]:
    def write(stem: Path) -> Path:
        Image.fromarray(array).save(stem.with_suffix(".jpg"), quality=90)
        return stem.with_suffix(".jpg")

    return write


def voc_palette(mask: np.ndarray) -> Callable[[Path], Path]:
    def write(stem: Path) -> Path:
        image = Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette([0, 0, 0, 128, 0, 0])
        image.save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")

    return write


def red_on_black(mask: np.ndarray) -> np.ndarray:
    return np.dstack([mask * np.uint8(255), np.zeros_like(mask, np.uint8), np.zeros_like(mask, np.uint8)])


def alpha_only(mask: np.ndarray) -> np.ndarray:
    return np.dstack([np.zeros((*mask.shape, 3), np.uint8), mask * np.uint8(255)])


def transparent_background(mask: np.ndarray) -> np.ndarray:
    """Opaque black label on a transparent white background (read inverted before the alpha rule)."""
    colour = np.where(mask[..., None], 0, 255).astype(np.uint8).repeat(3, axis=2)
    return np.dstack([colour, mask * np.uint8(255)])


def tiff(array: np.ndarray) -> Callable[[Path], Path]:
    def write(stem: Path) -> Path:
        Image.fromarray(array).save(stem.with_suffix(".tif"))
        return stem.with_suffix(".tif")

    return write


AMBIGUOUS_01 = Refused(
    r"values 0 and 1 only: class ids \{0, 1\}, or a probability map near 0\? pass "
    r"--pred-encoding labels or --pred-encoding probability"
)
SIXTEEN_LOW = Refused(r"16-bit mask whose levels \(0, 255\) all lie below 256: 8-bit levels stored in 16 bits\?")
SIXTEEN_LOW_AUTO = Refused(
    r"16-bit levels \(0, 255\) all below 256: 8-bit levels stored in 16 bits, or a "
    r"probability map near 0\?"
)
LOSSY_IDS = Refused(
    r"JPEG mask with levels 0, 1.*none above 127: class ids saved in a lossy format cannot be read back"
)
LOSSY_IDS_AUTO = Refused(r"JPEG with levels 0, 1.*none above 127: class ids saved lossily")
COLOUR_FOR_PROBABILITY = Refused(
    r"(palette|colour) image of \d+ colours: --pred-encoding probability reads grey levels"
)
COLOUR_MAPPED_AUTO = Refused(
    r"colour image of \d+ colours: a colour-mapped probability map or coloured labels\? "
    r"Pass --pred-encoding colormap:<name> or --pred-encoding labels"
)
COLOUR_NOT_A_MASK = Refused(r"colour image of \d+ colours: a colour mask is read only with two colours")
BOTH_BRIGHT = Refused(r"colour mask whose two colours both have a channel above 127: which one is the background\?")
FLOAT_AUTO = Refused(r"float values .*: a probability map\? Pass --pred-encoding probability")
FLOAT_LABELS = Refused(r"mask values .* are neither class ids nor 8- or 16-bit grey levels")

P = "probability = grey / 255 > 0.5"


def mask_encodings(mask_of: Callable[[int], np.ndarray]) -> dict:
    """Encodings of a binary mask; each maps an option to (expected foreground or Refused, rule)."""
    m = mask_of

    def same(path: Path, i: int) -> np.ndarray:
        return m(i)

    def jpeg_levels(path: Path, i: int) -> np.ndarray:
        return decoded(path) > 127

    empty = lambda path, i: np.zeros(SHAPES[i], bool)  # noqa: E731
    return {
        "grey {0, 255}": (
            lambda i: png(m(i) * np.uint8(255)),
            {
                "truth": (same, "grey > 127"),
                "auto": (same, P),
                "labels": (same, "grey > 127"),
                "probability": (same, P),
            },
        ),
        "grey {0, 1}": (
            lambda i: png(m(i).astype(np.uint8)),
            {
                "truth": (same, "class ids {0, 1}: 1 = foreground"),
                "auto": (AMBIGUOUS_01, None),
                "labels": (same, "class ids {0, 1}: 1 = foreground"),
                "probability": (empty, P),
            },
        ),
        "16-bit {0, 65535}": (
            lambda i: png(m(i).astype(np.uint16) * np.uint16(65535)),
            {
                "truth": (same, "16-bit grey > 32767"),
                "auto": (same, "probability = 16-bit grey / 65535 > 0.5"),
                "labels": (same, "16-bit grey > 32767"),
                "probability": (same, "probability = 16-bit grey / 65535 > 0.5"),
            },
        ),
        "16-bit {0, 255}": (
            lambda i: png(m(i).astype(np.uint16) * np.uint16(255)),
            {
                "truth": (SIXTEEN_LOW, None),
                "auto": (SIXTEEN_LOW_AUTO, None),
                "labels": (SIXTEEN_LOW, None),
                "probability": (empty, "probability = 16-bit grey / 65535 > 0.5"),
            },
        ),
        "VOC palette": (
            lambda i: voc_palette(m(i)),
            {
                "truth": (same, "palette index > 0"),
                "auto": (same, "palette index > 0"),
                "labels": (same, "palette index > 0"),
                "probability": (COLOUR_FOR_PROBABILITY, None),
            },
        ),
        "red on black": (
            lambda i: png(red_on_black(m(i))),
            {
                "truth": (same, "colour: any channel > 127"),
                "auto": (same, "colour: any channel > 127"),
                "labels": (same, "colour: any channel > 127"),
                "probability": (COLOUR_FOR_PROBABILITY, None),
            },
        ),
        "red on white": (
            lambda i: png(np.where(m(i)[..., None], [255, 0, 0], [255, 255, 255]).astype(np.uint8)),
            {
                "truth": (BOTH_BRIGHT, None),
                "auto": (BOTH_BRIGHT, None),
                "labels": (BOTH_BRIGHT, None),
                "probability": (COLOUR_FOR_PROBABILITY, None),
            },
        ),
        "alpha only": (
            lambda i: png(alpha_only(m(i))),
            {
                "truth": (same, "alpha > 127"),
                "auto": (same, "probability = alpha / 255 > 0.5"),
                "labels": (same, "alpha > 127"),
                "probability": (same, "probability = alpha / 255 > 0.5"),
            },
        ),
        "transparent background": (
            lambda i: png(transparent_background(m(i))),
            {
                "truth": (same, "alpha > 127"),
                "auto": (same, "probability = alpha / 255 > 0.5"),
                "labels": (same, "alpha > 127"),
                "probability": (same, "probability = alpha / 255 > 0.5"),
            },
        ),
        "JPEG {0, 255}": (
            lambda i: jpeg(m(i) * np.uint8(255)),
            {
                "truth": (jpeg_levels, "grey > 127 (JPEG)"),
                "auto": (jpeg_levels, P + " (JPEG)"),
                "labels": (jpeg_levels, "grey > 127 (JPEG)"),
                "probability": (jpeg_levels, P + " (JPEG)"),
            },
        ),
        "JPEG {0, 1}": (
            lambda i: jpeg(m(i).astype(np.uint8)),
            {
                "truth": (LOSSY_IDS, None),
                "auto": (LOSSY_IDS_AUTO, None),
                "labels": (LOSSY_IDS, None),
                "probability": (jpeg_levels, P + " (JPEG)"),
            },
        ),
    }


def probability_encodings() -> dict:
    """Encodings of a probability map (predictions; as ground truth, the soft levels are read as a mask)."""
    v = probability

    def jpeg_levels(path: Path, i: int) -> np.ndarray:
        return decoded(path) > 127

    sixteen = lambda i: np.rint(v(i) / 255 * 65535).astype(np.uint16)  # noqa: E731
    return {
        "probability grey": (
            lambda i: png(v(i)),
            {
                "truth": (lambda path, i: v(i) > 127, "grey > 127"),
                "auto": (lambda path, i: v(i) / 255 > 0.5, P),
                "labels": (lambda path, i: v(i) > 127, "grey > 127"),
                "probability": (lambda path, i: v(i) / 255 > 0.5, P),
            },
        ),
        "probability 16-bit": (
            lambda i: png(sixteen(i)),
            {
                "truth": (lambda path, i: sixteen(i) > 32767, "16-bit grey > 32767"),
                "auto": (lambda path, i: sixteen(i) / 65535 > 0.5, "probability = 16-bit grey / 65535 > 0.5"),
                "labels": (lambda path, i: sixteen(i) > 32767, "16-bit grey > 32767"),
                "probability": (lambda path, i: sixteen(i) / 65535 > 0.5, "probability = 16-bit grey / 65535 > 0.5"),
            },
        ),
        "probability JPEG": (
            lambda i: jpeg(v(i)),
            {
                "truth": (jpeg_levels, "grey > 127 (JPEG)"),
                "auto": (lambda path, i: decoded(path) / 255 > 0.5, P + " (JPEG)"),
                "labels": (jpeg_levels, "grey > 127 (JPEG)"),
                "probability": (lambda path, i: decoded(path) / 255 > 0.5, P + " (JPEG)"),
            },
        ),
        "colour-mapped (viridis)": (
            lambda i: png(VIRIDIS[v(i)]),
            {
                "truth": (COLOUR_NOT_A_MASK, None),
                "auto": (COLOUR_MAPPED_AUTO, None),
                "labels": (COLOUR_NOT_A_MASK, None),
                "probability": (COLOUR_FOR_PROBABILITY, None),
                "colormap:viridis": (lambda path, i: v(i) / 255 > 0.5, "probability = colour map viridis > 0.5"),
            },
        ),
        "float probability": (
            lambda i: tiff((v(i) / 255).astype(np.float32)),
            {
                "truth": (FLOAT_LABELS, None),
                "auto": (FLOAT_AUTO, None),
                "labels": (FLOAT_LABELS, None),
                "probability": (lambda path, i: (v(i) / 255).astype(np.float32) > 0.5, "probability = value > 0.5"),
            },
        ),
    }


def prediction_mask(i: int) -> np.ndarray:
    return probability(i) > 127


TRUTHS = {
    **mask_encodings(truth_mask),
    **{k: e for k, e in probability_encodings().items() if k in ("probability grey", "colour-mapped (viridis)")},
}
PREDICTIONS = {**mask_encodings(prediction_mask), **probability_encodings()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, list[Path]]]:
    """(role, encoding) -> (folder, its three files), written once."""
    root = tmp_path_factory.mktemp("encodings")
    out = {}
    for role, table in (("truth", TRUTHS), ("pred", PREDICTIONS)):
        for n, (name, (writer, _)) in enumerate(table.items()):
            folder = root / f"{role}{n}"
            folder.mkdir()
            out[role, name] = (folder, [writer(i)(folder / f"c{i}") for i in range(len(SHAPES))])
    return out


def expectation(table: dict, name: str, option: str, paths: list[Path]):
    expect, rule = table[name][1][option]
    if isinstance(expect, Refused):
        return expect, rule
    return [expect(path, i) for i, path in enumerate(paths)], rule


def check(folders, truth: str, pred: str, option: str) -> None:
    gt_dir, gt_paths = folders["truth", truth]
    pred_dir, pred_paths = folders["pred", pred]
    truths, truth_rule = expectation(TRUTHS, truth, "truth", gt_paths)
    preds, pred_rule = expectation(PREDICTIONS, pred, option, pred_paths)
    refusal = truths if isinstance(truths, Refused) else preds if isinstance(preds, Refused) else None
    if refusal is not None:
        folder = gt_dir if refusal is truths else pred_dir
        with pytest.raises(KnowsamError) as info:
            score_folders(pred_dir, gt_dir, workers=1, encoding=option)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(folder / "c0")), message
        assert re.search(refusal.pattern, message), f"{refusal.pattern!r} not in {message!r}"
        return
    result = score_folders(pred_dir, gt_dir, workers=1, encoding=option)
    expected = [dice(p, t) for p, t in zip(preds, truths)]
    assert result.per_image["dice"].tolist() == pytest.approx(expected)
    assert result.summary["mDice"] == pytest.approx(np.mean(expected))
    assert result.rules == {"prediction": {pred_rule: 3}, "ground_truth": {truth_rule: 3}}


@pytest.mark.parametrize("pred", list(PREDICTIONS))
@pytest.mark.parametrize("truth", list(TRUTHS))
def test_every_prediction_encoding_against_every_truth_encoding(folders, truth: str, pred: str) -> None:
    check(folders, truth, pred, "auto")


@pytest.mark.parametrize("truth", ["grey {0, 255}", "transparent background"])
@pytest.mark.parametrize("pred", list(PREDICTIONS))
def test_every_prediction_encoding_read_by_each_explicit_encoding(folders, truth: str, pred: str) -> None:
    for option in PREDICTIONS[pred][1]:
        if option != "truth" and option != "auto":
            check(folders, truth, pred, option)


@pytest.mark.parametrize("name", [n for n in TRUTHS if not isinstance(TRUTHS[n][1]["labels"][0], Refused)])
def test_a_prediction_read_as_labels_is_read_exactly_as_its_ground_truth(folders, name: str) -> None:
    """The same files as predictions (--pred-encoding labels) and as ground truth: Dice 1 on every image."""
    gt_dir, _ = folders["truth", name]
    result = score_folders(gt_dir, gt_dir, workers=1, encoding="labels")
    assert result.per_image["dice"].tolist() == [1.0, 1.0, 1.0]
    assert result.rules["prediction"] == result.rules["ground_truth"]


@pytest.mark.parametrize("name", [n for n in ROWS if not n.startswith("array") and n != "bilevel"])
def test_ground_truth_is_read_as_preparation_reads_it(tmp_path: Path, name: str) -> None:
    """Every encoding of preparation's table that score accepts gives preparation's mask."""
    from knowsam.report.encodings import read_truth

    image = ROWS[name]
    assert np.array_equal(read_truth(image, name).mask, decode_mask(image) > 0)


REFUSALS = sorted(
    {
        (role, name, option)
        for role, table in (("truth", TRUTHS), ("pred", PREDICTIONS))
        for name, (_, options) in table.items()
        for option, (expect, _) in options.items()
        if isinstance(expect, Refused) and (role == "pred") == (option != "truth")
    }
)


@pytest.mark.parametrize("role, name, option", REFUSALS)
def test_every_refusal_is_one_line_from_the_command_line(folders, role: str, name: str, option: str) -> None:
    """Through ``knowsam-bench score``: exit 1 and one line naming a file of the folder at fault."""
    good_truth, _ = folders["truth", "grey {0, 255}"]
    good_pred, _ = folders["pred", "grey {0, 255}"]
    folder, _ = folders[role, name]
    pred, gt = (folder, good_truth) if role == "pred" else (good_pred, folder)
    extra = () if role == "truth" else ("--pred-encoding", option)
    code, summary, err = score_cli(pred, gt, *extra)
    pattern = (TRUTHS if role == "truth" else PREDICTIONS)[name][1][option][0].pattern
    one_error_line(code, err, rf"^error: {re.escape(str(folder))}/c\d\.\w+: .*{pattern}")
    assert code == 1 and summary is None


# --- the cases reported against the previous policy (same truth; the prediction misread) -----------


def score_cli(pred: Path, gt: Path, *extra: str) -> tuple[int, dict | None, str]:
    from knowsam.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["score", str(pred), str(gt), "--format", "json", *extra])
    return code, (json.loads(out.getvalue()) if out.getvalue() else None), err.getvalue()


def one_error_line(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


@pytest.fixture
def four_truths(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    gt = tmp_path / "gt"
    gt.mkdir()
    masks = []
    for i in range(4):
        mask = np.zeros((48, 56), bool)
        mask[6 + 2 * i : 36, 8 : 40 + i] = True
        Image.fromarray(mask * np.uint8(255)).save(gt / f"c{i}.png")
        masks.append(mask)
    return gt, masks


def shifted(mask: np.ndarray) -> np.ndarray:
    return np.roll(mask, (3, 4), axis=(0, 1))


def write_all(folder: Path, arrays: list[np.ndarray], suffix: str = ".png", **save) -> Path:
    folder.mkdir(exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"c{i}{suffix}", **save)
    return folder


def test_sixteen_bit_zero_255_prediction_is_refused_as_its_truth_is(tmp_path: Path, four_truths) -> None:
    gt, masks = four_truths
    pred = write_all(tmp_path / "pred", [shifted(m).astype(np.uint16) * np.uint16(255) for m in masks])
    code, _, err = score_cli(pred, gt)
    one_error_line(code, err, rf"{re.escape(str(pred))}/c\d.png: 16-bit levels \(0, 255\) all below 256")
    code, _, err = score_cli(pred, pred, "--pred-encoding", "labels")
    one_error_line(code, err, rf"{re.escape(str(pred))}/c\d.png: 16-bit mask whose levels \(0, 255\)")


def test_truth_with_a_transparent_white_background_reads_its_label(tmp_path: Path, four_truths) -> None:
    gt, masks = four_truths
    for i, mask in enumerate(masks):
        Image.fromarray(transparent_background(mask)).save(gt / f"c{i}.png")
    pred = write_all(tmp_path / "pred", [shifted(m) * np.uint8(255) for m in masks])
    code, summary, _ = score_cli(pred, gt)
    assert code == 0
    assert summary["mDice"] == pytest.approx(np.mean([dice(shifted(m), m) for m in masks]))
    assert summary["decoding"]["ground_truth"] == {"alpha > 127": 4}


def test_zero_one_truth_saved_as_jpeg_is_refused(tmp_path: Path, four_truths) -> None:
    gt, masks = four_truths
    for path in list(gt.iterdir()):
        path.unlink()
    write_all(gt, [m.astype(np.uint8) for m in masks], ".jpg", quality=75)
    pred = write_all(tmp_path / "pred", [shifted(m) * np.uint8(255) for m in masks])
    code, _, err = score_cli(pred, gt)
    one_error_line(
        code,
        err,
        rf"{re.escape(str(gt))}/c\d.jpg: JPEG mask with levels 0, 1.* class ids saved in "
        "a lossy format cannot be read back; save label masks as PNG",
    )


@pytest.mark.parametrize("cmap", ["jet", "viridis"])
def test_colour_mapped_probability_map_is_refused_or_read_through_its_colour_map(
    tmp_path: Path, four_truths, cmap: str
) -> None:
    gt, masks = four_truths
    table = np.rint(matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    levels = [np.clip(shifted(m) * 170 + rng.integers(0, 90, m.shape), 0, 255).astype(np.uint8) for m in masks]
    pred = write_all(tmp_path / "pred", [table[v] for v in levels])
    code, _, err = score_cli(pred, gt)
    one_error_line(code, err, rf"{re.escape(str(pred))}/c\d.png: colour image of \d+ colours: a colour-mapped")
    code, summary, _ = score_cli(pred, gt, "--pred-encoding", f"colormap:{cmap}")
    assert code == 0
    assert summary["mDice"] == pytest.approx(np.mean([dice(v > 127, m) for v, m in zip(levels, masks)]))
    assert summary["decoding"]["prediction"] == {f"probability = colour map {cmap} > 0.5": 4}
    code, _, err = score_cli(pred, gt, "--pred-encoding", "colormap:magma")
    one_error_line(code, err, r"c\d.png: colour \(\d+, \d+, \d+\) is not one of colour map 'magma'")


def test_grey_map_of_zeros_and_ones_needs_to_be_told_what_it_is(tmp_path: Path, four_truths) -> None:
    """A probability map at 0 and 1/255 (a confident miss) must not be scored as a {0, 1} mask."""
    gt, masks = four_truths
    pred = write_all(tmp_path / "pred", [shifted(m).astype(np.uint8) for m in masks])
    code, _, err = score_cli(pred, gt)
    one_error_line(code, err, r"c\d.png: values 0 and 1 only: class ids \{0, 1\}, or a probability map near 0\?")
    code, summary, _ = score_cli(pred, gt, "--pred-encoding", "probability")
    assert code == 0 and summary["mDice"] == 0.0
    code, summary, _ = score_cli(pred, gt, "--pred-encoding", "labels")
    assert code == 0
    assert summary["mDice"] == pytest.approx(np.mean([dice(shifted(m), m) for m in masks]))


def test_unknown_encoding_or_colour_map_is_a_usage_error(tmp_path: Path, four_truths) -> None:
    gt, _ = four_truths
    code, _, err = score_cli(gt, gt, "--pred-encoding", "grey")
    one_error_line(code, err, r"--pred-encoding 'grey': expected auto, labels, probability or colormap:<name>")
    assert code == 2
    code, _, err = score_cli(gt, gt, "--pred-encoding", "colormap:nope")
    one_error_line(code, err, r"--pred-encoding colormap:nope: unknown colour map 'nope'")
    assert code == 2


def test_colour_and_transparency_both_varying_is_refused(tmp_path: Path, four_truths) -> None:
    gt, masks = four_truths
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, mask in enumerate(masks):
        rgba = np.dstack(
            [
                red_on_black(shifted(mask)),
                np.where(np.arange(56) < 50, 255, 0).astype(np.uint8)[None, :].repeat(48, axis=0),
            ]
        )
        Image.fromarray(rgba).save(pred / f"c{i}.png")
    code, _, err = score_cli(pred, gt)
    one_error_line(code, err, r"c\d.png: colour and transparency both vary; which one is the mask\?")


# --- interrupting score ------------------------------------------------------------------------------

SLOW_SCORE = """
import signal, sys, time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores Ctrl-C)

import knowsam.report.score as score

scored = score._score_pair
started = Path(sys.argv[3])


def slow(job):  # a worker's pair takes long enough to be interrupted in the middle of the folder
    started.touch()
    time.sleep(0.3)
    return scored(job)


score._score_pair = slow
from knowsam.cli import main

sys.exit(main(["score", sys.argv[1], sys.argv[2]]))
"""


def processes_running(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "term"])
def test_interrupted_score_prints_the_interrupted_line_and_stops_its_workers(tmp_path: Path, how: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 12:50] = 255
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        for i in range(40):
            Image.fromarray(mask).save(tmp_path / folder / f"c{i:02d}.png")
    script = tmp_path / "slow_score.py"
    script.write_text(SLOW_SCORE)
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "pred"), str(tmp_path / "gt"), str(started), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()
    time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the whole foreground group
    else:
        proc.send_signal(signal.SIGTERM)  # `kill PID`: the score process alone
    out, err = proc.communicate(timeout=60)
    signal_name, status = ("SIGINT", 130) if how == "ctrl-c" else ("SIGTERM", 143)
    assert proc.returncode == status, err
    assert err.startswith(f"interrupted ({signal_name})") and err.count("\n") == 1, err
    assert out == ""
    time.sleep(0.5)
    assert processes_running(str(script)) == []

"""Folder scoring: pairing, thresholds, resizing, output formats and failures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import medpy.metric.binary as mb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from knowsam.errors import ConfigError, KnowsamError
from knowsam.report.score import PER_IMAGE_COLUMNS, SUMMARY_KEYS, score_command, score_folders


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def square(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = 255
    return mask


def bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent half-pixel-centred bilinear upsampling with edge clamping."""
    h, w = values.shape
    y = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    x = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    v = values.astype(np.float64)
    top = v[y0][:, x0] * (1 - wx) + v[y0][:, x1] * wx
    bottom = v[y1][:, x0] * (1 - wx) + v[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    """Four pairs: exact, shifted, missed (empty prediction) and a second exact one."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "exact.png", square((40, 50), 5, 5, 12))
    save(pred / "exact.png", square((40, 50), 5, 5, 12))
    save(gt / "shifted.png", square((30, 30), 4, 4, 10))
    save(pred / "shifted.png", square((30, 30), 7, 4, 10))
    save(gt / "missed.png", square((20, 25), 2, 2, 5))
    save(pred / "missed.png", np.zeros((20, 25), np.uint8))
    save(gt / "exact2.png", square((24, 24), 0, 0, 24))
    save(pred / "exact2.png", square((24, 24), 0, 0, 24))
    return pred, gt


def test_per_image_values_and_summary(pairs: tuple[Path, Path]) -> None:
    result = score_folders(*pairs)
    table = result.per_image.set_index("name")
    assert tuple(result.per_image.columns) == PER_IMAGE_COLUMNS
    assert list(table.index) == ["exact", "exact2", "missed", "shifted"]
    assert table.loc["exact", "dice"] == 1.0 and table.loc["exact", "hd95"] == 0.0
    gt = square((30, 30), 4, 4, 10) > 0
    pred = square((30, 30), 7, 4, 10) > 0
    assert table.loc["shifted", "dice"] == pytest.approx(mb.dc(pred, gt))
    assert table.loc["shifted", "hd95"] == pytest.approx(mb.hd95(pred, gt))
    assert table.loc["shifted", "asd"] == pytest.approx(mb.asd(pred, gt))
    assert table.loc["shifted", "hd_x095_paper"] == pytest.approx(0.95 * mb.hd(pred, gt))
    # The miss stays in the means, with the diagonal as its distance.
    assert table.loc["missed", "dice"] == 0.0
    assert table.loc["missed", "hd95"] == pytest.approx(np.hypot(20, 25))
    assert tuple(result.summary) == SUMMARY_KEYS
    assert result.summary["n"] == 4
    assert result.summary["mDice"] == pytest.approx(table["dice"].mean())
    assert result.summary["HD95"] == pytest.approx(table["hd95"].mean())
    assert result.summary["recall"] == pytest.approx(table["recall"].mean())
    assert result.complete


def test_workers_do_not_change_results(pairs: tuple[Path, Path]) -> None:
    serial = score_folders(*pairs, workers=1)
    parallel = score_folders(*pairs, workers=2)
    pd.testing.assert_frame_equal(serial.per_image, parallel.per_image, check_exact=True)


def test_probability_map_is_thresholded_strictly(tmp_path: Path) -> None:
    gt = np.zeros((20, 20), np.uint8)
    gt[5:10, 5:15] = 255  # 50 pixels
    prob = np.zeros((20, 20), np.uint8)
    prob[5:10, 5:15] = 200
    prob[10:15, 5:15] = 100  # 50 more pixels at probability 100/255
    save(tmp_path / "gt" / "a.png", gt)
    save(tmp_path / "pred" / "a.png", prob)

    def dice(t):
        return score_folders(tmp_path / "pred", tmp_path / "gt", threshold=t).per_image["dice"].item()

    assert dice(0.5) == 1.0
    assert dice(0.3) == pytest.approx(2 * 50 / (100 + 50))
    assert dice(100 / 255) == 1.0  # value/255 > threshold is strict
    assert dice(99 / 255) == pytest.approx(2 * 50 / (100 + 50))


def test_smaller_prediction_is_resized_bilinearly_then_thresholded(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    prob = rng.integers(0, 256, (15, 20)).astype(np.uint8)
    upsampled = bilinear(prob, 30, 40) / 255.0
    assert np.abs(upsampled - 0.5).min() > 1e-4  # no pixel sits on the threshold
    expected = upsampled > 0.5
    gt = np.zeros((30, 40), np.uint8)
    gt[8:22, 10:30] = 255
    save(tmp_path / "gt" / "a.png", gt)
    save(tmp_path / "pred" / "a.png", prob)
    result = score_folders(tmp_path / "pred", tmp_path / "gt", resize=True)
    assert result.resized == 1
    row = result.per_image.iloc[0]
    assert row["dice"] == pytest.approx(mb.dc(expected, gt > 0))
    assert row["hd95"] == pytest.approx(mb.hd95(expected, gt > 0))
    assert row["asd"] == pytest.approx(mb.asd(expected, gt > 0))
    # Thresholding first and upsampling the hard mask would give another mask.
    hard = np.kron(prob > 127, np.ones((2, 2), bool))
    assert mb.dc(hard, gt > 0) != pytest.approx(row["dice"])


def test_colour_jpeg_prediction_is_read_as_grey(tmp_path: Path) -> None:
    gt = square((64, 64), 16, 16, 32)
    colour = np.stack([gt] * 3, axis=-1)
    save(tmp_path / "gt" / "a.png", gt)
    save(tmp_path / "pred" / "a.jpg", colour, quality=95)
    row = score_folders(tmp_path / "pred", tmp_path / "gt").per_image.iloc[0]
    assert row["dice"] == 1.0 and row["hd95"] == 0.0


def test_unmatched_names_are_reported_and_fail(pairs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = pairs
    for name in ("extra1", "extra2"):
        save(pred / f"{name}.png", square((10, 10), 1, 1, 3))
    (pred / "missed.png").unlink()
    out = tmp_path / "report" / "per_image.csv"
    assert score_command(pred, gt, 0.5, out, as_json=True) == 1
    captured = capsys.readouterr()
    assert "2 prediction(s) without a ground-truth mask" in captured.err
    assert "extra1, extra2" in captured.err
    assert "1 ground-truth mask(s) without a prediction" in captured.err and "missed" in captured.err
    assert json.loads(captured.out)["n"] == 3
    written = pd.read_csv(out, dtype={"name": str})
    assert list(written["name"]) == ["exact", "exact2", "shifted"]
    assert tuple(written.columns) == PER_IMAGE_COLUMNS


def test_many_unmatched_names_are_abbreviated(pairs: tuple[Path, Path], capsys) -> None:
    pred, gt = pairs
    for i in range(7):
        save(pred / f"stray{i}.png", square((10, 10), 1, 1, 3))
    assert score_command(pred, gt, 0.5, None, as_json=True) == 1
    err = capsys.readouterr().err
    assert "7 prediction(s)" in err and "stray4, ..." in err and "stray5" not in err


def test_json_output_is_one_object_with_the_summary(pairs: tuple[Path, Path], capsys) -> None:
    assert score_command(*pairs, 0.5, None, as_json=True) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert tuple(summary) == (*SUMMARY_KEYS, "decoding")
    assert summary["decoding"] == {
        "prediction": {"probability = grey / 255 > 0.5": 4},
        "ground_truth": {"grey > 127": 4},
    }
    assert {k: summary[k] for k in SUMMARY_KEYS} == pytest.approx(score_folders(*pairs).summary)
    assert captured.err == ""


def test_table_output_carries_policy_and_definitions(pairs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores.csv"
    assert score_command(*pairs, 0.5, out, as_json=False) == 0
    # Drop the table's cell borders so that text wrapped inside a cell reads on.
    text = " ".join(re.sub("[│┃]", " ", capsys.readouterr().out).split())
    assert "mDice" in text and "mean of per-image Dice" in text
    assert "Empty masks" in text and "never dropped" in text
    assert "what the KnowSAM code calls HD95" in text
    assert len(pd.read_csv(out)) == 4


def test_missing_or_empty_folders_are_named(tmp_path: Path, pairs: tuple[Path, Path]) -> None:
    pred, gt = pairs
    with pytest.raises(KnowsamError, match="nowhere"):
        score_folders(tmp_path / "nowhere", gt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(KnowsamError, match="empty holds no image files"):
        score_folders(pred, tmp_path / "empty")


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_is_named(pairs: tuple[Path, Path], workers: int) -> None:
    pred, gt = pairs
    (pred / "shifted.png").write_bytes(b"not a png")
    with pytest.raises(KnowsamError, match="shifted.png"):
        score_folders(pred, gt, workers=workers)


def test_float_prediction_is_read_only_as_an_explicit_probability_map(tmp_path: Path) -> None:
    save(tmp_path / "gt" / "a.png", square((10, 10), 2, 2, 4))
    prob = np.full((10, 10), 0.3, np.float32)
    prob[2:6, 2:4] = 0.7  # half the square
    save(tmp_path / "pred" / "a.tif", prob)
    with pytest.raises(
        KnowsamError,
        match=r"a.tif: float values 0.3, 0.7: a probability map\? Pass --pred-encoding "
        r"probability",
    ):
        score_folders(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(KnowsamError, match=r"a.tif: mask values 0.3, 0.7 are neither class ids nor 8- or 16-bit grey"):
        score_folders(tmp_path / "pred", tmp_path / "gt", encoding="labels")
    result = score_folders(tmp_path / "pred", tmp_path / "gt", encoding="probability")
    assert result.summary["mDice"] == pytest.approx(2 * 8 / (8 + 16))
    assert result.rules["prediction"] == {"probability = value > 0.5": 1}
    save(tmp_path / "pred" / "a.tif", prob * 4)
    with pytest.raises(KnowsamError, match=r"a.tif: values 1.2, 2.8 are not all probabilities in \[0, 1\]"):
        score_folders(tmp_path / "pred", tmp_path / "gt", encoding="probability")


# --- mask encodings (the policy of knowsam.data.masks, shared with preparation) -------------------


def score_cli(pred: Path, gt: Path, *extra: str) -> tuple[int, dict | None, str]:
    """``knowsam-bench score --format json``: (exit status, summary or None, stderr)."""
    import contextlib
    import io

    from knowsam.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["score", str(pred), str(gt), "--format", "json", *extra])
    return code, (json.loads(out.getvalue()) if out.getvalue() else None), err.getvalue()


def zero_one_masks(root: Path) -> list[np.ndarray]:
    """Three {0, 1} ground-truth masks (8-bit PNG) of different sizes."""
    masks = [square((40, 50), 5, 5, 12) // 255, square((30, 30), 4, 4, 10) // 255, square((24, 36), 0, 3, 20) // 255]
    for i, mask in enumerate(masks):
        save(root / "gt" / f"m{i}.png", mask)
    return masks


def test_zero_one_predictions_equal_to_zero_one_truth_score_one(tmp_path: Path) -> None:
    for i, mask in enumerate(zero_one_masks(tmp_path)):
        save(tmp_path / "pred" / f"m{i}.png", mask)
    code, summary, _ = score_cli(tmp_path / "pred", tmp_path / "gt", "--pred-encoding", "labels")
    assert code == 0 and summary["n"] == 3 and summary["mDice"] == 1.0 and summary["mIoU"] == 1.0
    # Without --pred-encoding, values 0 and 1 may as well be a probability map near 0: refused.
    code, summary, err = score_cli(tmp_path / "pred", tmp_path / "gt")
    assert code == 1 and summary is None and "m0.png: values 0 and 1 only" in err


def test_all_zero_predictions_against_zero_one_truth_score_zero(tmp_path: Path) -> None:
    for i, mask in enumerate(zero_one_masks(tmp_path)):
        save(tmp_path / "pred" / f"m{i}.png", np.zeros_like(mask))
    code, summary, _ = score_cli(tmp_path / "pred", tmp_path / "gt")
    assert code == 0 and summary["mDice"] == 0.0 and summary["recall"] == 0.0


def test_sixteen_bit_zero_one_truth_reads_as_foreground(tmp_path: Path) -> None:
    mask = square((20, 30), 3, 4, 9)
    save(tmp_path / "gt" / "a.png", (mask // 255).astype(np.uint16))
    save(tmp_path / "pred" / "a.png", mask)
    assert score_cli(tmp_path / "pred", tmp_path / "gt")[1]["mDice"] == 1.0


def voc_palette_mask(mask: np.ndarray) -> Image.Image:
    """Index 1 = (128, 0, 0) and 255 = the VOC border colour, as VOC-style label PNGs store them."""
    image = Image.fromarray((mask > 0).astype(np.uint8), mode="P")
    palette = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]
    image.putpalette(palette)
    return image


def test_zero_255_prediction_equal_to_palette_truth_scores_one(tmp_path: Path) -> None:
    masks = [square((40, 50), 5, 5, 12), square((30, 30), 4, 4, 10)]
    for i, mask in enumerate(masks):
        (tmp_path / "gt").mkdir(exist_ok=True)
        voc_palette_mask(mask).save(tmp_path / "gt" / f"v{i}.png")
        save(tmp_path / "pred" / f"v{i}.png", mask)
    assert Image.open(tmp_path / "gt" / "v0.png").mode == "P"
    code, summary, _ = score_cli(tmp_path / "pred", tmp_path / "gt")
    assert code == 0 and summary["mDice"] == 1.0


@pytest.mark.parametrize("encoding", ["red", "alpha", "grey-palette", "colour-jpeg"])
def test_colour_alpha_and_palette_truth_decode_as_the_mask(tmp_path: Path, encoding: str) -> None:
    mask = square((32, 40), 6, 8, 16)
    gt = tmp_path / "gt" / "a.png"
    gt.parent.mkdir()
    if encoding == "red":
        Image.fromarray(np.stack([mask, 0 * mask, 0 * mask], axis=-1)).save(gt)
    elif encoding == "alpha":  # black everywhere, the mask in the alpha channel
        Image.fromarray(np.stack([0 * mask] * 3 + [mask], axis=-1)).save(gt)
    elif encoding == "grey-palette":  # an optimiser's palette for a {0, 255} mask, white first
        image = Image.fromarray((mask == 0).astype(np.uint8), mode="P")
        image.putpalette([255, 255, 255, 0, 0, 0])
        image.save(gt)
    else:
        gt = gt.with_suffix(".jpg")
        Image.fromarray(np.stack([mask] * 3, axis=-1)).save(gt, quality=75)
    save(tmp_path / "pred" / "a.png", mask)
    assert score_folders(tmp_path / "pred", tmp_path / "gt").summary["mDice"] == 1.0


def test_transposed_prediction_is_refused_without_resize(tmp_path: Path) -> None:
    mask = square((30, 40), 5, 5, 12)
    save(tmp_path / "gt" / "a.png", mask)
    save(tmp_path / "gt" / "b.png", mask)
    save(tmp_path / "pred" / "a.png", mask.T.copy())
    save(tmp_path / "pred" / "b.png", mask)
    code, summary, err = score_cli(tmp_path / "pred", tmp_path / "gt")
    assert code == 1 and summary is None
    assert err.strip().splitlines() == [
        (
            f"error: {tmp_path / 'pred' / 'a.png'}: prediction size 30x40 differs from its mask's 40x30; "
            "1 of 2 prediction(s) differ in size from their masks (pass --resize to resize them)"
        )
    ]
    code, summary, err = score_cli(tmp_path / "pred", tmp_path / "gt", "--resize")
    assert code == 0 and summary["n"] == 2
    assert "1 of 2 prediction(s) resized to their mask's size (--resize)" in err


def test_exif_orientation_turns_prediction_and_mask_alike(tmp_path: Path) -> None:
    """A JPEG stored sideways with an EXIF 'rotate 90' tag is scored as displayed."""
    mask = square((30, 40), 5, 5, 12)
    save(tmp_path / "gt" / "a.png", mask)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are turned 90 degrees counter-clockwise
    save(tmp_path / "pred" / "a.jpg", np.rot90(mask, 1).copy(), exif=exif.tobytes(), quality=95)
    assert score_folders(tmp_path / "pred", tmp_path / "gt").summary["mDice"] == 1.0


def test_truth_folder_of_empty_masks_is_refused(tmp_path: Path) -> None:
    """{0, 1} masks misread (or masks in 1..127) would score a silent 100 against empty predictions."""
    for i in range(3):
        save(tmp_path / "gt" / f"m{i}.png", square((20, 20), 2, 2, 8) // 255 * 60)  # values {0, 60}
        save(tmp_path / "pred" / f"m{i}.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(KnowsamError, match=r"gt: 3 of 3 masks decode empty \(e.g. m0.png: mode L, values 0, 60\)"):
        score_folders(tmp_path / "pred", tmp_path / "gt")


def test_hidden_files_are_ignored(pairs: tuple[Path, Path]) -> None:
    pred, gt = pairs
    (pred / "._exact.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (gt / ".DS_Store").write_bytes(b"Bud1")
    assert score_folders(pred, gt).summary["n"] == 4


def test_out_naming_a_folder_or_an_unwritable_path_is_one_line(pairs: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    with pytest.raises(KnowsamError, match=r"report: --out names a folder"):
        score_command(*pairs, 0.5, tmp_path / "report", True)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(
        KnowsamError, match=r"file/scores.csv: cannot write the per-image CSV \((FileExists|NotADirectory)Error"
    ):
        score_command(*pairs, 0.5, tmp_path / "file" / "scores.csv", True)


def test_duplicate_stem_and_bad_threshold_are_refused(pairs: tuple[Path, Path]) -> None:
    pred, gt = pairs
    with pytest.raises(ConfigError, match="threshold"):
        score_folders(pred, gt, threshold=1.0)
    save(pred / "exact.jpg", square((40, 50), 5, 5, 12))
    with pytest.raises(KnowsamError, match="exact.jpg"):
        score_folders(pred, gt)


def test_no_common_stem_is_an_error(tmp_path: Path) -> None:
    save(tmp_path / "gt" / "a.png", square((10, 10), 2, 2, 4))
    save(tmp_path / "pred" / "b.png", square((10, 10), 2, 2, 4))
    with pytest.raises(KnowsamError, match="file stem"):
        score_folders(tmp_path / "pred", tmp_path / "gt")

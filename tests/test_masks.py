"""The mask-decoding policy, row by row of its table in docs/datasets.md ("Mask encodings")."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knowsam.data.masks import (
    EMPTY_SHARE_LIMIT,
    check_empty_share,
    decode_mask,
    grey_levels,
)
from knowsam.errors import KnowsamError

MASK = np.zeros((12, 16), np.uint8)
MASK[3:9, 4:12] = 1


def jpeg(array: np.ndarray, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer)


def palette(indices: np.ndarray, colours: list[int]) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(colours)
    return image


def rgba(colour: tuple[int, int, int], alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([np.full_like(alpha, c) for c in colour] + [alpha]))


ROWS = {
    "grey {0, 255}": Image.fromarray(MASK * 255),
    "grey {0, 1}": Image.fromarray(MASK),
    "16-bit {0, 1}": Image.fromarray(MASK.astype(np.uint16)),
    "16-bit {0, 65535}": Image.fromarray(MASK.astype(np.uint16) * 65535),
    "bilevel": Image.fromarray(MASK.astype(bool)),
    "VOC palette": palette(MASK, [0, 0, 0, 128, 0, 0]),
    "grey palette, white first": palette(1 - MASK, [255, 255, 255, 0, 0, 0]),
    "red": Image.fromarray(np.dstack([MASK * 255, 0 * MASK, 0 * MASK])),
    "grey as RGB": Image.fromarray(np.dstack([MASK * 255] * 3)),
    "alpha only (RGBA)": rgba((0, 0, 0), MASK * 255),
    "alpha only (LA)": Image.fromarray(np.dstack([np.full_like(MASK, 200), MASK * 255])),
    "RGBA, opaque": Image.fromarray(np.dstack([MASK * 255] * 3 + [np.full_like(MASK, 255)])),  # by colour
    "array {0, 1}": MASK,
    "array (H, W, 1) {0, 255}": (MASK * 255)[:, :, None],
    "array 16-bit {0, 1}": MASK.astype(np.uint16),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_each_encoding_decodes_to_the_mask(name):
    np.testing.assert_array_equal(decode_mask(ROWS[name]), MASK)


def test_grey_levels_keep_today_s_threshold_and_jpeg_noise():
    """{0, 255} masks, JPEG artefacts included, are read exactly as before: grey (luma) > 127."""
    noisy = jpeg(np.dstack([MASK * 255] * 3), quality=30)
    levels = np.asarray(noisy.convert("L"))
    assert 0 < np.count_nonzero((levels != 0) & (levels != 255))  # really noisy
    np.testing.assert_array_equal(decode_mask(noisy), (levels > 127).astype(np.uint8))
    np.testing.assert_array_equal(grey_levels(noisy), levels)
    grey = Image.fromarray(np.where(MASK > 0, 200, 100).astype(np.uint8))
    np.testing.assert_array_equal(decode_mask(grey), MASK)  # 100 is background, 200 foreground
    assert grey_levels(Image.fromarray(MASK)) is None  # {0, 1} is read by value


def test_multi_class_masks_by_value():
    ids = MASK.copy()
    ids[9:, :] = 3
    np.testing.assert_array_equal(decode_mask(Image.fromarray(ids), num_classes=4), ids)
    np.testing.assert_array_equal(decode_mask(palette(ids, [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]), 4), ids)
    with pytest.raises(KnowsamError, match=r"lab.png: mask values 0, 1, 7 are not all class ids 0..3"):
        decode_mask(np.where(ids == 3, 7, ids).astype(np.uint8), num_classes=4, source="lab.png")
    with pytest.raises(KnowsamError, match=r"colour-coded mask for a 4-class dataset"):
        decode_mask(ROWS["red"], num_classes=4)


def test_undecodable_masks_are_named():
    with pytest.raises(KnowsamError, match=r"m.tif: mask values 0.5 are neither class ids"):
        decode_mask(np.full((4, 4), 0.5, np.float32), source="m.tif")
    with pytest.raises(KnowsamError, match=r"m.npy: unsupported mask layout"):
        decode_mask(np.zeros((4, 4, 7), np.uint8), source="m.npy")


def test_empty_share_limit(tmp_path: Path):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    for path in paths:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    opener = Image.open
    assert check_empty_share(tmp_path, paths, [False] * 4, opener) == []
    assert check_empty_share(tmp_path, paths, [True, True, False, False], opener) == [
        f"{tmp_path}: 2 of 4 masks decode empty (e.g. 0.png: mode L, values 0)"
    ]  # at the limit: reported
    assert EMPTY_SHARE_LIMIT == 0.5
    with pytest.raises(
        KnowsamError,
        match=r": 3 of 4 masks decode empty \(e.g. 0.png: mode L, values 0\); "
        r"a misread mask encoding\?",
    ):
        check_empty_share(tmp_path, paths, [True, True, True, False], opener)

"""The mask-decoding policy: a mask in any encoding public datasets use -> class ids.

Preparation (the ground truth of training and evaluation) and ``knowsam-bench score``
decode every mask with ``decode_mask``, so a mask means the same thing everywhere. The
rule follows from the image's mode and the values present (the table in
docs/datasets.md, "Mask encodings"):

* palette images: by palette index (0 = background), unless every used palette entry
  is a grey, in which case the palette only compresses a grey mask and the grey rule applies;
* an alpha-only mask (LA/RGBA whose colour is one constant): by its alpha, as grey;
* colour images whose channels agree (grey stored as colour, JPEG chroma noise
  included): as grey (ITU-R 601-2 luma); other colour images: foreground where any
  channel is on (> 127); colour coding of several classes is refused;
* grey (8- or 16-bit) and bilevel images: values that are all class ids (0..K-1, so {0, 1}
  for a binary dataset) are read by value; other values are grey levels, foreground
  where the level is > 127 (16-bit: its top 8 bits), which keeps {0, 255} masks and their
  JPEG artefacts as they always were read. A multi-class dataset needs class ids.

A set in which most masks decode empty is refused (``check_empty_share``): that is what
a misread encoding looks like, and it would score 100 (empty prediction, empty mask).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from knowsam.errors import KnowsamError

# Above this share of empty masks a set is refused. Public segmentation sets are built
# from frames that show the structure (none of the 2,052 polyp masks is empty), so a
# majority of empty masks means a misread encoding, and its scores would mostly measure
# the empty-mask policy rather than segmentation. Fewer empty masks are listed in the
# fingerprint's problems.
EMPTY_SHARE_LIMIT = 0.5
# Largest spread between the channels of a pixel for a colour image to count as grey:
# JPEG chroma noise on grey masks stays well below it, a coloured label (red is
# (255, 0, 0), VOC's first class (128, 0, 0)) is far above it.
GREY_TOLERANCE = 48
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MAX_SHOWN = 8

MaskSource = Image.Image | np.ndarray


def decode_mask(mask: MaskSource, num_classes: int = 2, source: str | Path = "mask") -> np.ndarray:
    """(H, W) uint8 class ids; ``source`` names the file in errors."""
    levels, ids = _levels_or_ids(_as_image(mask, source), num_classes, source)
    return (levels > 127).astype(np.uint8) if levels is not None else ids


def grey_levels(mask: MaskSource, num_classes: int = 2, source: str | Path = "mask") -> np.ndarray | None:
    """The 8-bit grey levels when the policy reads ``mask`` by grey level (foreground > 127), else None.

    Scoring thresholds such levels as a probability map; preparation counts the levels
    between 0 and 255 (JPEG artefacts) that the threshold had to decide.
    """
    return _levels_or_ids(_as_image(mask, source), num_classes, source)[0]


def values_seen(mask: MaskSource) -> str:
    """The mode and the first distinct values (colours for multi-band images), for messages."""
    image = _as_image(mask, "mask")
    arr = np.asarray(image)
    values = (np.unique(arr.reshape(-1, arr.shape[-1]), axis=0) if arr.ndim == 3 else np.unique(arr)).tolist()
    shown = ", ".join(str(tuple(v) if isinstance(v, list) else v) for v in values[:_MAX_SHOWN])
    return f"mode {image.mode}, values {shown}{', ...' if len(values) > _MAX_SHOWN else ''}"


def check_empty_share(
    folder: Path, mask_paths: list[Path], empty: list[bool], open_mask: Callable[[Path], MaskSource]
) -> list[str]:
    """Refuse a set whose masks mostly decode empty; a problems line for any empty mask below the limit."""
    empty_paths = [path for path, is_empty in zip(mask_paths, empty) if is_empty]
    if not empty_paths:
        return []
    example = empty_paths[0]
    seen = f"e.g. {example.name}: {values_seen(open_mask(example))}"
    share = f"{len(empty_paths)} of {len(mask_paths)} masks decode empty"
    if len(empty_paths) > EMPTY_SHARE_LIMIT * len(mask_paths):
        raise KnowsamError(
            f"{folder}: {share} ({seen}); a misread mask encoding? See 'Mask encodings' in docs/datasets.md"
        )
    return [f"{folder}: {share} ({seen})"]


def _as_image(mask: MaskSource, source: str | Path) -> Image.Image:
    if isinstance(mask, Image.Image):
        return mask
    arr = mask
    if arr.ndim == 3 and arr.shape[2] == 1:  # a single-sample TIFF stored with its sample axis
        arr = arr[:, :, 0]
    try:
        return Image.fromarray(np.ascontiguousarray(arr))
    except (TypeError, ValueError):
        raise KnowsamError(f"{source}: unsupported mask layout (array {arr.dtype} of shape {arr.shape})") from None


def _levels_or_ids(image: Image.Image, num_classes: int, source) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(grey levels, None) for masks read by grey level, (None, class ids) for the others."""
    if image.mode in ("P", "PA"):
        return _palette(image, num_classes, source)
    if image.mode in ("LA", "RGBA"):
        bands = np.asarray(image)
        colour, alpha = bands[..., :-1], bands[..., -1]
        if alpha.min() != alpha.max() and (colour == colour[0, 0]).all():
            return _by_value(alpha, num_classes, source)
    if image.mode not in ("1", "L", "LA", "F", *_SIXTEEN_BIT):
        colour = np.asarray(image.convert("RGB"))
        spread = colour.max(axis=2) - colour.min(axis=2)
        if spread.size and spread.max() > GREY_TOLERANCE:
            if num_classes > 2:
                raise KnowsamError(
                    f"{source}: colour-coded mask for a {num_classes}-class dataset; "
                    f"store class ids 0..{num_classes - 1} as grey values"
                )
            return None, (colour > 127).any(axis=2).astype(np.uint8)
    if image.mode not in ("1", "F", *_SIXTEEN_BIT):
        return _by_value(np.asarray(image.convert("L")), num_classes, source)
    return _by_value(np.asarray(image), num_classes, source)


def palette_of(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A P or PA image's indices (H, W), its 256 RGB entries and the indices used; the used
    entries are all grey (R = G = B) when the palette only compresses a grey mask."""
    index = np.asarray(image.getchannel(0) if image.mode == "PA" else image)
    used = np.flatnonzero(np.bincount(index.ravel(), minlength=256))
    palette = np.zeros((256, 3), np.uint8)
    entries = np.asarray(image.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    palette[: len(entries)] = entries
    return index, palette, used


def _palette(image: Image.Image, num_classes: int, source) -> tuple[np.ndarray | None, np.ndarray | None]:
    index, palette, used = palette_of(image)
    colours = palette[used]
    if (colours == colours[:, :1]).all():  # a grey mask stored with a palette
        return palette[index, 0], None
    if num_classes == 2:
        return None, (index != 0).astype(np.uint8)
    if used.max() >= num_classes:
        raise KnowsamError(
            f"{source}: palette indices {used.tolist()[:_MAX_SHOWN]} are not all class ids 0..{num_classes - 1}"
        )
    return None, index.astype(np.uint8)


def _by_value(values: np.ndarray, num_classes: int, source) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Class ids when every value is one, else grey levels (8-bit, or the top 8 bits of 16-bit values)."""
    if values.dtype == bool:
        return None, values.astype(np.uint8)
    # bincount: far faster than sorting for the 8-bit masks nearly every dataset has
    if values.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    else:
        present = np.unique(values)
    if (
        present.size
        and present.min() >= 0
        and present.max() < num_classes
        and np.array_equal(present, np.rint(present))
    ):
        return None, values.astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in present[:_MAX_SHOWN].tolist())
    if num_classes > 2:
        raise KnowsamError(f"{source}: mask values {shown} are not all class ids 0..{num_classes - 1}")
    if values.dtype == np.uint8:
        return values, None
    if np.issubdtype(values.dtype, np.integer) and present.min() >= 0 and present.max() <= 0xFFFF:
        return (values >> 8).astype(np.uint8), None
    raise KnowsamError(f"{source}: mask values {shown} are neither class ids nor 8- or 16-bit grey levels")

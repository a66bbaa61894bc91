"""How ``knowsam-bench score`` reads a mask or prediction file: one policy for both, and the rule it applied.

A file is first sorted into one kind by its mode (the table in docs/evaluation.md, "Scoring other
predictions"): bilevel, grey (8- or 16-bit, grey stored as colour included), grey palette, palette,
colour, alpha (transparency varies and the visible pixels share one colour) or float. Then it is
read by one of these encodings:

* ``labels``: as a mask, by the policy of preparation (``knowsam.data.masks.decode_mask``), after
  refusing what that policy would have to guess: class ids in a lossy (JPEG) file, 16-bit levels
  that all fit in 8 bits, colour images of more than two colours or in a lossy file, two colours
  that both read as foreground, and colour that varies together with transparency. A transparent
  background is background whatever its colour. Ground truth is always read so.
* ``probability``: grey levels divided by their full scale (255, 65535; alpha likewise; floats as
  they are), foreground where that is above the threshold.
* ``colormap:<name>``: colours of matplotlib's colour map ``<name>`` turned back into the
  probability whose colour they are (entry i of N stands for i / (N - 1)).

``auto`` (the default for predictions) reads a file as a probability map or as a mask only where
it can only be one, or where both readings give the same foreground, and refuses the rest naming
what to pass: grey values that are all 0 and 1 (class ids, or a probability map near 0), 16-bit
levels below 256, a JPEG whose levels stay below 128, floats other than 0 and 1, and palettes or
colour images of more than two colours (a colour-mapped probability map or coloured labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from knowsam.data.masks import GREY_TOLERANCE, decode_mask, palette_of
from knowsam.errors import ConfigError, KnowsamError

PRED_ENCODINGS = ("auto", "labels", "probability", "colormap:<name>")
LOSSY_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Largest difference, per channel, between a colour of a colour-mapped file and the entry of its
# colour map it is read as: JPEG noise stays well below it, another colour map's colours do not.
COLORMAP_TOLERANCE = 24
_SHOWN = 6


@dataclass(frozen=True)
class Reading:
    """A file read by one rule: a mask, or probability levels (probability = levels / scale)."""

    rule: str
    mask: np.ndarray | None = None
    levels: np.ndarray | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class _Kind:
    name: str  # bilevel | grey | grey palette | palette | colour | alpha | float
    values: np.ndarray  # grey/alpha levels at their own depth, palette indices, RGB colours, floats
    source: Image.Image | np.ndarray  # what decode_mask reads for the labels encoding
    colours: int = 0  # distinct colours (palette, colour)


def parse_encoding(text: str) -> str:
    """The ``--pred-encoding`` value, checked (a colour map's name must be one matplotlib knows)."""
    if text in ("auto", "labels", "probability"):
        return text
    if text.startswith("colormap:"):
        _colormap_table(text.removeprefix("colormap:"))
        return text
    raise ConfigError(f"--pred-encoding {text!r}: expected auto, labels, probability or colormap:<name>")


def read_truth(image: Image.Image, path) -> Reading:
    """A ground-truth file, read as a mask (``labels``)."""
    return _labels(_kind(image, path), image, path)


def read_prediction(image: Image.Image, path, encoding: str, threshold: float) -> Reading:
    """A prediction file, read by ``encoding`` (see the module's docstring)."""
    if encoding.startswith("colormap:"):
        return _colormap(image, path, encoding.removeprefix("colormap:"), threshold)
    kind = _kind(image, path)
    if encoding == "labels":
        return _labels(kind, image, path)
    if encoding == "probability":
        return _probability(kind, image, path, threshold)
    _refuse_ambiguous(kind, image, path)
    if kind.name in ("palette", "colour", "float"):
        return _labels(kind, image, path)
    return _probability(kind, image, path, threshold)


def _lossy(image: Image.Image) -> bool:
    return image.format in LOSSY_FORMATS


def _rule(image: Image.Image, text: str) -> str:
    return f"{text} ({image.format})" if _lossy(image) else text


def _shown(values: np.ndarray) -> str:
    present = np.unique(values)
    text = ", ".join(f"{v:g}" for v in present[:_SHOWN].tolist())
    return text + (", ..." if present.size > _SHOWN else "")


def _kind(image: Image.Image, path) -> _Kind:
    source = image
    if image.mode in ("LA", "RGBA", "PA"):
        bands = np.asarray(image.convert("RGBA") if image.mode == "PA" else image)
        colour, alpha = bands[..., :-1], bands[..., -1]
        if alpha.min() != alpha.max():
            visible = colour[alpha > 0]
            if not (visible == visible[0]).all():
                raise KnowsamError(
                    f"{path}: colour and transparency both vary; which one is the mask? Store the "
                    "mask as grey levels, or in the alpha channel over one colour"
                )
            return _Kind("alpha", alpha, alpha)
        if image.mode != "PA":
            image = image.convert("L" if image.mode == "LA" else "RGB")
    if image.mode in ("P", "PA"):
        index, palette, used = palette_of(image)
        if (palette[used] == palette[used][:, :1]).all():  # a grey mask stored with a palette: read by level
            return _Kind("grey palette", palette[index, 0], source)
        return _Kind("palette", index, source, colours=used.size)
    if image.mode == "1":
        return _Kind("bilevel", np.asarray(image), source)
    if image.mode == "F":
        return _Kind("float", np.asarray(image), source)
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 0xFFFF:
            raise KnowsamError(f"{path}: values {_shown(values)} are neither class ids nor 8- or 16-bit grey levels")
        return _Kind("grey", values.astype(np.uint16), source)
    if image.mode != "L":
        colour = np.asarray(image.convert("RGB"))
        spread = colour.max(axis=2).astype(np.int16) - colour.min(axis=2)
        if spread.size and spread.max() > GREY_TOLERANCE:
            return _Kind("colour", colour, source, colours=np.unique(_packed(colour)).size)
        image = image.convert("L")
    return _Kind("grey", np.asarray(image), source)


def _packed(colour: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) uint8 -> one integer per pixel."""
    return (colour[..., 0].astype(np.uint32) << 16) | (colour[..., 1].astype(np.uint32) << 8) | colour[..., 2]


def _ids_only(values: np.ndarray) -> bool:
    return bool(values.size) and values.max() == 1 and values.min() >= 0 and np.isin(values, (0, 1)).all()


def _labels(kind: _Kind, image: Image.Image, path) -> Reading:
    if kind.name in ("grey", "alpha"):
        if _lossy(image) and 0 < kind.values.max() <= 127:
            raise KnowsamError(
                f"{path}: {image.format} mask with levels {_shown(kind.values)}, none above 127: "
                "class ids saved in a lossy format cannot be read back; save label masks as PNG"
            )
        if kind.values.dtype == np.uint16 and not _ids_only(kind.values) and 0 < kind.values.max() <= 255:
            raise KnowsamError(
                f"{path}: 16-bit mask whose levels ({_shown(kind.values)}) all lie below 256: 8-bit "
                "levels stored in 16 bits? Save it as 8-bit, or as {0, 65535}"
            )
    if kind.name == "colour" and (kind.colours > 2 or _lossy(image)):
        raise KnowsamError(
            f"{path}: {_rule(image, f'colour image of {kind.colours} colours')}: a colour mask is read "
            "only with two colours, background and label, in a lossless file; store the mask as grey "
            "{0, 255} or {0, 1}"
        )
    mask = decode_mask(kind.source, source=path) > 0
    if kind.name == "colour" and kind.colours > 1 and mask.all():
        raise KnowsamError(
            f"{path}: colour mask whose two colours both have a channel above 127: which one is the "
            "background? Store the mask as grey {0, 255} or {0, 1}"
        )
    return Reading(_rule(image, _mask_rule(kind)), mask=mask)


def _mask_rule(kind: _Kind) -> str:
    """The rule by which ``decode_mask`` read a file of this kind."""
    if kind.name in ("bilevel", "palette", "colour", "grey palette"):
        return {
            "bilevel": "bilevel: 1 = foreground",
            "palette": "palette index > 0",
            "colour": "colour: any channel > 127",
            "grey palette": "grey palette > 127",
        }[kind.name]
    if kind.name == "float" or _ids_only(kind.values):
        return "alpha {0, 1}: 1 = foreground" if kind.name == "alpha" else "class ids {0, 1}: 1 = foreground"
    if kind.values.dtype == np.uint16:
        return "16-bit grey > 32767"
    return "alpha > 127" if kind.name == "alpha" else "grey > 127"


def _probability(kind: _Kind, image: Image.Image, path, threshold: float) -> Reading:
    if kind.name in ("palette", "colour"):
        raise KnowsamError(
            f"{path}: {kind.name} image of {kind.colours} colours: --pred-encoding probability reads "
            "grey levels; pass --pred-encoding colormap:<name> for a colour-mapped probability map"
        )
    if kind.name == "bilevel":
        return Reading(_rule(image, "bilevel: 1 = foreground"), mask=kind.values.astype(bool))
    if kind.name == "float":
        values = kind.values
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise KnowsamError(f"{path}: values {_shown(values)} are not all probabilities in [0, 1]")
        return Reading(_rule(image, f"probability = value > {threshold:g}"), levels=values, scale=1.0)
    sixteen = kind.values.dtype == np.uint16
    scale = 65535 if sixteen else 255
    name = {"alpha": "alpha", "grey palette": "grey palette"}.get(kind.name, "16-bit grey" if sixteen else "grey")
    return Reading(_rule(image, f"probability = {name} / {scale} > {threshold:g}"), levels=kind.values, scale=scale)


def _refuse_ambiguous(kind: _Kind, image: Image.Image, path) -> None:
    """``auto``: refuse a prediction that a mask and a probability map would read differently."""
    labels_or = "pass --pred-encoding labels or --pred-encoding probability"
    if kind.name in ("grey", "alpha"):  # a grey palette's {0, 1} reads empty either way
        values = kind.values
        if _lossy(image) and 0 < values.max() <= 127:
            raise KnowsamError(
                f"{path}: {image.format} with levels {_shown(values)}, none above 127: class ids "
                "saved lossily (they cannot be read back), or a probability map below 0.5? Pass "
                "--pred-encoding probability if it is one"
            )
        if _ids_only(values):
            raise KnowsamError(
                f"{path}: values 0 and 1 only: class ids {{0, 1}}, or a probability map near 0? {labels_or}"
            )
        if values.dtype == np.uint16 and values.max() <= 255 and values.max() > 0:
            raise KnowsamError(
                f"{path}: 16-bit levels ({_shown(values)}) all below 256: 8-bit levels stored in "
                "16 bits, or a probability map near 0? Save it as 8-bit, or pass "
                "--pred-encoding probability"
            )
    if kind.name == "float" and not _ids_only(kind.values):
        raise KnowsamError(
            f"{path}: float values {_shown(kind.values)}: a probability map? Pass "
            "--pred-encoding probability (masks hold class ids 0 and 1)"
        )
    if kind.name in ("palette", "colour") and (kind.colours > 2 or _lossy(image)):
        raise KnowsamError(
            f"{path}: {kind.name} image of {kind.colours} colours: a colour-mapped probability map "
            "or coloured labels? Pass --pred-encoding colormap:<name> or --pred-encoding labels"
        )


def _colormap_table(name: str) -> np.ndarray:
    """The RGB entries (N, 3), 0-255, of matplotlib's colour map ``name``."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ConfigError(
            f"--pred-encoding colormap:{name}: unknown colour map {name!r} "
            "(matplotlib's names, e.g. viridis, jet, gray)"
        ) from None
    return np.rint(cmap(np.arange(cmap.N))[:, :3] * 255).astype(np.int16)


def _colormap(image: Image.Image, path, name: str, threshold: float) -> Reading:
    if image.mode in ("LA", "RGBA", "PA") and np.ptp(np.asarray(image.getchannel("A"))) > 0:
        raise KnowsamError(f"{path}: transparency varies; a colour-mapped probability map is opaque")
    colour = np.asarray(image.convert("RGB"))
    table = _colormap_table(name)
    unique, inverse = np.unique(_packed(colour), return_inverse=True)
    rgb = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], axis=1).astype(np.int16)
    nearest = np.empty(unique.size, np.int64)
    gap = np.empty(unique.size, np.int64)
    for start in range(0, unique.size, 4096):  # (colours, entries) distances a block at a time
        distance = np.abs(rgb[start : start + 4096, None, :] - table[None, :, :]).max(axis=2)
        nearest[start : start + 4096] = distance.argmin(axis=1)
        gap[start : start + 4096] = distance.min(axis=1)
    worst = int(gap.argmax())
    if gap[worst] > COLORMAP_TOLERANCE:
        raise KnowsamError(
            f"{path}: colour {tuple(rgb[worst].tolist())} is not one of colour map {name!r} "
            f"(its nearest entry differs by {gap[worst]} in a channel)"
        )
    levels = nearest[inverse.reshape(-1)].reshape(colour.shape[:2]).astype(np.uint16)
    return Reading(
        _rule(image, f"probability = colour map {name} > {threshold:g}"), levels=levels, scale=float(table.shape[0] - 1)
    )

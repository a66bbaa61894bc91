"""A small synthetic polyp dataset, so the whole pipeline runs offline in minutes on a CPU.

The frames imitate endoscopy (pinkish mucosa with smooth shading, vessels, folds, a
dark vignette and specular glints) with zero, one or two blob-shaped lesions. They
are written in the on-disk layout of the PraNet polyp protocol, so the very same
loader and evaluation code that reads the real data reads the demo:

    <root>/TrainDataset/{images,masks}/<stem>.{jpg,png}
    <root>/TestDataset/<set>/{images,masks}/<stem>.{jpg,png}

Every image is drawn from its own RNG, seeded by (seed, split name, index), so an
image does not change when more or fewer images are requested. The first test set
has the training distribution; later ones are a mild domain shift (another
mucosa hue, lower lesion contrast), like the unseen-centre polyp test sets.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from knowsam.errors import ConfigError, KnowsamError
from knowsam.fileio import swap_dir, write_bytes

DEMO_CITATION = (
    "knowsam-bench synthetic demo polyp dataset: procedurally generated endoscopy-like "
    "frames with blob-shaped lesions and exact masks. It contains no patient data, "
    "resembles real polyp data only loosely, and is meant for smoke-testing the "
    "pipeline; numbers measured on it say nothing about clinical performance."
)

TRAIN_SPLIT = "TrainDataset"
TEST_ROOT = "TestDataset"
DEFAULT_TEST_SETS: dict[str, int] = {"Demo-Kvasir": 40, "Demo-Colon": 40}
MARKER_FILE = "demo.json"  # identifies a folder this module may replace
_GENERATOR_ID = "knowsam.data.demo"
_JPEG_QUALITY = 90
_LESION_COUNT_PROBS = (0.1, 0.6, 0.3)  # P(0), P(1), P(2) lesions per frame


@dataclass(frozen=True)
class DemoStyle:
    """Appearance of one acquisition "centre"."""

    mucosa_rgb: tuple[float, float, float]  # mean background colour in [0, 1]
    lesion_contrast: tuple[float, float]  # range of the lesion's colour offset from the mucosa


TRAIN_STYLE = DemoStyle(mucosa_rgb=(0.78, 0.37, 0.32), lesion_contrast=(0.24, 0.46))
SHIFTED_STYLE = DemoStyle(mucosa_rgb=(0.77, 0.40, 0.315), lesion_contrast=(0.22, 0.40))

# Directions in which a lesion's colour departs from the mucosa: paler, yellowish,
# redder, darker. Mixing them keeps any single channel from separating lesions.
_LESION_TINTS = np.array(
    [[0.45, 0.75, 0.70], [0.35, 0.80, 0.20], [0.35, -0.65, -0.55], [-0.55, -0.60, -0.45]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class DemoSample:
    """One rendered frame with its ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool, True exactly on lesion pixels
    n_lesions: int


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 is stable across processes, unlike hash(); it tells splits apart.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to zero mean and unit std.

    Wide blurs run on a coarse grid and are upsampled bilinearly: the result looks the
    same and costs a fraction of a full-resolution blur with a kernel wider than the image.
    """
    step = max(1, int(sigma // 2))
    coarse_shape = (shape[0] // step + 2, shape[1] // step + 2)
    field = gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), sigma / step, mode="reflect")
    if step > 1:
        field = np.asarray(Image.fromarray(field).resize(shape[::-1], Image.BILINEAR))
    else:
        field = field[1 : shape[0] + 1, 1 : shape[1] + 1]
    return (field - field.mean()) / (field.std() + 1e-6)


def _background(rng: np.random.Generator, style: DemoStyle, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    shape = yy.shape
    side = min(shape)
    base = np.asarray(style.mucosa_rgb, np.float32) + rng.normal(0.0, 0.04, 3).astype(np.float32)
    rgb = np.broadcast_to(base, shape + (3,)).copy()
    rgb *= (1.0 + 0.12 * _smooth_field(rng, shape, side / 5))[..., None]
    rgb[..., 1] += 0.035 * _smooth_field(rng, shape, side / 4)  # slow hue drift
    # Folds: warped parallel ridges that brighten and darken the mucosa.
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(1.5, 3.5)
    warp = 1.5 * _smooth_field(rng, shape, side / 6)
    folds = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + warp)
    rgb *= (1.0 + rng.uniform(0.03, 0.09) * folds)[..., None]
    # Vessels: the zero set of band-passed noise is a network of thin curvy lines;
    # a second smooth field makes them patchy.
    lines = np.exp(-((_smooth_field(rng, shape, rng.uniform(2.0, 3.5)) / 0.12) ** 2))
    patches = 1.0 / (1.0 + np.exp(-2.5 * _smooth_field(rng, shape, side / 5)))
    vessels = rng.uniform(0.2, 0.45) * lines * patches
    rgb *= 1.0 - vessels[..., None] * np.array([0.35, 0.8, 0.7], np.float32)
    rgb += 0.02 * _smooth_field(rng, shape, 1.0)[..., None]  # fine mucosal grain
    return rgb


@dataclass(frozen=True)
class _LesionGeometry:
    centre: tuple[float, float]  # (y, x) in pixels
    radius: float  # radius of the circle of equal area before the boundary ripple
    elongation: float  # minor/major axis ratio

    @property
    def extent(self) -> float:
        """Upper bound of the distance from the centre to any lesion pixel."""
        return _MAX_RIPPLE * self.radius / np.sqrt(self.elongation)


_RIPPLE_AMPLITUDES = tuple(0.14 / (k - 1) for k in range(2, 6))  # harmonics 2..5, largest first
_MAX_RIPPLE = 1.0 + sum(_RIPPLE_AMPLITUDES)  # below 1.35: blobs stay star-shaped and smooth


def _place_lesions(rng: np.random.Generator, h: int, w: int, n_wanted: int) -> list[_LesionGeometry]:
    """Sample lesion geometries whose bounding circles keep a gap, so each is its own component.

    A bounded number of tries keeps rendering time fixed; a lesion that finds no room is dropped.
    """
    placed: list[_LesionGeometry] = []
    # Two lesions are drawn smaller, so that both usually fit with a gap between them.
    radius_range = (0.14, 0.30) if n_wanted == 1 else (0.10, 0.22)
    for _ in range(n_wanted):
        radius = min(h, w) * rng.uniform(*radius_range)
        elongation = rng.uniform(0.6, 1.0)
        for _attempt in range(20):
            candidate = _LesionGeometry((rng.uniform(0.18, 0.82) * h, rng.uniform(0.18, 0.82) * w), radius, elongation)
            if all(
                np.hypot(candidate.centre[0] - other.centre[0], candidate.centre[1] - other.centre[1])
                > candidate.extent + other.extent + 3
                for other in placed
            ):
                placed.append(candidate)
                break
    return placed


def _blob(
    rng: np.random.Generator, lesion: _LesionGeometry, yy_px: np.ndarray, xx_px: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse with a smooth radial-harmonic boundary.

    Returns the mask and the relative depth ``1 - rho / r(theta)`` (1 at the centre, 0 on
    the boundary, negative outside).
    """
    a = lesion.radius / np.sqrt(lesion.elongation)
    b = lesion.radius * np.sqrt(lesion.elongation)
    rot = rng.uniform(0, np.pi)
    dy, dx = yy_px - lesion.centre[0], xx_px - lesion.centre[1]
    u = (dx * np.cos(rot) + dy * np.sin(rot)) / a
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / b
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    boundary = np.ones_like(rho)
    for k, amplitude in enumerate(_RIPPLE_AMPLITUDES, start=2):
        boundary += rng.uniform(0.0, amplitude) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    depth = 1.0 - rho / boundary
    return depth > 0, depth


def _paint_lesion(
    rng: np.random.Generator,
    rgb: np.ndarray,
    style: DemoStyle,
    lesion: _LesionGeometry,
    mask: np.ndarray,
    depth: np.ndarray,
    yy_px: np.ndarray,
    xx_px: np.ndarray,
) -> None:
    """Shade a dome-like lesion into ``rgb``, touching only pixels of ``mask``."""
    tint = _LESION_TINTS[rng.integers(len(_LESION_TINTS))]
    tint = tint / np.linalg.norm(tint)
    colour = np.asarray(style.mucosa_rgb, np.float32) + rng.uniform(*style.lesion_contrast) * tint
    dome = np.sqrt(np.clip(1.0 - (1.0 - np.clip(depth, 0, 1)) ** 2, 0, 1))
    light = rng.uniform(0, 2 * np.pi)
    lit = ((yy_px - lesion.centre[0]) * np.sin(light) + (xx_px - lesion.centre[1]) * np.cos(light)) / lesion.radius
    shade = 0.78 + 0.28 * dome + 0.12 * lit * dome
    texture = 1.0 + 0.05 * _smooth_field(rng, mask.shape, 1.5)
    surface = colour * (shade * texture)[..., None]
    # Boundary pixels blend half with the mucosa, as a real rim does.
    alpha = (0.5 + 0.5 * np.clip(depth / 0.15, 0, 1)) * mask
    rgb += alpha[..., None] * (surface - rgb)


def _add_glints(rng: np.random.Generator, rgb: np.ndarray, yy_px: np.ndarray, xx_px: np.ndarray) -> None:
    """Small specular highlights, on mucosa and lesions alike, as wet tissue shows."""
    h, w = yy_px.shape
    for _ in range(rng.integers(1, 6)):
        cy, cx, size = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.8, 2.2)
        spot = np.exp(-((yy_px - cy) ** 2 + (xx_px - cx) ** 2) / (2 * size**2))
        rgb += (spot * rng.uniform(0.5, 0.9))[..., None] * (0.97 - rgb)


def render_sample(seed: int, split: str, index: int, style: DemoStyle = TRAIN_STYLE) -> DemoSample:
    """Render frame ``index`` of ``split``; the result depends only on the arguments."""
    rng = _image_rng(seed, split, index)
    w = int(rng.integers(104, 141))
    h = int(round(w * rng.uniform(0.74, 0.92)))  # landscape, like endoscopy frames
    yy_px, xx_px = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy_px / max(h, w), xx_px / max(h, w)
    rgb = _background(rng, style, yy, xx)

    mask = np.zeros((h, w), bool)
    lesions = _place_lesions(rng, h, w, n_wanted=int(rng.choice(3, p=_LESION_COUNT_PROBS)))
    for lesion in lesions:
        blob, depth = _blob(rng, lesion, yy_px, xx_px)
        _paint_lesion(rng, rgb, style, lesion, blob, depth, yy_px, xx_px)
        mask |= blob

    _add_glints(rng, rgb, yy_px, xx_px)
    # Vignette with an off-centre optical axis, overall exposure, sensor noise.
    oy, ox = rng.uniform(-0.08, 0.08, 2)
    r2 = ((yy - h / max(h, w) / 2 - oy) ** 2 + (xx - w / max(h, w) / 2 - ox) ** 2) / 0.25
    rgb *= (rng.uniform(0.85, 1.1) * (1.0 - rng.uniform(0.3, 0.55) * r2))[..., None]
    rgb += rng.normal(0.0, rng.uniform(0.01, 0.025), rgb.shape).astype(np.float32)
    image = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    return DemoSample(image=image, mask=mask, n_lesions=len(lesions))


def _encode(array: np.ndarray, image_format: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _write_split(folder: Path, seed: int, split: str, count: int, style: DemoStyle) -> None:
    # Stems differ between splits, as real test frames never share a name with training frames.
    stem_prefix = "train" if split == TRAIN_SPLIT else split.lower()
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)  # an empty split still has the full layout
    for index in range(count):
        sample = render_sample(seed, split, index, style)
        stem = f"{stem_prefix}_{index:04d}"
        write_bytes(folder / "images" / f"{stem}.jpg", _encode(sample.image, "JPEG", quality=_JPEG_QUALITY))
        write_bytes(folder / "masks" / f"{stem}.png", _encode(sample.mask.astype(np.uint8) * 255, "PNG"))


def _validate(seed: int, n_train: int, test_sets: dict[str, int]) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"demo seed must be a non-negative integer, got {seed!r}")
    counts = {TRAIN_SPLIT: n_train, **test_sets}
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"demo image count for {name!r} must be a non-negative integer, got {count!r}")
    for name in test_sets:
        if name in ("", ".", "..", TRAIN_SPLIT) or "/" in name or "\\" in name:
            raise ConfigError(f"demo test set name {name!r} is not a usable folder name")


def _is_replaceable(root: Path) -> bool:
    """Only an empty folder or an earlier demo may be replaced: never delete user data."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    try:
        marker = json.loads((root / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return not any(root.iterdir())
    return isinstance(marker, dict) and marker.get("generator") == _GENERATOR_ID


def generate_demo(
    root: Path, *, seed: int = 0, n_train: int = 200, test_sets: dict[str, int] | None = None
) -> dict[str, int]:
    """Write the demo dataset to ``root`` (replacing an earlier demo there); return image counts per split.

    The tree is built in a hidden sibling folder and renamed into place at the end, so
    an interrupted run leaves either the old tree or the new one, never a mix.
    """
    root = Path(root)
    test_sets = dict(DEFAULT_TEST_SETS if test_sets is None else test_sets)
    _validate(seed, n_train, test_sets)
    if not _is_replaceable(root):
        raise KnowsamError(f"demo output {root} exists and is not an earlier demo dataset; refusing to replace it")
    counts = {TRAIN_SPLIT: n_train, **test_sets}

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the dataset is meant to be shared
        _write_split(staging / TRAIN_SPLIT, seed, TRAIN_SPLIT, n_train, TRAIN_STYLE)
        for position, (name, count) in enumerate(test_sets.items()):
            style = TRAIN_STYLE if position == 0 else SHIFTED_STYLE
            _write_split(staging / TEST_ROOT / name, seed, name, count, style)
        marker = {"generator": _GENERATOR_ID, "description": DEMO_CITATION, "seed": seed, "counts": counts}
        write_bytes(staging / MARKER_FILE, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
        swap_dir(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts

"""Score a folder of predicted masks against a folder of ground-truth masks.

Conventions (the polyp protocol): files are paired by file stem; every pair is
evaluated at the ground-truth mask's own resolution; the headline numbers are
means of per-image values (``knowsam.metrics.summarize``).

* Ground truth: read as 8-bit grey, foreground = value > 127.
* Prediction: an 8-bit probability map (0-255) or binary mask; colour files are
  converted to grey (ITU-R 601-2 luma); foreground = value / 255 > threshold.
  A prediction whose size differs from its mask is first resized to the mask's
  size as a probability map (PIL's bilinear filter on float values, which also
  averages over the source footprint when shrinking) and thresholded after,
  so a low-resolution probability map is not blocky-upsampled as a hard mask.
* Distances are in pixels of the mask.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.table import Table

from knowsam.errors import ConfigError, KnowsamError
from knowsam.fileio import atomic_path
from knowsam.metrics import EMPTY_MASK_POLICY, SUMMARY_DEFINITIONS, binary_metrics, summarize

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PER_IMAGE_COLUMNS = ("name", "dice", "iou", "hd95", "asd", "precision", "recall", "hd_x095_paper")
SUMMARY_KEYS = ("n", "mDice", "mIoU", "HD95", "ASD", "precision", "recall")
_EXAMPLES = 5


@dataclass(frozen=True)
class ScoreResult:
    """Per-image table, headline summary and the names that could not be paired."""

    per_image: pd.DataFrame
    summary: dict[str, float | int]  # exactly SUMMARY_KEYS
    stats: dict[str, float | int | None]  # full ``summarize`` output, with stds
    predictions_without_mask: list[str]
    masks_without_prediction: list[str]

    @property
    def complete(self) -> bool:
        return not (self.predictions_without_mask or self.masks_without_prediction)


def _list_images(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise KnowsamError(f"{role} folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            clash = f"{found[path.stem].name}, {path.name}"
            raise KnowsamError(f"{role} folder {folder} has two images with stem {path.stem!r}: {clash}")
        found[path.stem] = path
    if not found:
        raise KnowsamError(f"{role} folder {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _read_grey(path: Path) -> Image.Image:
    """The image as 8-bit grey; deeper images are refused rather than silently clipped."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "F") or image.mode.startswith("I;"):
                raise KnowsamError(f"{path}: mode {image.mode} is not 8-bit; expected 8-bit grey (0-255) or colour")
            return image if image.mode == "L" else image.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise KnowsamError(f"cannot read image {path}: {exc}") from None


def _prediction_mask(path: Path, size: tuple[int, int], threshold: float) -> np.ndarray:
    image = _read_grey(path)
    if image.size != size:
        resized = image.convert("F").resize(size, Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float64) / 255.0 > threshold
    # The same rule on 8-bit values without a float copy: v / 255 > threshold is
    # monotone in v, so it holds from the first value where it does (threshold < 1
    # guarantees 255 qualifies).
    first = int(np.argmax(np.arange(256) / 255.0 > threshold))
    return np.asarray(image) >= first


def _score_pair(job: tuple[str, Path, Path, float]) -> dict[str, float | str]:
    name, pred_path, gt_path, threshold = job
    gt_image = _read_grey(gt_path)
    gt = np.asarray(gt_image) > 127
    pred = _prediction_mask(pred_path, gt_image.size, threshold)
    return {"name": name, **binary_metrics(pred, gt)}


def _run(jobs: list[tuple[str, Path, Path, float]], workers: int) -> list[dict[str, float | str]]:
    if workers <= 1 or len(jobs) < 2 * workers:
        return [_score_pair(job) for job in jobs]
    # fork where available: workers start at once with modules already imported
    # and need no ``__main__`` guard in the caller's script. They run only numpy,
    # scipy and PIL code, so threads of the parent (torch, BLAS) are never needed.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    chunk = max(1, len(jobs) // (8 * workers))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_score_pair, jobs, chunksize=chunk))


def score_folders(pred_dir: Path, gt_dir: Path, threshold: float = 0.5, workers: int = 2) -> ScoreResult:
    """Score every prediction that has a mask of the same stem; report the rest as unmatched."""
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold must be in [0, 1), got {threshold}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    preds = _list_images(Path(pred_dir), "prediction")
    masks = _list_images(Path(gt_dir), "ground-truth")
    names = sorted(preds.keys() & masks.keys())
    if not names:
        raise KnowsamError(
            f"no prediction in {pred_dir} shares a file stem with a mask in {gt_dir} "
            f"(e.g. {next(iter(preds))!r} vs {next(iter(masks))!r})"
        )
    rows = _run([(name, preds[name], masks[name], threshold) for name in names], workers)
    per_image = pd.DataFrame(rows)[list(PER_IMAGE_COLUMNS)]
    stats = summarize(per_image)
    return ScoreResult(
        per_image=per_image,
        summary={key: stats[key] for key in SUMMARY_KEYS},
        stats=stats,
        predictions_without_mask=sorted(preds.keys() - masks.keys()),
        masks_without_prediction=sorted(masks.keys() - preds.keys()),
    )


def _summary_table(result: ScoreResult, threshold: float) -> Table:
    table = Table(
        title=f"{result.summary['n']} images, foreground = prediction/255 > {threshold:g}",
        caption=f"{EMPTY_MASK_POLICY} Distances in pixels at the mask's resolution.",
        caption_justify="left",
    )
    for header in ("metric", "mean", "std", "definition"):
        table.add_column(header, justify="right" if header in ("mean", "std") else "left")
    for key in (*SUMMARY_KEYS[1:], "hd_x095_paper"):
        std = result.stats[f"{key}_std"]
        table.add_row(key, f"{result.stats[key]:.4f}", "-" if std is None else f"{std:.4f}", SUMMARY_DEFINITIONS[key])
    return table


def _report_unmatched(names: list[str], what: str) -> None:
    if names:
        more = ", ..." if len(names) > _EXAMPLES else ""
        print(f"{len(names)} {what}: {', '.join(names[:_EXAMPLES])}{more}", file=sys.stderr)


def score_command(pred_dir: Path, gt_dir: Path, threshold: float, out: Path | None, as_json: bool) -> int:
    """CLI body of ``score``: 0 when every file was paired, 1 when some were not (the rest is still scored)."""
    result = score_folders(pred_dir, gt_dir, threshold)
    if out is not None:
        with atomic_path(out) as tmp:
            result.per_image.to_csv(tmp, index=False)
    if as_json:
        print(json.dumps(result.summary))
    else:
        Console(file=sys.stdout).print(_summary_table(result, threshold))
    _report_unmatched(result.predictions_without_mask, f"prediction(s) without a ground-truth mask in {gt_dir}")
    _report_unmatched(result.masks_without_prediction, f"ground-truth mask(s) without a prediction in {pred_dir}")
    return 0 if result.complete else 1

"""Score a folder of predicted masks against a folder of ground-truth masks.

Conventions (the polyp protocol): files are paired by file stem; every pair is
evaluated at the ground-truth mask's own resolution; the headline numbers are
means of per-image values (``knowsam.metrics.summarize``).

* Both files are read by one policy (``knowsam.report.encodings``), which names the rule
  it applied to each; the table and ``--format json`` list them. Ground truth is read as a mask
  (preparation's policy, with its guesses refused); a prediction by ``--pred-encoding``:
  ``auto`` reads it as a probability map or a mask only where the readings cannot differ.
* Both are turned upright by their EXIF orientation first.
* A prediction whose size differs from its mask is refused, unless ``resize`` is
  given: then a probability map is resized to the mask's size as such (PIL's
  bilinear filter on float values, which also averages over the source footprint
  when shrinking) and thresholded after, so a low-resolution probability map is not
  blocky-upsampled as a hard mask; a mask is resized by nearest neighbour.
* A ground-truth folder whose masks mostly decode empty is refused.
* Distances are in pixels of the mask.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.table import Table

from knowsam import fileio
from knowsam.data.image_files import IMAGE_SUFFIXES, is_hidden, open_image
from knowsam.data.masks import check_empty_share
from knowsam.data.workers import map_in_workers
from knowsam.errors import ConfigError, KnowsamError, describe_error
from knowsam.metrics import EMPTY_MASK_POLICY, SCORE, binary_metrics, shown_in, summarize
from knowsam.report.encodings import Reading, parse_encoding, read_prediction, read_truth

# The registry's score metrics, a paper-only formula after the harness's own.
SHOWN = tuple(sorted(shown_in(SCORE), key=lambda m: m.paper_only))
PER_IMAGE_COLUMNS = ("name", *(m.key for m in SHOWN))
SUMMARY_KEYS = ("n", *(m.name for m in SHOWN if not m.paper_only))
_EXAMPLES = 5
WRITER = "knowsam-bench score"


@dataclass(frozen=True)
class ScoreResult:
    """Per-image table, headline summary and the names that could not be paired."""

    per_image: pd.DataFrame
    summary: dict[str, float | int]  # exactly SUMMARY_KEYS
    stats: dict[str, float | int | None]  # full ``summarize`` output, with stds
    predictions_without_mask: list[str]
    masks_without_prediction: list[str]
    resized: int  # predictions resized to their mask's size (only with ``resize``)
    rules: dict[str, dict[str, int]]  # "prediction" / "ground_truth" -> rule applied -> files

    @property
    def complete(self) -> bool:
        return not (self.predictions_without_mask or self.masks_without_prediction)


def _list_images(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise KnowsamError(f"{role} folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            clash = f"{found[path.stem].name}, {path.name}"
            raise KnowsamError(f"{role} folder {folder} has two images with stem {path.stem!r}: {clash}")
        found[path.stem] = path
    if not found:
        raise KnowsamError(f"{role} folder {folder} holds no image files (.png, .jpg, .tif, ... any format PIL reads)")
    return found


def _foreground(reading: Reading, size: tuple[int, int], threshold: float) -> np.ndarray:
    """Foreground of a file's ``reading`` at ``size`` (W, H), resized first where needed."""
    if reading.mask is not None:
        mask = reading.mask
        if mask.shape[::-1] != size:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)) > 0
        return mask
    levels, scale = reading.levels, reading.scale
    if levels.shape[::-1] != size:
        resized = Image.fromarray(levels.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float64) / scale > threshold
    if levels.dtype == np.uint8 and scale == 255:
        # The same rule on 8-bit values without a float copy: v / 255 > threshold is
        # monotone in v, so it holds from the first value where it does (threshold < 1
        # guarantees 255 qualifies).
        return levels >= int(np.argmax(np.arange(256) / 255.0 > threshold))
    return levels / scale > threshold


def _score_pair(job: tuple[str, Path, Path, float, bool, str]) -> dict:
    """Metrics of one pair; without ``resize``, a size mismatch is returned (to be refused) instead."""
    name, pred_path, gt_path, threshold, resize, encoding = job
    truth = read_truth(open_image(gt_path, "mask"), gt_path)
    pred = open_image(pred_path, "prediction")
    size = (truth.mask.shape[1], truth.mask.shape[0])
    row = {"name": name, "gt_empty": not truth.mask.any(), "resized": pred.size != size, "truth_rule": truth.rule}
    if pred.size != size and not resize:
        return {
            **row,
            "mismatch": f"{pred_path}: prediction size {pred.size[0]}x{pred.size[1]} differs from "
            f"its mask's {size[0]}x{size[1]}",
        }
    reading = read_prediction(pred, pred_path, encoding, threshold)
    return {**row, "prediction_rule": reading.rule, **binary_metrics(_foreground(reading, size, threshold), truth.mask)}


def _run(jobs: list[tuple[str, Path, Path, float, bool, str]], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) < 2 * workers:
        return [_score_pair(job) for job in jobs]
    return map_in_workers(_score_pair, jobs, workers, chunksize=max(1, len(jobs) // (8 * workers)))


def score_folders(
    pred_dir: Path, gt_dir: Path, threshold: float = 0.5, workers: int = 2, resize: bool = False, encoding: str = "auto"
) -> ScoreResult:
    """Score every prediction that has a mask of the same stem; report the rest as unmatched.

    Predictions are read by ``encoding`` (``knowsam.report.encodings``). A prediction of
    another size than its mask is refused unless ``resize``.
    """
    encoding = parse_encoding(encoding)
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
    rows = _run([(name, preds[name], masks[name], threshold, resize, encoding) for name in names], workers)
    mismatched = [row["mismatch"] for row in rows if "mismatch" in row]
    if mismatched:
        raise KnowsamError(
            f"{mismatched[0]}; {len(mismatched)} of {len(rows)} prediction(s) differ in size "
            "from their masks (pass --resize to resize them)"
        )
    check_empty_share(
        Path(gt_dir),
        [masks[row["name"]] for row in rows],
        [row["gt_empty"] for row in rows],
        lambda path: open_image(path, "mask"),
    )
    per_image = pd.DataFrame(rows)[list(PER_IMAGE_COLUMNS)]
    stats = summarize(per_image)
    return ScoreResult(
        per_image=per_image,
        summary={key: stats[key] for key in SUMMARY_KEYS},
        stats=stats,
        predictions_without_mask=sorted(preds.keys() - masks.keys()),
        masks_without_prediction=sorted(masks.keys() - preds.keys()),
        resized=sum(row["resized"] for row in rows),
        rules={
            "prediction": dict(Counter(row["prediction_rule"] for row in rows)),
            "ground_truth": dict(Counter(row["truth_rule"] for row in rows)),
        },
    )


def _rules_text(rules: dict[str, int]) -> str:
    return "; ".join(f"{rule} ({n})" for rule, n in rules.items())


def _summary_table(result: ScoreResult) -> Table:
    table = Table(
        title=f"{result.summary['n']} images. Predictions read as: {_rules_text(result.rules['prediction'])}. "
        f"Ground truth read as: {_rules_text(result.rules['ground_truth'])}.",
        caption=f"{EMPTY_MASK_POLICY} Distances in pixels at the mask's resolution.",
        caption_justify="left",
    )
    for header in ("metric", "mean", "std", "definition"):
        table.add_column(header, justify="right" if header in ("mean", "std") else "left")
    for m in SHOWN:
        std = result.stats[f"{m.name}_std"]
        table.add_row(m.name, f"{result.stats[m.name]:.4f}", "-" if std is None else f"{std:.4f}", m.definition())
    return table


def _report_unmatched(names: list[str], what: str) -> None:
    if names:
        more = ", ..." if len(names) > _EXAMPLES else ""
        print(f"{len(names)} {what}: {', '.join(names[:_EXAMPLES])}{more}", file=sys.stderr)


def score_command(
    pred_dir: Path,
    gt_dir: Path,
    threshold: float,
    out: Path | None,
    as_json: bool,
    resize: bool = False,
    encoding: str = "auto",
) -> int:
    """CLI body of ``score``: 0 when every file was paired, 1 when some were not (the rest is still scored)."""
    if out is not None:  # checked before the scoring, which can take minutes
        if out.is_dir():
            raise KnowsamError(f"{out}: --out names a folder; give the path of the per-image CSV file to write")
        fileio.claim_files(out.parent, [out.name], WRITER, inputs=[pred_dir, gt_dir])
    result = score_folders(pred_dir, gt_dir, threshold, resize=resize, encoding=encoding)
    if out is not None:
        try:
            with fileio.atomic_path(out) as tmp:
                result.per_image.to_csv(tmp, index=False)
            fileio.record_files(out.parent, [out.name], WRITER)
        except OSError as exc:
            raise KnowsamError(f"{out}: cannot write the per-image CSV ({describe_error(exc)})") from None
    if as_json:
        print(json.dumps({**result.summary, "decoding": result.rules}))
    else:
        Console(file=sys.stdout).print(_summary_table(result))
    _report_unmatched(result.predictions_without_mask, f"prediction(s) without a ground-truth mask in {gt_dir}")
    _report_unmatched(result.masks_without_prediction, f"ground-truth mask(s) without a prediction in {pred_dir}")
    if result.resized:
        print(
            f"{result.resized} of {result.summary['n']} prediction(s) resized to their mask's size (--resize)",
            file=sys.stderr,
        )
    return 0 if result.complete else 1

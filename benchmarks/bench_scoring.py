"""Time ``score_folders`` against a plain per-image medpy loop on the polyp test masks.

Every test mask of the offline mirror (Kvasir, CVC-ClinicDB, CVC-ColonDB,
CVC-300) is scored against a perturbed copy of itself (shifted, then eroded or
dilated), written as PNG predictions to a temporary folder. Both timings include
reading the PNGs; the medpy loop calls dc, jc, hd95, asd, precision, recall and
hd once per image, as evaluation scripts usually do. The two must agree.

Run from the repository root:
    python -m benchmarks.bench_scoring [--mirror DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import medpy.metric.binary as mb
import numpy as np
from PIL import Image
from scipy import ndimage

from knowsam.bench import cpu_seconds
from knowsam.data.sources import mirror_folder
from knowsam.report.score import score_folders

SUBSETS = ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300")
COLUMNS = ("dice", "iou", "hd95", "asd", "precision", "recall", "hd_x095_paper")


def perturb(gt: np.ndarray, index: int) -> np.ndarray:
    """A plausible imperfect prediction: shifted by up to 6 px, then eroded or dilated."""
    shifted = np.roll(gt, (index % 13 - 6, (index * 7) % 13 - 6), axis=(0, 1))
    if index % 3:
        changed = ndimage.binary_dilation(shifted, iterations=1 + index % 2)
    else:
        changed = ndimage.binary_erosion(shifted)
    return changed if changed.any() else shifted


def write_predictions(mirror: Path, out: Path) -> list[tuple[Path, Path]]:
    """Write one prediction folder per subset; return (prediction, mask) file pairs."""
    pairs = []
    for subset in SUBSETS:
        for mask_path in sorted((mirror / "polyp" / "TestDataset" / subset / "masks").glob("*.png")):
            gt = np.asarray(Image.open(mask_path).convert("L")) > 127
            pred_path = out / subset / mask_path.name
            pred_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(perturb(gt, len(pairs)).astype(np.uint8) * 255).save(pred_path)
            pairs.append((pred_path, mask_path))
    return pairs


def medpy_loop(pairs: list[tuple[Path, Path]]) -> np.ndarray:
    rows = []
    for pred_path, mask_path in pairs:
        pred = np.asarray(Image.open(pred_path).convert("L")) / 255.0 > 0.5
        gt = np.asarray(Image.open(mask_path).convert("L")) > 127
        values = (mb.dc(pred, gt), mb.jc(pred, gt), mb.hd95(pred, gt), mb.asd(pred, gt))
        rows.append((*values, mb.precision(pred, gt), mb.recall(pred, gt), 0.95 * mb.hd(pred, gt)))
    return np.array(rows)


def ours(mirror: Path, predictions: Path, workers: int) -> np.ndarray:
    test_sets = mirror / "polyp" / "TestDataset"
    tables = [
        score_folders(predictions / subset, test_sets / subset / "masks", workers=workers).per_image
        for subset in SUBSETS
    ]
    return np.concatenate([table[list(COLUMNS)].to_numpy() for table in tables])


def timed(function, *args) -> tuple[float, float, np.ndarray]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, help="offline data mirror (default: $KNOWSAM_MIRROR)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    mirror = mirror_folder(args.mirror)
    if mirror is None or not (mirror / "polyp" / "TestDataset").is_dir():
        raise SystemExit(f"no polyp mirror under {mirror or '(no mirror given)'}: pass --mirror or set KNOWSAM_MIRROR")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_predictions(mirror, Path(tmp))
        print(f"{len(pairs)} masks, {os.cpu_count()} CPUs, load average before timing {os.getloadavg()[0]:.2f}")
        parallel_s, parallel_cpu, parallel = timed(ours, mirror, Path(tmp), args.workers)
        serial_s, serial_cpu, serial = timed(ours, mirror, Path(tmp), 1)
        medpy_s, medpy_cpu, reference = timed(medpy_loop, pairs)
        load = os.getloadavg()[0]
    if not np.array_equal(parallel, serial):
        raise SystemExit("parallel and serial scoring differ")
    difference = np.abs(parallel - reference).max()
    print(f"{'':28}{'wall s':>8}{'CPU s':>8}")
    print(f"{f'score_folders, {args.workers} workers':28}{parallel_s:8.2f}{parallel_cpu:8.2f}")
    print(f"{'score_folders, 1 worker':28}{serial_s:8.2f}{serial_cpu:8.2f}")
    print(f"{'medpy per-image loop':28}{medpy_s:8.2f}{medpy_cpu:8.2f}")
    print(
        f"medpy / ours, wall: {medpy_s / parallel_s:.1f}x ({args.workers} workers), "
        f"{medpy_s / serial_s:.1f}x (1 worker)"
    )
    print(f"medpy / ours, CPU (1 worker): {medpy_cpu / serial_cpu:.1f}x; load average after timing {load:.2f}")
    print(f"largest absolute difference from medpy over all metrics: {difference:.3g}")
    if difference > 1e-9:
        raise SystemExit("results differ from medpy")


if __name__ == "__main__":
    main()

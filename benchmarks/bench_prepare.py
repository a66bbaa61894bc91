"""Time preparing the real polyp training set (1450 Kvasir-SEG + CVC-ClinicDB pairs) at 256 px.

The mirror's polyp folder is first acquired into a temporary raw root (hard links, so
no copying is timed); then ``prepare_frames`` prepares the training set alone
(no test sets) into a temporary folder. Wall time is the figure to compare with the
60 s target on 2 cores; CPU time (this process plus its worker processes) is printed
too, since unlike wall time it is not inflated by other load on the machine.

Run from the repository root:
    python -m benchmarks.bench_prepare [--mirror DIR] [--size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from knowsam.bench import cpu_seconds
from knowsam.data.acquire import acquire
from knowsam.data.frames import prepare_frames
from knowsam.data.sources import POLYP, mirror_folder

TARGET_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, help="offline data mirror (default: $KNOWSAM_MIRROR)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    mirror = mirror_folder(args.mirror)
    if mirror is None or not (mirror / "polyp" / "TrainDataset").is_dir():
        raise SystemExit(f"no polyp mirror under {mirror or '(no mirror given)'}: pass --mirror or set KNOWSAM_MIRROR")
    with tempfile.TemporaryDirectory() as tmp:
        raw = acquire("polyp", Path(tmp) / "raw", mirror=mirror, progress=False)
        print(
            f"{os.cpu_count()} CPUs, {args.workers} workers, {args.size} px; "
            f"load average before timing {os.getloadavg()[0]:.2f}"
        )
        wall, cpu = time.perf_counter(), cpu_seconds()
        meta = prepare_frames(
            raw,
            Path(tmp) / "prepared",
            POLYP,
            image_size=args.size,
            interpolation="bilinear",
            test_sets=[],
            workers=args.workers,
        )
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        load = os.getloadavg()[0]
    n = meta["train"]
    print(f"prepared {n} training pairs: {wall:.1f} s wall ({1000 * wall / n:.1f} ms per pair), {cpu:.1f} s CPU")
    print(
        f"load average after timing {load:.2f}; target <= {TARGET_S:.0f} s wall: "
        f"{'met' if wall <= TARGET_S else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

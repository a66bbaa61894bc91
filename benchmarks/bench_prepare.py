"""Time preparing the real polyp training set (1450 Kvasir-SEG + CVC-ClinicDB pairs) at 256 px.

The mirror's polyp folder is first acquired into a temporary raw root (hard links, so
no copying is timed); then ``prepare_polyp_layout`` prepares the training set alone
(no test sets) into a temporary folder. Wall time is the figure to compare with the
60 s target on 2 cores; CPU time (this process plus its worker processes) is printed
too, since unlike wall time it is not inflated by other load on the machine.

Run from the repository root:
    python -m benchmarks.bench_prepare [--mirror DIR] [--size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from knowsam.data.acquire import acquire
from knowsam.data.prepare import prepare_polyp_layout

TARGET_S = 60.0


def default_mirror() -> Path:
    configured = os.environ.get("KNOWSAM_MIRROR")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=default_mirror())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not (args.mirror / "polyp" / "TrainDataset").is_dir():
        raise SystemExit(f"no polyp mirror under {args.mirror}: pass --mirror or set KNOWSAM_MIRROR")
    with tempfile.TemporaryDirectory() as tmp:
        raw = acquire("polyp", Path(tmp) / "raw", mirror=args.mirror, progress=False)
        print(f"{os.cpu_count()} CPUs, {args.workers} workers, {args.size} px; "
              f"load average before timing {os.getloadavg()[0]:.2f}")
        wall, cpu = time.perf_counter(), cpu_seconds()
        meta = prepare_polyp_layout(raw, Path(tmp) / "prepared", dataset="polyp", image_size=args.size,
                                    interpolation="bilinear", test_sets=[], workers=args.workers)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        load = os.getloadavg()[0]
    n = meta["train"]
    print(f"prepared {n} training pairs: {wall:.1f} s wall ({1000 * wall / n:.1f} ms per pair), {cpu:.1f} s CPU")
    print(f"load average after timing {load:.2f}; target <= {TARGET_S:.0f} s wall: "
          f"{'met' if wall <= TARGET_S else 'NOT met'}")


if __name__ == "__main__":
    main()

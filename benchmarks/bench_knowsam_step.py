"""Median KnowSAM training-step time, before and after mixing starts, with a per-part breakdown.

Default setting: batch 8 (4 labeled), 256 px, ViT-B-sized SAM with random weights, 2 CPU threads,
2 classes. Run from the repository root:

    .venv/bin/python benchmarks/bench_knowsam_step.py [--steps 3] [--size 256] [--arch vit_b]

Timings depend on machine load: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from knowsam import step_timing
from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch
from knowsam.methods import MethodContext, get_method
from knowsam.methods.registry import method_params
from knowsam.train import apply_speed_options, batch_layout, keep_freed_memory, step_context


def step_in_context(method, batch: Batch, step: int, train: TrainParams) -> None:
    """One training step as the loop runs it (autocast if train.amp_bf16)."""
    with step_context(train, method.ctx.device):
        method.train_step(batch, step)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--labeled", type=int, default=4)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--arch", default="vit_b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each phase")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="train.amp_bf16")
    ap.add_argument("--channels-last", action="store_true", help="train.channels_last")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (training raises them: keep_freed_memory)",
    )
    ap.add_argument("--flops", action="store_true", help="also count one step's FLOPs per phase (load-independent)")
    ap.add_argument(
        "--full-sam-graph",
        action="store_true",
        help="sam_full_graph=True (SAM's graph over the whole batch, as the official code)",
    )
    return ap.parse_args()


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 matmul throughput right now: says how loaded the machine is."""
    m = torch.rand(n, n)
    m @ m
    start = time.perf_counter()
    for _ in range(repeats):
        m @ m
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    if not a.default_allocator:
        print(f"allocator: freed memory kept for reuse, as training does: {keep_freed_memory()}")
    print(f"float32 matmul on {a.threads} threads: {matmul_gflops():.0f} GFLOP/s")
    torch.manual_seed(0)
    iterations = 1000
    train = TrainParams(batch_size=a.batch, labeled_batch=a.labeled, amp_bf16=a.bf16, channels_last=a.channels_last)
    ctx = MethodContext(
        in_channels=3,
        num_classes=a.classes,
        image_size=a.size,
        iterations=iterations,
        train=train,
        sam=SamParams(arch=a.arch, checkpoint="none"),
        device=torch.device(a.device),
        seed=0,
    )
    method = get_method("knowsam")(ctx, method_params("knowsam", {"sam_full_graph": a.full_sam_graph}))
    apply_speed_options(method, train)
    method.train()
    n_u = a.batch - a.labeled
    dev = ctx.device
    batch = batch_layout(
        Batch(
            torch.rand(a.labeled, 3, a.size, a.size, device=dev),
            torch.randint(0, a.classes, (a.labeled, a.size, a.size), device=dev),
            torch.rand(n_u, 3, a.size, a.size, device=dev),
        ),
        train,
    )
    print(
        f"KnowSAM step: batch {a.batch} ({a.labeled} labeled), {a.size} px, SAM {a.arch} (random init), "
        f"{a.classes} classes, {a.threads} threads, device {a.device}, bf16={a.bf16}, "
        f"channels_last={a.channels_last}, sam_full_graph={a.full_sam_graph}"
    )
    for phase, step in (("before mixing", 10), ("after mixing", method.mix_after + 10)):
        assert method.mixing_at(step) == (phase == "after mixing")
        for _ in range(a.warmup):
            step_in_context(method, batch, step, train)
        totals, parts = [], {p: [] for p in step_timing.PARTS}
        for _ in range(a.steps):
            with step_timing.recording() as timings:
                start = time.perf_counter()
                step_in_context(method, batch, step, train)
                totals.append(time.perf_counter() - start)
            for p in step_timing.PARTS:
                parts[p].append(timings.get(p, 0.0))
        flops = ""
        if a.flops:
            with FlopCounterMode(display=False) as counter:
                step_in_context(method, batch, step, train)
            flops = f"; {counter.get_total_flops() / 1e9:.0f} GFLOP/step"
        parts["other (losses, bookkeeping)"] = [
            t - sum(parts[p][i] for p in step_timing.PARTS) for i, t in enumerate(totals)
        ]
        breakdown = ", ".join(f"{p} {statistics.median(v):.2f}" for p, v in parts.items())
        print(
            f"{phase}: median {statistics.median(totals):.2f} s/step over {a.steps} "
            f"(min {min(totals):.2f}, max {max(totals):.2f}){flops}; {breakdown}"
        )


if __name__ == "__main__":
    main()

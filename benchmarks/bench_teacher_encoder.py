"""Images per second of the LiteMedSAM encoder (the embed stage's work) under each speed option.

Options measured: batch size, bfloat16 autocast, thread count and ``torch.compile``. Each setting
runs one warm-up call, then ``--repeats`` timed calls on random 256 px images. Run from the
repository root:

    .venv/bin/python benchmarks/bench_teacher_encoder.py [--repeats 2] [--batches 1,4,8] [--threads 1,2]

Timings depend on machine load: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from knowsam.models.sam_teacher import SamTeacher


def images_per_second(encode, batch: int, repeats: int, bf16: bool) -> float:
    x = torch.rand(batch, 3, 256, 256)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        encode(x)  # warm-up (and compilation)
        start = time.perf_counter()
        for _ in range(repeats):
            encode(x)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of compilation)")
    a = ap.parse_args()
    teacher = SamTeacher("lite_medsam", 256, 1, encoder="cached").eval()
    encoders = {"eager": teacher.image_encoder}
    if a.compile:
        encoders["compiled"] = torch.compile(teacher.image_encoder)
    print("| encoder | threads | batch | bf16 autocast | images/s |\n|---|---|---|---|---|")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for name, encode in encoders.items():
            for batch in (int(b) for b in a.batches.split(",")):
                for bf16 in (False, True):
                    ips = images_per_second(encode, batch, a.repeats, bf16)
                    print(f"| {name} | {threads} | {batch} | {'yes' if bf16 else 'no'} | {ips:.3f} |", flush=True)


if __name__ == "__main__":
    main()

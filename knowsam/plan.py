"""``knowsam-bench plan``: what ``dvc repro`` is about to cost, before it starts.

Expands the active params into runs, counts those already complete, and times a few training
steps of every method on this machine at the params' image size, batch, SAM teacher, method
options and speed options (on the synthetic demo images: a step's time does not depend on pixel
content). A run's estimate is its iterations times the median step time; validation passes and
evaluation come on top. With a frozen, cached teacher encoder (``sam.encoder: cached``) the
``embed`` stage comes first: the images of each prepared dataset not yet in its cache times the
encoder's measured seconds per image (eager; ``train.compile`` makes the stage faster).

``--profile`` breaks each method's step into its parts (``knowsam.step_timing``) beside a
labeled-only step measured in the same process; ``--set KEY=VALUE`` plans other settings than
the params file's.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

import yaml

from knowsam import config, step_timing, validation
from knowsam.config import Params
from knowsam.errors import ConfigError
from knowsam.report.results import matrix
from knowsam.run_state import is_complete

# Above this much training on one device, a plan says the profile needs a faster machine.
FEASIBLE_SECONDS = 24 * 3600
REFERENCE = "labeled-only"  # the step every profiled method is compared with


@dataclasses.dataclass
class MethodPlan:
    method: str
    step_s: float
    runs: int
    pending: int

    def run_s(self, iterations: int) -> float:
        return self.step_s * iterations


def with_overrides(params: Params, overrides: list[str]) -> Params:
    """``params`` with each ``KEY=VALUE`` (a dotted key, a YAML value) set, checked as a params file is."""
    raw = config.to_dict(params)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. train.threads=2")
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{section}' is not a section of the params")
        node[leaf] = yaml.safe_load(text)
    return validation.validate(config.parse(raw))


def measure_steps(params: Params, methods: list[str], steps: int):
    """Each method's timed steps (``knowsam.bench.StepResult``) at the params' settings on this machine."""
    from knowsam.bench import StepSetting, demo_dataset, time_steps
    from knowsam.train import keep_freed_memory

    keep_freed_memory()  # step times as training sees them (without it, the teacher's decode ran 1.5-2x slower)
    t = params.train
    setting = StepSetting(
        label="plan",
        size=params.data.image_size,
        batch=t.batch_size,
        labeled=t.labeled_batch,
        sam=params.sam,
        warmup=1,
        steps=steps,
        methods=tuple(methods),
        train=t,
        method_params=params.method_params,
    )
    with tempfile.TemporaryDirectory(prefix="knowsam-plan-") as work:
        data, split = demo_dataset(Path(work), params.data.image_size, n_train=max(4 * t.batch_size, 16))
        return {m: time_steps(m, data, split, setting, t.threads or 2) for m in methods}


def measure_step_seconds(params: Params, methods: list[str], steps: int) -> dict[str, float]:
    """Median seconds per training step of each method at the params' settings on this machine."""
    return {m: r.median for m, r in measure_steps(params, methods, steps).items()}


def profile_steps(params: Params, methods: list[str], steps: int) -> dict:
    """Each method's median step and its parts (seconds), beside labeled-only's, measured in one process.

    ``teacher_s``: the SAM teacher's own parts (encoder, prompt heads, decoder forward, backward
    of L_sam); ``data``: waiting for the batch; ``other``: the rest of the step (losses,
    bookkeeping, and the forward passes of methods that do not mark them).
    """
    names = list(dict.fromkeys([REFERENCE, *methods]))
    results = measure_steps(params, names, steps)
    reference = results[REFERENCE].median
    rows = []
    for name in names:
        r = results[name]
        parts = {p: round(r.part_median(p), 4) for p in step_timing.PARTS if any(p in s for s in r.parts)}
        parts["data"] = round(statistics.median(r.waits), 4)
        rest = [t - w - sum(s.values()) for t, w, s in zip(r.totals, r.waits, r.parts)]
        parts["other"] = round(statistics.median(rest), 4)
        rows.append(
            {
                "method": name,
                "step_s": round(r.median, 4),
                "vs_reference": round(r.median / reference, 2),
                "teacher_s": round(r.part_median(*step_timing.TEACHER_PARTS), 4),
                "parts": parts,
            }
        )
    return {"reference": REFERENCE, "steps": steps, "methods": rows}


def measure_encoder_seconds(params: Params, images: int = 2) -> float:
    """Median seconds per image of the frozen teacher encoder (batch 1, random weights) on this machine."""
    import statistics
    import time

    import torch

    from knowsam.models.sam_teacher import SamTeacher

    s, size = params.sam, params.data.image_size
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = SamTeacher(s.arch, size, 2, 3, s.normalize_pixels, encoder="cached", decoder=s.decoder).eval()
        x = torch.rand(1, 3, size, size)
    times = []
    with torch.no_grad():
        for i in range(images + 1):  # the first call warms up
            start = time.perf_counter()
            teacher.encode(x)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def embed_plan(params: Params, image_seconds: float) -> list[dict]:
    """Per dataset: images the embed stage has still to encode (None before preparation) and its time."""
    from knowsam.data.dataset import PreparedDataset
    from knowsam.models import embedding_cache

    rows = []
    for dataset in params.datasets:
        folder = Path(params.data.prepared_root) / dataset
        if not folder.is_dir():
            rows.append({"dataset": dataset, "images": None, "pending": None, "seconds": None})
            continue
        data = PreparedDataset(folder)
        total = sum(len(data.index(part)) for part in embedding_cache.parts(data))
        done = embedding_cache.rows_done(Path(params.sam.embeddings_root) / dataset, data, params.sam.arch)
        pending = total - sum(done.values())
        rows.append(
            {"dataset": dataset, "images": total, "pending": pending, "seconds": round(pending * image_seconds, 1)}
        )
    return rows


def make_plan(
    params: Params,
    runs_root: str | Path = "data/runs",
    steps: int = 2,
    step_seconds: dict[str, float] | None = None,
    encoder_seconds: float | None = None,
) -> dict:
    """Runs, completed runs and time estimates; ``step_seconds`` (per method) and ``encoder_seconds``
    (per image) replace the measurements of what they give."""
    runs = matrix(params)
    done = {run for run in runs if is_complete(params, run, runs_root)}
    given = step_seconds or {}
    unmeasured = [m for m in params.methods if m not in given and any(r.method == m and r not in done for r in runs)]
    measured = {**(measure_step_seconds(params, unmeasured, steps) if unmeasured else {}), **given}
    per_method = [
        MethodPlan(
            m,
            measured.get(m, 0.0),
            sum(r.method == m for r in runs),
            sum(r.method == m and r not in done for r in runs),
        )
        for m in params.methods
    ]
    iterations = params.train.iterations
    total_s = sum(p.pending * p.run_s(iterations) for p in per_method)
    embed = None
    if params.sam.encoder == "cached":
        image_s = encoder_seconds if encoder_seconds is not None else measure_encoder_seconds(params)
        embed = {"image_s": round(image_s, 3), "datasets": embed_plan(params, image_s)}
    embed_s = sum(d["seconds"] or 0.0 for d in embed["datasets"]) if embed else 0.0
    return {
        "profile": params.profile,
        "device": params.train.device,
        "iterations": iterations,
        "runs": len(runs),
        "done": len(done),
        "pending": len(runs) - len(done),
        "methods": [
            {
                "method": p.method,
                "step_s": round(p.step_s, 4),
                "run_s": round(p.run_s(iterations), 1),
                "runs": p.runs,
                "pending": p.pending,
            }
            for p in per_method
        ],
        "pending_train_s": round(total_s, 1),
        "embed": embed,
        "pending_embed_s": round(embed_s, 1),
        "feasible": total_s + embed_s <= FEASIBLE_SECONDS,
    }


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(plan: dict) -> list[str]:
    """The plan's closing lines (the per-method table is drawn by the CLI)."""
    lines = []
    if plan.get("embed"):
        e = plan["embed"]
        parts = [
            f"{d['dataset']} {d['pending']} of {d['images']} images, about {duration(d['seconds'])}"
            if d["images"] is not None
            else f"{d['dataset']} not prepared yet (counted once it is)"
            for d in e["datasets"]
        ]
        unknown = any(d["images"] is None for d in e["datasets"])
        total = f"{'the prepared ones' if unknown else 'in all'} about {duration(plan['pending_embed_s'])}"
        lines.append(
            f"embed stage (frozen teacher encoder, {e['image_s']:.2f} s an image here): "
            f"{'; '.join(parts)}; {total}, before training."
        )
    lines.append(
        f"{plan['runs']} runs in profile '{plan['profile']}': {plan['done']} complete, {plan['pending']} to "
        f"train; training them one after another takes about {duration(plan['pending_train_s'])} "
        "(validation and evaluation come on top)."
    )
    if not plan["feasible"]:
        lines.append(
            f"This is more than {duration(FEASIBLE_SECONDS)} of computing on this machine "
            f"(train.device: {plan['device']}): run this profile on a GPU (see docs/scaling.md)."
        )
    return lines

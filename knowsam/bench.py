"""``knowsam-bench bench``: speed figures of this machine, written to ``reports/benchmarks.md``.

Measured, in this order: machine facts; median training-step time of every registered method
at the CPU profile and of a subset at a paper-sized configuration, each with the share of the
step spent waiting for data (``TrainStream.next_batch``); scoring throughput against a plain
per-image medpy loop; preparation throughput; ``knowsam-bench --help`` latency; ``dvc repro``
no-op time on a small complete pipeline in a temporary copy of the repository.

Training steps run on the synthetic demo images (step time does not depend on pixel content);
scoring and preparation use the offline mirror's polyp data when one is found, else synthetic
masks and the demo. ``--quick`` shrinks everything to a few seconds (for tests) and skips the
paper-sized steps and the pipeline timing. Wall-clock figures are inflated by other load on the
machine: the load average is reported at start and end.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from knowsam import fileio
from knowsam.config import SamParams, TrainParams
from knowsam.errors import KnowsamError
from knowsam.machine import cpu_model

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WRITER = "knowsam-bench bench"
DATA_WAIT_LIMIT = 0.05  # share of a CPU-profile step spent waiting for data


@dataclass(frozen=True)
class StepSetting:
    label: str
    size: int
    batch: int
    labeled: int
    sam: SamParams  # the teacher's settings; its weights never matter for timing (random init)
    warmup: int
    steps: int
    methods: tuple[str, ...] | None  # None: every registered method
    train: TrainParams = TrainParams()  # its speed options (amp_bf16, channels_last, compile) apply
    method_params: dict = field(default_factory=dict)  # per method, as params' method_params


@dataclass
class StepResult:
    method: str
    totals: list[float]
    waits: list[float]
    build_s: float
    parts: list[dict[str, float]] = field(default_factory=list)  # per timed step: seconds per part

    @property
    def median(self) -> float:
        return statistics.median(self.totals)

    def part_median(self, *names: str) -> float:
        """Median over the timed steps of the seconds spent in ``names`` together."""
        return statistics.median(sum(p.get(n, 0.0) for n in names) for p in self.parts)

    @property
    def wait_share(self) -> float:
        return sum(self.waits) / sum(self.totals)


@dataclass
class Report:
    quick: bool
    sections: list[str] = field(default_factory=list)

    def add(self, title: str, *lines: str) -> None:
        self.sections.append("\n".join([f"## {title}", "", *lines, ""]))


def load_text() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _figure(value: float) -> str:
    """A positive measurement with at least three significant digits and no exponent: on a loaded machine
    a ratio such as 0.03 must not print as 0.0."""
    if value <= 0:
        return f"{value:.2f}"
    return f"{value:.{max(1, 2 - math.floor(math.log10(value)))}f}"


def default_mirror() -> Path | None:
    """The mirror ``sources.mirror_folder`` finds, where it holds the polyp training set."""
    from knowsam.data.sources import mirror_folder

    path = mirror_folder()
    return path if path is not None and (path / "polyp" / "TrainDataset").is_dir() else None


# --- training steps -----------------------------------------------------------------------------
def demo_dataset(root: Path, size: int, n_train: int):
    """A demo dataset prepared at ``size`` px with a 50% labeled split; returns (data, split)."""
    from knowsam.data.dataset import PreparedDataset
    from knowsam.data.demo import generate_demo
    from knowsam.data.frames import prepare_frames
    from knowsam.data.sources import DEMO
    from knowsam.data.splits import read_split, write_split

    raw = root / "raw"
    if not raw.is_dir():
        generate_demo(raw, seed=0, n_train=n_train, test_sets={"Demo-Kvasir": 2})
    out = root / f"prepared-{size}"
    prepare_frames(raw, out, DEMO, image_size=size, interpolation="bilinear", test_sets=[], workers=1)
    data = PreparedDataset(out)
    split_file = root / f"split-{size}.json"
    write_split(data, split_file, 0.5, 0, 0.1)
    return data, read_split(split_file, data)


def stand_in_embeddings(method, data, s: StepSetting) -> np.ndarray | None:
    """Rows in the embed stage's shape and dtype when ``method`` has a cached teacher encoder (a step
    reads its batch's rows and never the encoder; their values do not change its time); None otherwise."""
    from knowsam.models.embedding_cache import DTYPE
    from knowsam.models.sam_teacher import embedding_shape

    if method.provenance().get("sam_encoder") != "cached":
        return None
    shape = (len(data.images("train")), *embedding_shape(s.sam.arch, s.size))
    return np.zeros(shape, DTYPE)


def time_steps(name: str, data, split, s: StepSetting, threads: int, deadline: float = float("inf")) -> StepResult:
    """Median-able step times of method ``name``: ``next_batch`` then ``train_step`` as training runs them
    (``s.train``'s speed options applied), after warm-up; each timed step's parts (``knowsam.step_timing``)."""
    import torch

    from knowsam import step_timing
    from knowsam.data.loader import TrainStream
    from knowsam.methods import MethodContext, get_method
    from knowsam.methods.registry import method_params
    from knowsam.train import apply_speed_options, batch_layout, step_context

    torch.manual_seed(0)
    iterations = 1000
    train = replace(
        s.train, iterations=iterations, batch_size=s.batch, labeled_batch=s.labeled, threads=threads, device="cpu"
    )
    ctx = MethodContext(
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=s.size,
        iterations=iterations,
        train=train,
        sam=replace(s.sam, checkpoint="none"),
        device=torch.device("cpu"),
        seed=0,
    )
    start = time.perf_counter()
    method = get_method(name)(ctx, method_params(name, s.method_params.get(name, {})))
    apply_speed_options(method, train)
    build_s = time.perf_counter() - start
    stream = TrainStream(
        data,
        split,
        label_pool=method.label_pool,
        uses_unlabeled=method.uses_unlabeled,
        batch_size=s.batch,
        labeled_batch=s.labeled,
        seed=0,
        device=ctx.device,
        augmentation=method.augmentation,
        teacher_embeddings=stand_in_embeddings(method, data, s),
        unlabeled_pool=method.unlabeled_pool,
    )
    method.train()
    totals, waits, parts = [], [], []
    # Mid-run iterations: ramps, EMA decay and KnowSAM's mixing are all in their steady state.
    for i in range(s.warmup + s.steps):
        with step_timing.recording() as timed:
            t0 = time.perf_counter()
            batch = batch_layout(stream.next_batch(), train)
            t1 = time.perf_counter()
            with step_context(train, ctx.device):
                method.train_step(batch, iterations // 2 + i)
            t2 = time.perf_counter()
        if i >= s.warmup:
            totals.append(t2 - t0)
            waits.append(t1 - t0)
            parts.append(timed)
            if t2 > deadline:  # out of time: keep what was timed (at least one step)
                break
    return StepResult(name, totals, waits, build_s, parts)


def log(message: str) -> None:
    """Progress of a long benchmark (a note: shown unless -q)."""
    LOG.info(f"bench: {message}")


def step_section(
    report: Report, s: StepSetting, work: Path, threads: int, n_train: int, budget_s: float | None = None
) -> list[StepResult]:
    """Step times of ``s.methods`` (every registered one if None); with a budget, later methods are
    skipped once the section has used it."""
    from knowsam.methods import method_names

    names = [m for m in (s.methods or method_names()) if m in method_names()]
    data, split = demo_dataset(work, s.size, n_train)
    results, started, out_of_time = [], time.perf_counter(), []
    for name in names:
        if budget_s is not None and time.perf_counter() - started > budget_s:
            out_of_time.append(name)
            continue
        deadline = started + budget_s if budget_s is not None else float("inf")
        results.append(time_steps(name, data, split, s, threads, deadline))
        log(f"{s.label}: {name} {results[-1].median:.3f} s/step")
    steps = sorted({len(r.totals) for r in results})
    lines = [
        f"{s.size} px, batch {s.batch} ({s.labeled} labeled; methods without unlabeled data take {s.batch} "
        f"labeled), SAM `{s.sam.arch}` ({s.sam.encoder} encoder) with random weights, {threads} threads, CPU; {s.warmup} warm-up "
        f"step(s), then {'/'.join(map(str, steps))} timed step(s) per method (fewer only where the time budget ran out); a step = `TrainStream.next_batch` + "
        f"`train_step` at a mid-run iteration. Demo images (step time does not depend on content).",
        "",
        "| method | median s/step | min | max | data wait (share of step) | build s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.median:.3f} | {min(r.totals):.3f} | {max(r.totals):.3f} | "
            f"{100 * r.wait_share:.2f}% | {r.build_s:.2f} |"
        )
    if s.methods is not None or out_of_time:
        skipped = [m for m in method_names() if m not in names]
        lines += [
            "",
            f"Measured: {', '.join(r.method for r in results)}. Not measured at this size (too slow "
            f"for the command's 10-minute budget on 2 cores): {', '.join(skipped + out_of_time) or 'none'}"
            + (
                f" ({', '.join(out_of_time)}: this section's {budget_s:.0f} s budget was used up)"
                if out_of_time
                else ""
            )
            + ".",
        ]
    report.add(f"Training step, {s.label}", *lines)
    return results


def data_path_section(report: Report, work: Path, s: StepSetting, results: list[StepResult], n_train: int) -> None:
    import torch

    from knowsam.data.augment import weak_augment
    from knowsam.data.loader import TrainStream

    data, split = demo_dataset(work, s.size, n_train)
    stream = TrainStream(
        data,
        split,
        label_pool="labeled",
        uses_unlabeled=True,
        batch_size=s.batch,
        labeled_batch=s.labeled,
        seed=0,
        device=torch.device("cpu"),
    )
    mapped = isinstance(stream.images, np.memmap) and isinstance(stream.masks, np.memmap)
    x = torch.rand(s.batch, data.in_channels, s.size, s.size)
    y = torch.zeros(s.batch, s.size, s.size, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    aug, batch_t = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        weak_augment(x, y, gen)
        aug.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stream.next_batch()
        batch_t.append(time.perf_counter() - t0)
    worst = max(results, key=lambda r: r.wait_share)
    verdict = "met" if worst.wait_share < DATA_WAIT_LIMIT else "NOT met"
    report.add(
        "Data path",
        f"- Prepared arrays are read memory-mapped: {'yes' if mapped else 'NO'} "
        f"(`{type(stream.images).__name__}` images, dtype {stream.images.dtype}; `{type(stream.masks).__name__}` masks).",
        "- Augmentation (`weak_augment`) is batched tensor ops over the whole batch (flips and rotations via "
        "`torch.where`/stacked views, per-image jitter as broadcast vectors; no per-image Python loop).",
        f"- At {s.size} px, batch {s.batch}: `next_batch` median {1000 * statistics.median(batch_t):.2f} ms "
        f"(of which `weak_augment` {1000 * statistics.median(aug):.2f} ms), 20 calls.",
        f"- Largest data-wait share of a training step at the CPU profile: {100 * worst.wait_share:.2f}% "
        f"({worst.method}); target < {100 * DATA_WAIT_LIMIT:.0f}%: {verdict}.",
    )


# --- scoring and preparation ------------------------------------------------------------------
def _perturb(gt: np.ndarray, i: int) -> np.ndarray:
    from scipy import ndimage

    moved = np.roll(gt, (i % 9 - 4, (i * 5) % 9 - 4), axis=(0, 1))
    changed = ndimage.binary_dilation(moved) if i % 2 else ndimage.binary_erosion(moved)
    return changed if changed.any() else moved


def _synthetic_masks(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = size * (0.3 + 0.05 * (i % 5)), size * (0.6 - 0.04 * (i % 4)), size * (0.12 + 0.02 * (i % 3))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / f"case{i:03d}.png")


def scoring_section(report: Report, work: Path, mirror: Path | None, n: int, workers: int) -> None:
    import medpy.metric.binary as mb
    from PIL import Image

    from knowsam.report.score import score_folders

    gt_dir, pred_dir = work / "score-gt", work / "score-pred"
    if mirror is not None:
        source = mirror / "polyp" / "TestDataset" / "Kvasir" / "masks"
        gt_dir.mkdir(parents=True)
        for path in sorted(source.glob("*.png"))[:n]:
            os.symlink(path, gt_dir / path.name)
        what = f"the first {n} Kvasir test masks of the mirror (original resolution)"
    else:
        _synthetic_masks(gt_dir, n, 256)
        what = f"{n} synthetic 256x256 masks (no mirror found)"
    pred_dir.mkdir(parents=True)
    gts = sorted(gt_dir.glob("*.png"))
    for i, path in enumerate(gts):
        gt = np.asarray(Image.open(path).convert("L")) > 127
        Image.fromarray(_perturb(gt, i).astype(np.uint8) * 255).save(pred_dir / path.name)

    def medpy_loop() -> None:
        for path in gts:
            pred = np.asarray(Image.open(pred_dir / path.name).convert("L")) / 255.0 > 0.5
            gt = np.asarray(Image.open(path).convert("L")) > 127
            mb.dc(pred, gt), mb.jc(pred, gt), mb.hd95(pred, gt), mb.asd(pred, gt)
            mb.precision(pred, gt), mb.recall(pred, gt), mb.hd(pred, gt)

    rows = []
    for label, fn in (
        (f"`score_folders`, {workers} workers", lambda: score_folders(pred_dir, gt_dir, workers=workers)),
        ("`score_folders`, 1 worker", lambda: score_folders(pred_dir, gt_dir, workers=1)),
        ("plain per-image medpy loop", medpy_loop),
    ):
        wall, cpu = time.perf_counter(), cpu_seconds()
        fn()
        rows.append((label, time.perf_counter() - wall, cpu_seconds() - cpu))
    medpy_s = rows[-1][1]
    lines = [
        f"{len(gts)} masks: {what}, each scored against a shifted and eroded/dilated copy of itself "
        "(PNG files; reading included). Metrics: Dice, IoU, HD95, ASD, precision, recall, HD.",
        "",
        "| scorer | wall s | images/s | CPU s | medpy wall / this wall |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, wall, cpu in rows:
        lines.append(
            f"| {label} | {wall:.2f} | {_figure(len(gts) / wall)} | {_figure(cpu)} | {_figure(medpy_s / wall)}x |"
        )
    report.add("Scoring throughput", *lines)


def preparation_section(
    report: Report, work: Path, mirror: Path | None, n: int, size: int, workers: int, n_demo: int
) -> None:
    from knowsam.data.frames import prepare_frames
    from knowsam.data.sources import POLYP

    raw = work / "prep-raw"
    if mirror is not None:
        src = mirror / "polyp" / "TrainDataset"
        images = sorted((src / "images").iterdir())[:n]
        for sub in ("images", "masks"):
            (raw / "TrainDataset" / sub).mkdir(parents=True)
        for img in images:
            mask = next((src / "masks").glob(img.stem + ".*"), None)
            if mask is not None:
                os.symlink(img, raw / "TrainDataset" / "images" / img.name)
                os.symlink(mask, raw / "TrainDataset" / "masks" / mask.name)
        what = f"The first {n} pairs of the mirror's polyp training set (Kvasir-SEG + CVC-ClinicDB)"
    else:
        raw = work / "raw"  # generated by the training section
        what = f"The {n_demo}-image demo training set (no mirror found)"
    wall, cpu = time.perf_counter(), cpu_seconds()
    meta = prepare_frames(
        raw, work / "prep-out", POLYP, image_size=size, interpolation="bilinear", test_sets=[], workers=workers
    )
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    count = meta["train"]
    report.add(
        "Preparation throughput",
        f"{what}, prepared at {size} px with {workers} worker(s) (read, check, resize, write arrays): "
        f"{count} pairs in {wall:.2f} s wall = **{count / wall:.1f} images/s** "
        f"({cpu:.2f} s CPU, {count / cpu:.1f} images per CPU-second).",
    )


# --- command line and pipeline ----------------------------------------------------------------
def cli_section(report: Report, runs: int) -> None:
    script = Path(sys.executable).with_name("knowsam-bench")
    cmd = [str(script), "--help"] if script.exists() else [sys.executable, "-m", "knowsam", "--help"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    report.add(
        "Command-line latency",
        f"`knowsam-bench --help` in a fresh process: median **{statistics.median(times):.2f} s** of {runs} "
        f"runs (min {min(times):.2f}, max {max(times):.2f}).",
    )


TINY_PIPELINE = """profile: demo
datasets: [demo]
methods: [labeled-only]
ratios: [0.5]
seeds: [0]
data: {raw_root: data/raw, prepared_root: data/prepared, splits_root: data/splits, mirror: null,
       image_size: 32, interpolation: bilinear, val_fraction: 0.1}
train: {iterations: 2, batch_size: 4, labeled_batch: 2, lr: 0.01, momentum: 0.9, weight_decay: 0.0001,
        eval_every: 1, checkpoint_every: 1, threads: 1, device: cpu, amp_bf16: false, channels_last: false,
        compile: false}
sam: {arch: tiny, checkpoint: none, cache_dir: ~/.cache/knowsam-bench, normalize_pixels: false}
eval: {resolution: original, overlay_images: 0}
method_params: {}
"""


def dvc_section(report: Report, work: Path, runs: int) -> None:
    """`dvc repro` on a complete, up-to-date pipeline: a temporary copy with a one-run matrix."""
    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if dvc is None:
        report.add("Pipeline no-op", "Not measured: `dvc` is not installed.")
        return
    copy = work / "pipeline"
    copy.mkdir()
    for name in ("knowsam", "stages"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, copy / name)
    (copy / "params.yaml").write_text(TINY_PIPELINE)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }

    def run(*args: str) -> float:
        t0 = time.perf_counter()
        done = subprocess.run([dvc, *args], cwd=copy, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"dvc {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-400:]}")
        return time.perf_counter() - t0

    try:
        run("init", "--no-scm", "-q")
        first = run("repro", "-q")
        noop = [run("repro", "-q") for _ in range(runs)]
        status = [run("status", "-q") for _ in range(runs)]
    except RuntimeError as exc:
        report.add("Pipeline no-op", f"Not measured: {exc}")
        return
    stages = len(
        [
            line
            for line in (copy / "dvc.lock").read_text().splitlines()
            if line.startswith("  ") and not line.startswith("   ")
        ]
    )
    report.add(
        "Pipeline no-op",
        "Measured on a temporary copy of the package, `stages/` and `dvc.yaml` with a one-run matrix "
        f"(demo, labeled-only, 32 px, 2 iterations; {stages} stages), not in the working repository "
        "(whose pipeline state may be incomplete or in use). Cost grows with the number of stages and the "
        "size of hashed dependencies.",
        "",
        "| command | median s | runs |",
        "|---|---:|---:|",
        f"| first `dvc repro` (runs every stage) | {first:.2f} | 1 |",
        f"| `dvc repro`, nothing changed | {statistics.median(noop):.2f} | {runs} |",
        f"| `dvc status`, nothing changed | {statistics.median(status):.2f} | {runs} |",
    )


def run_bench(out: Path, *, quick: bool = False, threads: int = 2, mirror: Path | None = None) -> Path:
    import torch

    from knowsam.train import keep_freed_memory

    out = Path(out)
    if out.is_dir():
        raise KnowsamError(f"{out}: --out names a folder; give the path of the Markdown report to write")
    fileio.claim_files(out.parent, [out.name], WRITER)  # before minutes of measuring
    torch.set_num_threads(threads)
    keep_freed_memory()  # step times as training sees them
    started, load_start = time.perf_counter(), load_text()
    mirror = mirror if mirror is not None else default_mirror()
    if quick:
        cpu = StepSetting(
            "CPU profile (quick: reduced)", 32, 4, 2, SamParams(arch="tiny", checkpoint="none"), 1, 2, None
        )
        paper = None
        n_train, n_scores, n_prep = 16, 6, 0
    else:
        from knowsam import config, validation

        prof = validation.load(config.profile_path("cpu"))
        cpu = StepSetting(
            "CPU profile", prof.data.image_size, prof.train.batch_size, prof.train.labeled_batch, prof.sam, 1, 3, None
        )
        paper = StepSetting(
            "paper-sized configuration",
            256,
            8,
            4,
            SamParams(arch="vit_b", checkpoint="none"),
            1,
            2,
            ("fully-supervised", "knowsam", "mt"),
        )
        n_train, n_scores, n_prep = 48, 60, 200
    report = Report(quick)
    report.add(
        "Machine",
        "| CPU | cores | torch | threads | Python | load average at start (1/5/15 min) |",
        "|---|---:|---|---:|---|---|",
        f"| {cpu_model()} | {os.cpu_count()} | {torch.__version__} | {threads} | "
        f"{platform.python_version()} | {load_start} |",
    )
    with tempfile.TemporaryDirectory(prefix="knowsam-bench-") as tmp:
        work = Path(tmp)
        results = step_section(report, cpu, work, threads, n_train)
        if paper is not None:  # leave about 2.5 minutes of the 10 for the sections after it
            step_section(
                report, paper, work, threads, n_train, budget_s=max(60.0, 420.0 - (time.perf_counter() - started))
            )
        else:
            report.add("Training step, paper-sized configuration", "Not measured (`--quick`).")
        data_path_section(report, work, cpu, results, n_train)
        scoring_section(report, work, None if quick else mirror, n_scores, workers=min(2, os.cpu_count() or 1))
        if quick:
            preparation_section(report, work, None, 0, cpu.size, 1, n_train)
        else:
            preparation_section(report, work, mirror, n_prep, 256, min(2, os.cpu_count() or 1), n_train)
        cli_section(report, 3 if quick else 5)
        if quick:
            report.add("Pipeline no-op", "Not measured (`--quick`).")
        else:
            dvc_section(report, work, 3)
    total = time.perf_counter() - started
    head = [
        "# Benchmarks",
        "",
        f"Written by `knowsam-bench bench{' --quick' if quick else ''}` on "
        f"{_dt.datetime.now().isoformat(timespec='seconds')} in {total:.0f} s. Wall-clock figures are "
        "inflated when other work shares the machine: compare the load averages "
        f"(start {load_start}; end {load_text()}).",
        "",
    ]
    out = Path(out)
    fileio.write_text(out, "\n".join(head + report.sections))
    fileio.record_files(out.parent, [out.name], WRITER)
    return out

"""The shared training loop: data, schedule, validation, checkpoint/resume and logging.

A run folder holds ``config.json`` (resolved configuration), ``checkpoint.pt`` (+ the
previous one, ``checkpoint.prev.pt``), ``best.pt`` (the weights the method's selection rule
keeps, by default those with the best validation Dice; what evaluation loads), ``train_log.json`` (the run's summary, written when it ends)
and ``live/`` (dvclive curves: the one record of losses and validation Dice per iteration).
Restarting the same command after a crash resumes from the newest readable checkpoint
and ends with exactly the metrics of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knowsam import fileio, run_state
from knowsam.config import Params
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.data.splits import read_split, split_path
from knowsam.dice import class_masks, dice
from knowsam.errors import KnowsamError
from knowsam.machine import pick_device
from knowsam.methods import Method
from knowsam.models import embedding_cache
from knowsam.runs import RunId, build_method, config_hash, run_config

LOG = logging.getLogger(__name__)

_KEEP_FREED_BYTES = 1 << 30  # glibc's mmap and trim thresholds while training (see keep_freed_memory)


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing every large block back to the OS.

    By default glibc serves blocks above 32 MiB with a fresh ``mmap`` and trims the heap top on
    free, so a training step at 256 px, whose activations are 30-130 MB each, page-faults every
    page of them again on every step: 5 U-Net steps at batch 8 took 2.9 M page faults and 9.5 s
    of kernel time, 3.3 s per step, against 0.5 M, 1.6 s and 2.3 s per step with both thresholds
    at 1 GiB. Only where memory comes from changes, not any value computed. Returns whether
    it applied (glibc only; other C libraries keep their behaviour).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library already loaded into this process
    if not hasattr(libc, "gnu_get_libc_version"):  # the parameter numbers below are glibc's
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, _KEEP_FREED_BYTES)) and bool(
        libc.mallopt(m_trim_threshold, _KEEP_FREED_BYTES)
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validation_arrays(
    data: PreparedDataset, split: dict, teacher_cache: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Validation images, masks at training size and the cached teacher embeddings of the images
    (None without a cache): held-out training cases, or the dataset's own val part."""
    if data.meta.get("has_val"):
        return (
            data.images("val"),
            np.load(data.root / "val_masks.npy", mmap_mode="r"),
            None if teacher_cache is None else teacher_cache["val"],
        )
    if not split["validation"]:
        return None
    index = data.index("train")
    rows = np.flatnonzero(index["case"].isin(set(split["validation"])).to_numpy())
    return (
        data.images("train")[rows],
        data.masks()[rows],
        None if teacher_cache is None else teacher_cache["train"][rows],
    )


@torch.no_grad()
def validation_dice(
    method: Method,
    images: np.ndarray,
    masks: np.ndarray,
    embeddings: np.ndarray | None,
    device: torch.device,
    variant: str | None = None,
    batch: int = 16,
) -> float:
    """Mean over images and foreground classes of Dice at training size (both empty: the method's rule, 1 by default).

    ``variant`` scores one of the method's extra outputs (the SAM teacher's own prediction) instead
    of the reported one; ``embeddings`` are the teacher's cached embeddings of ``images``, if any.
    """
    method.eval()
    scores = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(to_float(np.asarray(images[start : start + batch]))).to(device)
        emb = None if embeddings is None else torch.from_numpy(np.array(embeddings[start : start + batch])).to(device)
        pred = class_masks(method.predict(x, variant, emb).argmax(1).cpu().numpy(), method.ctx.num_classes)
        gt = class_masks(masks[start : start + batch], method.ctx.num_classes)
        # class-major within each batch, the order the mean has always summed in (the same float result)
        scores.append(torch.from_numpy(dice(pred, gt, 2, both_empty=method.validation_empty_score).ravel()))
    method.train()
    return float(torch.cat(scores).mean())


def selection_score(method: Method, val_dice: float | None, window: list[float]) -> float | None:
    """What ``best.pt`` maximises at an evaluation (None: nothing to select by): the validation Dice,
    or, for a method with a ``selection_loss``, minus that term's mean since the previous evaluation."""
    if method.selection_loss:
        return -window[0] / window[1]
    return val_dice


def apply_speed_options(method: Method, t) -> None:
    """``train.channels_last`` / ``train.compile`` on every net of ``method`` (speed, not maths)."""
    for net in method.speed_modules():
        if t.channels_last:
            net.to(memory_format=torch.channels_last)
        if t.compile:
            net.compile()  # in place: state_dict keys stay those of the plain module


def step_context(t, device: torch.device):
    """bfloat16 autocast around a whole ``train_step`` if ``train.amp_bf16`` (no GradScaler needed for bf16)."""
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if t.amp_bf16 else contextlib.nullcontext()


def batch_layout(batch, t):
    """Input images in channels-last layout if ``train.channels_last``."""
    if not t.channels_last:
        return batch
    import dataclasses

    return dataclasses.replace(
        batch,
        x_l=batch.x_l.contiguous(memory_format=torch.channels_last),
        x_u=batch.x_u.contiguous(memory_format=torch.channels_last),
    )


@dataclass
class _Session:
    """One run being trained in this process: what ``_setup`` builds and every later part reads."""

    params: Params
    run: RunId
    dist: Any  # knowsam.distributed.Context
    method: Method
    stream: Any  # knowsam.data.loader.TrainStream
    val: tuple | None  # validation_arrays
    run_dir: Path
    cfg: dict
    chash: str
    started: float = 0.0  # perf_counter when this session's iterations began


@dataclass
class _Progress:
    """Where training stands: what a checkpoint saves besides weights, streams and RNG."""

    step: int = 0
    best: dict = field(default_factory=lambda: {"dice": -1.0, "step": -1, "score": -math.inf})
    record: dict = field(default_factory=dict)  # the last iteration's losses (and validation Dice)
    window: list = field(default_factory=lambda: [0.0, 0])  # selection_loss sum and count since the last evaluation


def train_run(
    params: Params,
    run: RunId,
    *,
    runs_root: str | Path = "data/runs",
    progress: bool = True,
    lines: bool = False,
    restart_stale: bool = False,
) -> dict:
    """Train one (method, dataset, ratio, seed) run to completion, resuming if possible.

    ``progress``: a progress bar; ``lines``: one line per validation on stderr (step, validation Dice,
    the best so far, losses, seconds per step, time left), readable in a log where no bar is drawn.
    Restarting the same command after a crash resumes from the newest readable checkpoint and ends
    with exactly the metrics of an uninterrupted run (on CPU).

    Under ``torchrun`` the run is data-parallel over the launched processes (``knowsam.distributed``).
    """
    s = _setup(params, run, runs_root)
    # One process per run folder; under torchrun rank 0 holds it for the whole group.
    # SIGINT and SIGTERM raise in the main thread (knowsam.cli.main) and unwind through the atomic writes:
    # no temporary file is left and the next run resumes from the last checkpoint.
    with run_state.run_lock(s.run_dir) if s.dist.is_main else contextlib.nullcontext():
        at, resumed = _resume(s, restart_stale)
        live = _open_live(s, runs_root, at.step if resumed else None)
        feedback = _Feedback(
            progress and s.dist.is_main, lines and s.dist.is_main, run, params.train.iterations, at.step
        )
        s.started = time.perf_counter()
        _loop(s, at, live, feedback)
        run_state.end_live(live)
        return _finish(s, at)


def _setup(params: Params, run: RunId, runs_root: str | Path) -> _Session:
    """Threads, process group, data, split, the method (seeded) and its training stream; nothing on disk yet."""
    from knowsam import distributed
    from knowsam.data.loader import TrainStream

    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    keep_freed_memory()
    dist = distributed.setup(pick_device(params.train.device))  # one process unless launched by torchrun
    data = PreparedDataset(Path(params.data.prepared_root) / run.dataset)
    split = read_split(split_path(params.data.splits_root, run.dataset, run.ratio, run.seed), data)
    cfg = run_config(params, run)
    if dist.enabled:  # batches (and so results) depend on the number of processes
        cfg["distributed"] = {"world_size": dist.world}

    seed_everything(run.seed)
    method = build_method(params, run, data, dist.device)
    apply_speed_options(method, params.train)
    dist.prepare(method)  # rank 0's weights everywhere; optimisers average gradients over ranks
    if dist.rank:  # same initial weights on every rank (seeded above); own dropout draws from here on
        seed_everything(dist.stream_seed(run.seed))
    batch_size, labeled_batch = dist.shard(params.train.batch_size, params.train.labeled_batch, method.uses_unlabeled)
    cache = embedding_cache.open_for_teacher(
        params.sam.embeddings_root, run.dataset, data, method.provenance(), params.train.amp_bf16
    )
    stream = TrainStream(
        data,
        split,
        label_pool=method.label_pool,
        uses_unlabeled=method.uses_unlabeled,
        batch_size=batch_size,
        labeled_batch=labeled_batch,
        seed=dist.stream_seed(run.seed),
        device=dist.device,
        augmentation=method.augmentation,
        teacher_embeddings=None if cache is None else cache["train"],
        unlabeled_pool=method.unlabeled_pool,
    )
    return _Session(
        params=params,
        run=run,
        dist=dist,
        method=method,
        stream=stream,
        val=validation_arrays(data, split, cache),
        run_dir=run.train_dir(runs_root),  # created only once the method builds (no empty folder on error)
        cfg=cfg,
        chash=config_hash(cfg),
    )


def _resume(s: _Session, restart_stale: bool) -> tuple[_Progress, bool]:
    """The run folder made ready and the newest checkpoint of this configuration loaded, if any;
    returns where training stands and whether it resumed."""
    dist, run_dir = s.dist, s.run_dir
    state = run_state.load_checkpoint(run_dir, s.chash, restart_stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_state.remove_partial_files(run_dir)
    dist.barrier()  # no rank removes a temporary file that rank 0 is writing
    at = _Progress()
    if state is not None:
        s.method.load_state_dict(state["method"])
        s.stream.load_state_dict(dist.own(state)["stream"])
        run_state.set_rng_state(dist.own(state)["rng"])
        at = _Progress(state["step"], state["best"], state["last_record"], state["selection_window"])
    if dist.is_main and at.step < s.params.train.iterations:  # its summary is written again only when it ends
        (run_dir / "train_log.json").unlink(missing_ok=True)
    if dist.is_main:
        fileio.write_json(run_dir / "config.json", {**s.cfg, "config_hash": s.chash})
    return at, state is not None


def _open_live(s: _Session, runs_root: str | Path, resumed_at: int | None):
    """The run's dvclive logger on rank 0 (rewound to the checkpoint when resuming); a no-op logger elsewhere."""
    from knowsam import distributed

    if not s.dist.is_main:
        return distributed.NullLive()
    from dvclive import Live

    live = Live(str(s.run.live_dir(runs_root)), resume=resumed_at is not None, save_dvc_exp=False, dvcyaml=None)
    if resumed_at is not None:
        run_state.rewind_live(live, resumed_at)
    return live


def _loop(s: _Session, at: _Progress, live, feedback: _Feedback) -> None:
    """Iterations from ``at.step`` to the end: step, log, validate, checkpoint."""
    t, method, dist, run = s.params.train, s.method, s.dist, s.run
    method.train()
    with feedback:
        while at.step < t.iterations:
            batch = batch_layout(s.stream.next_batch(), t)
            with step_context(t, dist.device):
                losses = method.train_step(batch, at.step)
            dist.after_step()  # rank 0's BatchNorm statistics everywhere
            losses = dist.average(losses)
            for term, value in losses.items():
                if not math.isfinite(value):
                    raise KnowsamError(
                        f"{run.method} on {run.dataset}: loss term '{term}' is {value} at iteration "
                        f"{at.step}; stopped, last good checkpoint kept in {s.run_dir}"
                    )
            at.step += 1
            if method.selection_loss:
                at.window = [at.window[0] + losses[method.selection_loss], at.window[1] + 1]
            for term, value in losses.items():
                live.log_metric(f"train/{term}", value)
            at.record = {"step": at.step, **{k: round(v, 6) for k, v in losses.items()}}
            if at.step % t.eval_every == 0 or at.step == t.iterations:
                _validate(s, at, live)
                feedback.validated(at.step, losses, at.record.get("val_dice"), at.best)
            live.next_step()
            feedback.advance(losses)
            if at.step % t.checkpoint_every == 0 or at.step == t.iterations:
                _checkpoint(s, at)


def _validate(s: _Session, at: _Progress, live) -> None:
    """Validation Dice of the reported output and of each variant (rank 0), and ``best.pt`` by the selection rule."""
    method, dist = s.method, s.dist
    if dist.is_main and s.val is not None:
        dice = validation_dice(method, *s.val, dist.device)
        live.log_metric("val/dice", dice)
        at.record["val_dice"] = dice
        # e.g. the SAM teacher: does it learn? and each student (not used to pick weights)
        for variant in (*method.variants, *method.curve_variants):
            at.record[f"val_dice_{variant}"] = validation_dice(method, *s.val, dist.device, variant)
            live.log_metric(f"val/dice_{variant}", at.record[f"val_dice_{variant}"])
    if dist.is_main:
        score = selection_score(method, at.record.get("val_dice"), at.window)
        # Ties keep the earlier weights by Dice, the later by a loss (the official `<=`).
        tie = score == at.best["score"] and method.selection_loss is not None
        if score is not None and (score > at.best["score"] or tie):
            at.best = {"dice": at.record.get("val_dice"), "step": at.step, "score": score}
            run_state.save_weights(s.run_dir / "best.pt", method, at.step)
    at.window = [0.0, 0]


def _checkpoint(s: _Session, at: _Progress) -> None:
    """Everything needed to go on from ``at.step`` exactly as if never stopped, written by rank 0."""
    dist = s.dist
    ranks = dist.gather({"stream": s.stream.state_dict(), "rng": run_state.rng_state()})
    if dist.is_main:
        run_state.save_checkpoint(
            s.run_dir,
            {
                "version": run_state.CHECKPOINT_VERSION,
                "config_hash": s.chash,
                "step": at.step,
                "method": s.method.state_dict(),
                **ranks[0],
                "best": at.best,
                "last_record": at.record,
                "selection_window": at.window,
                **({"ranks": ranks} if dist.enabled else {}),
            },
        )


def _finish(s: _Session, at: _Progress) -> dict:
    """The run's summary (``train_log.json``); without validation images the final weights are ``best.pt``."""
    dist, best = s.dist, at.best
    if best["step"] < 0:  # nothing selected (no validation images): the final weights are the reported ones
        best = {"dice": None, "step": at.step}
        if dist.is_main:
            run_state.save_weights(s.run_dir / "best.pt", s.method, at.step)
    best = dist.gather(best)[0]  # rank 0 validated
    summary = {
        "iterations": at.step,
        "best_step": best["step"],
        "best_val_dice": best["dice"],
        "final_losses": at.record,
        "seconds_this_session": round(time.perf_counter() - s.started, 2),
    }
    if dist.is_main:
        fileio.write_json(s.run_dir / "train_log.json", {"summary": summary})
    return summary


class _Feedback:
    """What a run shows while it trains: a rich progress bar with the current losses and it/s (``bar``),
    and/or one line per validation on stderr (``lines``); nothing when both are off."""

    def __init__(self, bar: bool, lines: bool, run: RunId, total: int, completed: int):
        self.enabled, self.lines, self.run, self.total, self.completed = bar, lines, run, total, completed
        self.advance = lambda losses: None
        self.started, self.start_step = time.perf_counter(), completed

    def validated(self, step: int, losses: dict[str, float], dice: float | None, best: dict) -> None:
        if not self.lines:
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        left = per_step * (self.total - step)
        text = (
            f"{self.run.stage_name}: step {step}/{self.total}"
            + ("" if dice is None else f", validation Dice {dice:.4f}")
            + ("" if best.get("dice") is None else f" (best {best['dice']:.4f} at {best['step']})")
            + ", "
            + " ".join(f"{k}={v:.3f}" for k, v in list(losses.items())[:3])
            + f", {per_step:.2f} s/step, {left / 60:.0f} min left"
        )
        LOG.info(text)

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[losses]}"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        task = self.bar.add_task(self.run.stage_name, total=self.total, completed=self.completed, losses="", rate="")
        start, done = time.perf_counter(), [0]

        def advance(losses: dict[str, float]) -> None:
            done[0] += 1
            rate = f"{done[0] / max(time.perf_counter() - start, 1e-9):.1f} it/s"
            text = " ".join(f"{k}={v:.3f}" for k, v in list(losses.items())[:3])
            self.bar.update(task, advance=1, losses=text, rate=rate)

        self.advance = advance
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False

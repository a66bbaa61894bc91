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
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from knowsam import fileio
from knowsam.config import Params
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.data.splits import read_split, split_path
from knowsam.dice import class_masks, dice
from knowsam.errors import KnowsamError
from knowsam.machine import pick_device
from knowsam.methods import Method
from knowsam.models import embedding_cache
from knowsam.runs import RunId, build_method, config_hash, run_config

CHECKPOINT_VERSION = 2
LOCK_FILE = ".train.lock"  # in the run folder; listed in .dvcignore because it holds the trainer's PID
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


def _save_checkpoint(run_dir: Path, state: dict) -> None:
    """New checkpoint in place atomically; the previous one kept as a fallback."""
    current, previous = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    with fileio.atomic_path(current) as tmp:
        torch.save(state, tmp)
        if current.exists():
            os.replace(current, previous)


def _load_checkpoint(run_dir: Path, expected_hash: str, restart_stale: bool = False) -> dict | None:
    """Newest readable checkpoint of this configuration; unreadable ones are reported and skipped.

    A checkpoint of another configuration is an error (it may be someone's finished run),
    unless ``restart_stale``: the pipeline passes that, because DVC re-runs a train stage
    exactly when its configuration changed, and the old run folder is then stale.
    """
    from rich.console import Console

    err = Console(stderr=True)
    for path in (run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):  # a readable torch file of something else (a bare tensor, a list)
                raise TypeError(f"holds a {type(state).__name__}, not a training checkpoint")
        except Exception as exc:  # truncated/corrupt files raise many different types
            err.print(
                f"[yellow]warning[/]: {path}: unreadable checkpoint ({type(exc).__name__}); trying an older one",
                soft_wrap=True,
            )  # one line, never wrapped at the terminal width
            continue
        if state.get("version") != CHECKPOINT_VERSION or state.get("config_hash") != expected_hash:
            if restart_stale:
                err.print(f"{run_dir}: checkpoint of another configuration; starting this run afresh", soft_wrap=True)
                for entry in run_dir.iterdir():  # every rank may get here; the lock stays with its holder
                    if entry.name == LOCK_FILE:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                return None
            raise KnowsamError(
                f"{path}: checkpoint from a different configuration or version; "
                f"delete {run_dir} to start this run afresh"
            )
        return state
    return None


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for this process: a second trainer on it is refused, naming the holder's PID.

    ``flock`` belongs to the open file, so the kernel releases it when the holder dies however it
    dies: a lock file left behind never blocks anyone, it is simply locked again.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not fileio.try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise KnowsamError(
                f"{run_dir}: already being trained by process {holder}; wait for it or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _rng_state() -> dict:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def _rewind_live(live, step: int) -> None:
    """Drop curve rows logged after the checkpoint being resumed (a killed run may have got further).

    Iteration ``s`` (1-based) is dvclive step ``s - 1``, so a checkpoint at ``step`` keeps rows
    with step < ``step`` and the next row is logged at ``step``: no duplicated or skipped steps.
    """
    for tsv in sorted(Path(live.plots_dir, "metrics").rglob("*.tsv")):
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\r\n").split("\t").index("step")
        kept = [
            line
            for line in lines[1:]
            if line.endswith("\n") and line.split("\t")[col].isdigit() and int(line.split("\t")[col]) < step
        ]
        fileio.write_text(tsv, "".join(lines[:1] + kept))
    live.step = step


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

    Under ``torchrun`` the run is data-parallel over the launched processes (``knowsam.distributed``).
    """
    from knowsam import distributed
    from knowsam.data.loader import TrainStream

    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    keep_freed_memory()
    dist = distributed.setup(pick_device(params.train.device))  # one process unless launched by torchrun
    device = dist.device
    data = PreparedDataset(Path(params.data.prepared_root) / run.dataset)
    split = read_split(split_path(params.data.splits_root, run.dataset, run.ratio, run.seed), data)
    cfg = run_config(params, run)
    if dist.enabled:  # batches (and so results) depend on the number of processes
        cfg["distributed"] = {"world_size": dist.world}
    chash = config_hash(cfg)
    run_dir = run.train_dir(runs_root)  # created only once the method builds (no empty folder on error)

    seed_everything(run.seed)
    method = build_method(params, run, data, device)
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
        device=device,
        augmentation=method.augmentation,
        teacher_embeddings=None if cache is None else cache["train"],
        unlabeled_pool=method.unlabeled_pool,
    )
    # One process per run folder; under torchrun rank 0 holds it for the whole group.
    # SIGINT and SIGTERM raise in the main thread (knowsam.cli.main) and unwind through the atomic writes:
    # no temporary file is left and the next run resumes from the last checkpoint.
    with run_lock(run_dir) if dist.is_main else contextlib.nullcontext():
        val = validation_arrays(data, split, cache)
        t = params.train
        state = _load_checkpoint(run_dir, chash, restart_stale)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a run killed while writing a file
            stale.unlink(missing_ok=True)
        dist.barrier()  # no rank removes a temporary file that rank 0 is writing
        step, best, record = 0, {"dice": -1.0, "step": -1, "score": -math.inf}, {}
        window = [0.0, 0]  # sum and count of the method's selection_loss since the last evaluation
        if state is not None:
            method.load_state_dict(state["method"])
            stream.load_state_dict(dist.own(state)["stream"])
            _set_rng_state(dist.own(state)["rng"])
            step, best, record, window = state["step"], state["best"], state["last_record"], state["selection_window"]
        if dist.is_main and step < t.iterations:  # its summary is written again only when the run ends
            (run_dir / "train_log.json").unlink(missing_ok=True)
        if dist.is_main:
            fileio.write_json(run_dir / "config.json", {**cfg, "config_hash": chash})

        from dvclive import Live

        live = (
            Live(str(run.live_dir(runs_root)), resume=state is not None, save_dvc_exp=False, dvcyaml=None)
            if dist.is_main
            else distributed.NullLive()
        )
        if state is not None and dist.is_main:
            _rewind_live(live, step)
        method.train()
        started = time.perf_counter()
        with _Feedback(progress and dist.is_main, lines and dist.is_main, run, t.iterations, step) as feedback:
            while step < t.iterations:
                batch = batch_layout(stream.next_batch(), t)
                with step_context(t, device):
                    losses = method.train_step(batch, step)
                dist.after_step()  # rank 0's BatchNorm statistics everywhere
                losses = dist.average(losses)
                for term, value in losses.items():
                    if not math.isfinite(value):
                        raise KnowsamError(
                            f"{run.method} on {run.dataset}: loss term '{term}' is {value} at iteration "
                            f"{step}; stopped, last good checkpoint kept in {run_dir}"
                        )
                step += 1
                if method.selection_loss:
                    window = [window[0] + losses[method.selection_loss], window[1] + 1]
                for term, value in losses.items():
                    live.log_metric(f"train/{term}", value)
                record = {"step": step, **{k: round(v, 6) for k, v in losses.items()}}
                evaluation = step % t.eval_every == 0 or step == t.iterations
                if dist.is_main and val is not None and evaluation:
                    dice = validation_dice(method, *val, device)
                    live.log_metric("val/dice", dice)
                    record["val_dice"] = dice
                    # e.g. the SAM teacher: does it learn? and each student (not used to pick weights)
                    for variant in (*method.variants, *method.curve_variants):
                        record[f"val_dice_{variant}"] = validation_dice(method, *val, device, variant)
                        live.log_metric(f"val/dice_{variant}", record[f"val_dice_{variant}"])
                if dist.is_main and evaluation:
                    score = selection_score(method, record.get("val_dice"), window)
                    # Ties keep the earlier weights by Dice, the later by a loss (the official `<=`).
                    tie = score == best["score"] and method.selection_loss is not None
                    if score is not None and (score > best["score"] or tie):
                        best = {"dice": record.get("val_dice"), "step": step, "score": score}
                        _save_weights(run_dir / "best.pt", method, step)
                if evaluation:
                    window = [0.0, 0]
                    feedback.validated(step, losses, record.get("val_dice"), best)
                live.next_step()
                feedback.advance(losses)
                if step % t.checkpoint_every == 0 or step == t.iterations:
                    ranks = dist.gather({"stream": stream.state_dict(), "rng": _rng_state()})
                    if dist.is_main:
                        _save_checkpoint(
                            run_dir,
                            {
                                "version": CHECKPOINT_VERSION,
                                "config_hash": chash,
                                "step": step,
                                "method": method.state_dict(),
                                **ranks[0],
                                "best": best,
                                "last_record": record,
                                "selection_window": window,
                                **({"ranks": ranks} if dist.enabled else {}),
                            },
                        )
        _end_live(live)
        if best["step"] < 0:  # nothing selected (no validation images): the final weights are the reported ones
            best = {"dice": None, "step": step}
            if dist.is_main:
                _save_weights(run_dir / "best.pt", method, step)
        best = dist.gather(best)[0]  # rank 0 validated
        summary = {
            "iterations": step,
            "best_step": best["step"],
            "best_val_dice": best["dice"],
            "final_losses": record,
            "seconds_this_session": round(time.perf_counter() - started, 2),
        }
        if dist.is_main:
            fileio.write_json(run_dir / "train_log.json", {"summary": summary})
        return summary


def _end_live(live) -> None:
    """``live.end()``, tolerating dvclive's race between runs side by side in one repository: its last act
    removes a step signal file shared by every run of the repository (``<dvc root>/.dvc/tmp/exps/run/
    DVCLIVE_STEP_COMPLETED``) by exists-then-remove, so the run that loses raised after its curves were written."""
    try:
        live.end()
    except FileNotFoundError as exc:
        if not str(exc.filename).endswith("DVCLIVE_STEP_COMPLETED"):
            raise


def _save_weights(path: Path, method: Method, step: int) -> None:
    with fileio.atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, "step": step, "weights": method.eval_state_dict()}, tmp)


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
        console = self.bar.console if self.enabled else None
        if console is not None:
            console.print(text, soft_wrap=True, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

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

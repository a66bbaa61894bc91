"""A run folder's state on disk: checkpoints, RNG state, the lock, the curves, and questions about them.

A run folder holds ``config.json`` (resolved configuration), ``checkpoint.pt`` (+ the previous
one, ``checkpoint.prev.pt``), ``best.pt`` (the weights the method's selection rule keeps, by
default those with the best validation Dice; what evaluation loads), ``train_log.json`` (the
run's summary, written when it ends) and ``live/`` (dvclive curves: the one record of losses and
validation Dice per iteration). ``train`` writes it; ``evaluate``, ``plan`` and the publication
runner ask it how far a run got and whether it is the current configuration's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from knowsam import fileio
from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.methods import Method
from knowsam.runs import RunId, config_hash, run_config

LOG = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
LOCK_FILE = ".train.lock"  # in the run folder; listed in .dvcignore because it holds the trainer's PID


def remove_partial_files(run_dir: Path) -> None:
    """Remove the temporary files a run killed while writing left in its folder."""
    for partial in run_dir.glob(".*.tmp"):
        partial.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """New checkpoint in place atomically; the previous one kept as a fallback."""
    current, previous = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    with fileio.atomic_path(current) as tmp:
        torch.save(state, tmp)
        if current.exists():
            os.replace(current, previous)


def load_checkpoint(run_dir: Path, expected_hash: str, restart_stale: bool = False) -> dict | None:
    """Newest readable checkpoint of this configuration; unreadable ones are reported and skipped.

    A checkpoint of another configuration is an error (it may be someone's finished run),
    unless ``restart_stale``: the pipeline passes that, because DVC re-runs a train stage
    exactly when its configuration changed, and the old run folder is then stale.
    """
    for path in (run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):  # a readable torch file of something else (a bare tensor, a list)
                raise TypeError(f"holds a {type(state).__name__}, not a training checkpoint")
        except Exception as exc:  # truncated/corrupt files raise many different types
            LOG.warning(f"{path}: unreadable checkpoint ({type(exc).__name__}); trying an older one")
            continue
        if state.get("version") != CHECKPOINT_VERSION or state.get("config_hash") != expected_hash:
            if restart_stale:
                LOG.warning(f"{run_dir}: checkpoint of another configuration; starting this run afresh")
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


def rng_state() -> dict:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def rewind_live(live, step: int) -> None:
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


def end_live(live) -> None:
    """``live.end()``, tolerating dvclive's race between runs side by side in one repository: its last act
    removes a step signal file shared by every run of the repository (``<dvc root>/.dvc/tmp/exps/run/
    DVCLIVE_STEP_COMPLETED``) by exists-then-remove, so the run that loses raised after its curves were written."""
    try:
        live.end()
    except FileNotFoundError as exc:
        if not str(exc.filename).endswith("DVCLIVE_STEP_COMPLETED"):
            raise


def save_weights(path: Path, method: Method, step: int) -> None:
    with fileio.atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, "step": step, "weights": method.eval_state_dict()}, tmp)


def training_history(run: RunId, runs_root: str | Path) -> pd.DataFrame | None:
    """Per-iteration loss terms and validation Dice of a run, from its dvclive curves (which span resumed
    sessions: a resume drops the rows after its checkpoint); None for a run without curves.

    One row per iteration (``step`` counts from 1; dvclive's steps from 0), one column per loss
    term (rounded to 6 decimals, far below any reported digit) and ``val_<name>`` per validation metric.
    """
    metrics = run.live_dir(runs_root) / "plots" / "metrics"
    files = sorted(metrics.glob("train/*.tsv"), key=lambda f: (f.stem != "loss", f.stem)) + sorted(
        metrics.glob("val/*.tsv")
    )
    if not files:
        return None
    columns = []
    for path in files:
        try:
            logged = pd.read_csv(path, sep="\t", dtype=float)
            series = pd.Series(logged[path.stem].to_numpy(), index=logged["step"].astype(int).to_numpy() + 1)
        except (OSError, ValueError, KeyError):
            raise KnowsamError(
                f"{path}: unreadable training curves; re-run the train stage for {run.stage_name}"
            ) from None
        if path.parent.name == "val":
            columns.append(series.rename(f"val_{path.stem}"))
        else:
            columns.append(series.round(6).rename(path.stem))
    table = pd.concat(columns, axis=1).sort_index()
    return table.rename_axis("step").reset_index()


def trained_weights(params: Params, run: RunId, runs_root: str | Path) -> Path:
    """The run's ``best.pt``, refused if absent or trained under other parameters."""
    weights_path = run.train_dir(runs_root) / "best.pt"
    if not weights_path.is_file():
        raise KnowsamError(f"{weights_path}: trained weights not found; run the train stage for {run.stage_name}")
    check_trained_config(params, run, weights_path.parent)
    step = trained_step(weights_path.parent)
    if step < params.train.iterations:  # best.pt of a stopped run would score as a finished one
        raise KnowsamError(
            f"{run.train_dir(runs_root)}: training stopped at step {step} of "
            f"{params.train.iterations} (unfinished); re-run the train stage for {run.stage_name} "
            "to finish it"
        )
    return weights_path


def is_complete(params: Params, run: RunId, runs_root: str | Path = "data/runs") -> bool:
    """Whether the run trained to its configured iterations under the current configuration (what evaluate accepts)."""
    try:
        trained_weights(params, run, runs_root)
    except KnowsamError:
        return False
    return True


def trained_step(run_dir: Path) -> int:
    """The step of the run's newest readable checkpoint (0 if none): how far its training got."""
    for path in (run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"):
        try:  # mmap: only the step is read, never the whole optimiser state
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
        except Exception:  # absent, truncated or foreign files raise many different types
            continue
    return 0


def check_trained_config(params: Params, run: RunId, run_dir: Path) -> None:
    """Refuse weights trained under other parameters, training code or version (the run's config.json says which).

    Locations (``runs.LOCATION_KEYS``) and code that cannot change a trained run (reports, the command
    line) are outside the configuration, so changing them never refuses a run."""
    path = run_dir / "config.json"
    try:
        trained = json.loads(path.read_text())
        if not isinstance(trained, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # nothing says what the weights were trained with: never score them
        what = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable, {type(exc).__name__}"
        raise KnowsamError(
            f"{path}: run configuration {what}, so {run_dir / 'best.pt'} cannot be matched to the "
            f"params; re-run the train stage for {run.stage_name}"
        ) from None
    trained.pop("config_hash", None)
    trained.pop("distributed", None)  # how it was trained (processes), not what
    if not isinstance(trained.get("train"), dict) or config_hash(trained) != config_hash(run_config(params, run)):
        raise KnowsamError(
            f"{run_dir / 'best.pt'}: trained with other parameters, code or version "
            f"(see {path}); re-run the train stage for {run.stage_name}"
        )

"""``knowsam-bench publication run``: train and evaluate the runs a publication lacks, in one sitting.

A sitting holds the publication (one at a time per folder), gets the data ready (acquire; prepare
where the prepared folder is of other settings; the frozen teacher's embeddings; the splits), then
makes each missing or stale run in the order dataset, ratio, seed, method: ``knowsam-bench train``
then ``knowsam-bench evaluate`` in a child process, ``jobs`` runs side by side with ``threads`` each,
each child's output in ``data/logs/<publication>/<run>.<train|evaluate>.log`` (training: one line
per validation).
As soon as a run is evaluated its results are stored in the publication
(``report.publication.store_run``) and, with ``commit``, committed alone. With ``max_minutes`` no run
is started that its estimate says would end after the sitting: the median wall time of the stored
runs of its dataset and method, else the method's measured step time x iterations (validation and
evaluation on top, so the first sitting's estimates run short).

The children are the commands a user would type, with the publication's params except
``train.threads`` (speed, not identity): a failure is one line, SIGINT and SIGTERM stop them cleanly,
and a stopped training resumes from its checkpoint when the same machine runs the sitting again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from knowsam import config, fileio
from knowsam.config import Params, ratio_text
from knowsam.errors import KnowsamError
from knowsam.report.publication import (
    Publication,
    RunState,
    check_training_code,
    recorded_seconds,
    remove_leftovers,
    status,
    store_run,
)
from knowsam.report.publish import machine_facts, package_versions
from knowsam.runs import RunId
from knowsam.summaries import identity

POLL_SECONDS = 0.5
LOG_ROOT = Path("data/logs")  # each child's output, kept after the sitting: data/logs/<publication>/<run>.<step>.log
STOP_GRACE_SECONDS = 120  # a stopped child writes its last files in this time, or is killed


@dataclass
class Job:
    """One run of the sitting: its child commands (train, then evaluate), run one after the other."""

    run: RunId
    commands: list[tuple[str, list[str]]]
    log_dir: Path
    resumed_at_step: int
    seconds: dict[str, float] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    phase: int = 0
    started: float = 0.0

    @property
    def name(self) -> str:
        return self.commands[self.phase][0]

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.run.stage_name}.{self.name}.log"


@dataclass
class Outcome:
    todo: list[RunId] = field(default_factory=list)
    stored: list[RunId] = field(default_factory=list)
    failed: list[tuple[RunId, str]] = field(default_factory=list)
    not_started: list[tuple[RunId, float]] = field(default_factory=list)  # with the estimate, seconds


def run_missing(
    folder: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    max_minutes: float | None = None,
    commit: bool = False,
    restart_stale: bool = False,
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
    echo: Callable[[str], None] = print,
) -> Outcome:
    """Make the publication's missing and stale runs (of ``methods`` and ``datasets``, default all); see the
    module docstring."""
    started = time.monotonic()
    pub = Publication(Path(folder))
    params = pub.params()
    check_training_code(pub)
    params.require("methods", *(methods or []), source=str(pub.params_file))
    params.require("datasets", *(datasets or []), source=str(pub.params_file))
    for ok, rule in (
        (jobs >= 1, f"--jobs {jobs} must be >= 1"),
        (threads is None or threads >= 0, f"--threads {threads} must be >= 0 (0: torch's default)"),
        (max_minutes is None or max_minutes >= 0, f"--max-minutes {max_minutes} must be >= 0"),
    ):
        if not ok:
            raise KnowsamError(rule, 2)
    repo = git_root(pub.folder) if commit else None
    threads = (params.train.threads if jobs == 1 else 1) if threads is None else threads
    sitting = dataclasses.replace(params, train=dataclasses.replace(params.train, threads=threads))
    with hold(pub):
        for path in remove_leftovers(pub):
            echo(f"removed {path} (left by a store that was stopped)")
        states = status(pub, params)
        outcome = Outcome(
            todo=in_order(
                params,
                [
                    s.run
                    for s in states
                    if s.state != "done"
                    and (methods is None or s.run.method in methods)
                    and (datasets is None or s.run.dataset in datasets)
                ],
            )
        )
        if not outcome.todo:
            echo(f"{pub.folder}: no run to make ({sum(s.state == 'done' for s in states)} of {len(states)} done)")
            return outcome
        echo(
            f"{pub.folder}: {len(outcome.todo)} run(s) to make, {jobs} side by side with {threads or 'default'} "
            f"thread(s) each"
        )
        get_data_ready(params, outcome.todo, echo)
        estimate = estimates(sitting, states, outcome.todo, echo) if max_minutes is not None else {}
        deadline = None if max_minutes is None else started + max_minutes * 60
        with tempfile.TemporaryDirectory(prefix="knowsam-sitting-") as work:
            params_file = Path(work) / "params.yaml"
            params_file.write_text(yaml.safe_dump(config.to_dict(sitting), sort_keys=False))
            record = {
                "side_by_side": jobs,
                "threads": threads,
                "machine": machine_facts(),
                "packages": package_versions(),
            }
            logs = LOG_ROOT / pub.folder.resolve().name
            logs.mkdir(parents=True, exist_ok=True)
            Sitting(pub, params, params_file, logs, jobs, restart_stale, repo, record, echo).make(
                outcome, estimate, deadline
            )
    return outcome


def in_order(params: Params, runs: list[RunId]) -> list[RunId]:
    """Dataset, ratio, seed, then method, each in params order: a sitting completes whole seeds first."""
    return sorted(
        runs,
        key=lambda r: (
            params.datasets.index(r.dataset),
            params.ratios.index(r.ratio),
            params.seeds.index(r.seed),
            params.methods.index(r.method),
        ),
    )


@contextlib.contextmanager
def hold(pub: Publication):
    """One sitting per publication at a time: a lock on its params file, released however the holder ends."""
    fd = os.open(pub.params_file, os.O_RDONLY)
    try:
        if not fileio.try_lock(fd):
            raise KnowsamError(
                f"{pub.folder}: another `publication run` is making its runs; wait for it to end or stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


def prepared_as(params: Params, dataset: str) -> bool:
    """Whether the prepared dataset is there, readable, at the params' image size and interpolation."""
    from knowsam.data.dataset import PreparedDataset

    try:
        meta = PreparedDataset(Path(params.data.prepared_root) / dataset).meta
    except KnowsamError:
        return False
    return meta.get("image_size") == params.data.image_size and meta.get("interpolation") == params.data.interpolation


def get_data_ready(params: Params, todo: list[RunId], echo: Callable[[str], None]) -> None:
    """What the runs train on, as the pipeline's acquire, prepare, embed and split stages make it."""
    from knowsam.data.acquire import acquire
    from knowsam.data.dataset import PreparedDataset
    from knowsam.data.prepare import prepare_dataset
    from knowsam.data.splits import split_path, write_split
    from knowsam.embed import embed

    for dataset in dict.fromkeys(r.dataset for r in todo):
        acquire(dataset, Path(params.data.raw_root), mirror=params.data.mirror, progress=False)
        if not prepared_as(params, dataset):
            echo(f"{dataset}: preparing at {params.data.image_size} px")
            prepare_dataset(dataset, params.data)
        if embed(params, dataset)["needed"]:
            echo(f"{dataset}: teacher embeddings ready in {Path(params.sam.embeddings_root) / dataset}")
        data = PreparedDataset(Path(params.data.prepared_root) / dataset)
        for ratio, seed in dict.fromkeys((r.ratio, r.seed) for r in todo if r.dataset == dataset):
            # Written every time (deterministic and cheap): a split of another data.val_fraction is never used.
            write_split(
                data, split_path(params.data.splits_root, dataset, ratio, seed), ratio, seed, params.data.val_fraction
            )


def estimates(
    params: Params, states: list[RunState], todo: list[RunId], echo: Callable[[str], None]
) -> dict[RunId, float]:
    """Each run's expected wall seconds: stored runs' median for its dataset and method, else measured steps."""
    known = recorded_seconds(states)
    unknown = [m for m in params.methods if any(r.method == m and (r.dataset, m) not in known for r in todo)]
    measured = {}
    if unknown:
        from knowsam.plan import measure_step_seconds

        echo(f"timing a few steps of {', '.join(unknown)} (no stored run to go by)")
        measured = measure_step_seconds(params, unknown, steps=2)
    return {r: known.get((r.dataset, r.method)) or measured[r.method] * params.train.iterations for r in todo}


def trained_here(params: Params, run: RunId) -> int:
    """How far this machine's run folder trained this run already (0 when it holds another training or none)."""
    try:
        recorded = json.loads((run.train_dir() / "config.json").read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return 0
    if recorded != identity(params, run)["config_hash"]:
        return 0
    from knowsam.run_state import trained_step

    return trained_step(run.train_dir())


def git_root(folder: Path) -> Path:
    """The Git working tree holding ``folder``, checked to take commits; a one-line error otherwise."""
    found = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if found.returncode != 0:
        raise KnowsamError(f"{folder}: not inside a Git working tree; --commit commits each run there", 2)
    ident = subprocess.run(["git", "-C", str(folder), "var", "GIT_COMMITTER_IDENT"], capture_output=True, text=True)
    if ident.returncode != 0:
        raise KnowsamError(
            f"{folder}: Git has no committer identity here (set user.name and user.email) for --commit", 2
        )
    return Path(found.stdout.strip())


def commit_run(repo: Path, path: Path, message: str) -> None:
    """Commit the files under ``path`` and nothing else (whatever else is staged stays staged)."""
    rel = str(path.resolve().relative_to(repo.resolve()))
    for command in (["add", "--", rel], ["commit", "--quiet", "--only", "-m", message, "--", rel]):
        done = subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise KnowsamError(f"git {command[0]} {rel}: {last_line(done.stderr + done.stdout)}")


def last_line(text: str) -> str:
    """A child's error line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


@dataclass
class Sitting:
    pub: Publication
    params: Params
    params_file: Path  # the children's: the publication's params with this sitting's threads
    logs: Path  # the children's logs
    jobs: int
    restart_stale: bool
    repo: Path | None  # commit each stored run there
    record: dict  # what every stored run's run.json says about this sitting
    echo: Callable[[str], None]
    # Wall seconds of the runs this sitting made whole, by (dataset, method): a better estimate for the
    # next run of the same kind than steps timed alone before the sitting (no neighbour, no validation).
    finished: dict[tuple[str, str], float] = field(default_factory=dict)

    def commands(self, run: RunId) -> list[tuple[str, list[str]]]:
        cli = [sys.executable, "-m", "knowsam"]
        where = ["--ratio", ratio_text(run.ratio), "--seed", str(run.seed), "--params", str(self.params_file)]
        return [
            (
                "train",
                [
                    *cli,
                    "--verbose",  # one line per validation in the run's log
                    "train",
                    run.dataset,
                    "--method",
                    run.method,
                    *where,
                    "--no-progress",
                    *(["--restart-stale"] if self.restart_stale else []),
                ],
            ),
            ("evaluate", [*cli, "evaluate", run.dataset, *where, "--methods", run.method]),
        ]

    def start(self, job: Job) -> None:
        threads = self.record["threads"]  # 0: torch's default, left to the environment
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        with open(job.log, "wb") as log:
            job.proc = subprocess.Popen(
                job.commands[job.phase][1], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        job.started = time.monotonic()

    def make(self, outcome: Outcome, estimate: dict[RunId, float], deadline: float | None) -> None:
        pending, running = list(outcome.todo), []
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    run = pending.pop(0)
                    expected = self.finished.get((run.dataset, run.method), estimate.get(run))
                    if deadline is not None and time.monotonic() + expected > deadline:
                        outcome.not_started.append((run, expected))
                        continue
                    job = Job(run, self.commands(run), self.logs, trained_here(self.params, run))
                    self.start(job)
                    running.append(job)
                    self.echo(f"{run.stage_name}: started")
                time.sleep(POLL_SECONDS)
                for job in [j for j in running if j.proc.poll() is not None]:
                    if not self.advance(job, outcome):
                        running.remove(job)
        finally:
            stop(running)

    def advance(self, job: Job, outcome: Outcome) -> bool:
        """The next step of a job whose child ended; False once the job is over (stored or failed)."""
        job.seconds[job.name] = round(time.monotonic() - job.started, 1)
        said = last_line(job.log.read_text(errors="replace")).removeprefix("error: ")
        if job.proc.returncode != 0:
            outcome.failed.append((job.run, f"{job.name}: {said}"))
            self.echo(f"{job.run.stage_name}: {job.name} failed: {said} (log: {job.log})")
            return False
        self.echo(said)
        if job.phase + 1 < len(job.commands):
            job.phase += 1
            self.start(job)
            return True
        record = {
            **self.record,
            "wall_seconds": job.seconds,
            "resumed_at_step": job.resumed_at_step,
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        try:
            path = store_run(self.pub, self.params, job.run, record)
            if self.repo is not None:
                commit_run(self.repo, path, f"{self.pub.folder.name}: results of {job.run.stage_name}")
        except KnowsamError as exc:
            outcome.failed.append((job.run, f"store: {exc}"))
            self.echo(f"{job.run.stage_name}: not stored or not committed: {exc}")
            return False
        outcome.stored.append(job.run)
        if job.resumed_at_step == 0:
            self.finished[(job.run.dataset, job.run.method)] = sum(job.seconds.values())
        minutes = sum(job.seconds.values()) / 60
        self.echo(
            f"{job.run.stage_name}: stored in {path} ({minutes:.1f} min)"
            + (", committed" if self.repo is not None else "")
        )
        return False


def stop(running: list[Job]) -> None:
    """Stop the children still running (SIGTERM: they end their writes and exit), killing any that hang."""
    for job in running:
        if job.proc.poll() is None:
            job.proc.terminate()
    for job in running:
        try:
            job.proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()

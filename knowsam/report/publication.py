"""A publication folder: results that accumulate in Git run by run, whichever machine trained them.

    <folder>/params.yaml        the matrix (datasets x methods x ratios x seeds) and every setting: yours
    <folder>/training-code.json the training code the runs are made with (``publication pin``), if pinned
    <folder>/runs/<dataset>/ratio-<r>_seed-<s>/<method>/
        summary.json, per_case.csv, curves.csv    what ``evaluate`` wrote in data/eval: the tables' inputs
        config.json, train_log.json               the training's configuration and summary (data/runs)
        run.json                                  wall time, threads, runs side by side, machine, packages
    <folder>/report/            tables, figures and comparisons built from the two above alone

``runs/`` is laid out as data/eval is, so the one reader of results (``report.results``) reads it as it
reads data/eval, only without run folders. A run is **done** when its summary scored the training the
params file and the publication's training code make, **stale** when it scored another (the reason says
what differs, by the rules every table uses), **missing** otherwise. No weights, no predicted masks, no
dataset images.

The publication's training code is the pinned one when ``training-code.json`` exists, else this
checkout's. A pin lets development go on while the matrix accumulates over sittings: an edit to the
training code elsewhere leaves the stored runs done, and ``publication run`` trains only with code
whose fingerprint is the pinned one (a checkout of the pinned commit; docs/publications.md).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from knowsam import fileio, validation
from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.report.results import load_per_case, load_summaries, matrix
from knowsam.runs import RunId
from knowsam.summaries import identity, read_summary, stale_reason

STORE_WRITER = "knowsam-bench publication run"
EVAL_FILES = ("summary.json", "per_case.csv", "curves.csv")  # curves.csv only where the run logged curves
TRAINING_FILES = ("config.json", "train_log.json")
RECORD = "run.json"
PIN = "training-code.json"
STATES = ("done", "missing", "stale")


@dataclass(frozen=True)
class Publication:
    folder: Path

    @property
    def params_file(self) -> Path:
        return self.folder / "params.yaml"

    @property
    def runs_root(self) -> Path:
        """Where the runs' results accumulate, laid out as data/eval."""
        return self.folder / "runs"

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"

    @property
    def produce(self) -> str:
        """The command that adds the missing runs."""
        return f"knowsam-bench publication run {self.folder}"

    @property
    def pin_file(self) -> Path:
        return self.folder / PIN

    def pin(self) -> dict | None:
        """The pinned training code (``fingerprint``, ``commit``, ``pinned_utc``), None when not pinned."""
        try:
            pin = json.loads(self.pin_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise KnowsamError(
                f"{self.pin_file}: unreadable ({type(exc).__name__}); write it with `{self.pin_command}`"
            ) from None
        if not (isinstance(pin, dict) and isinstance(pin.get("fingerprint"), str) and pin["fingerprint"]):
            raise KnowsamError(f"{self.pin_file}: has no 'fingerprint'; write it with `{self.pin_command}`")
        return pin

    def code(self) -> str | None:
        """The training-code fingerprint the runs are judged by: the pin's, None (this checkout's) when unpinned."""
        pin = self.pin()
        return None if pin is None else pin["fingerprint"]

    @property
    def pin_command(self) -> str:
        return f"knowsam-bench publication pin {self.folder}"

    def params(self) -> Params:
        if not self.params_file.is_file():
            raise KnowsamError(
                f"{self.params_file}: not found; a publication folder starts with its params file, "
                f"e.g. `knowsam-bench profile cpu --params {self.params_file}`"
            )
        return validation.load(self.params_file)


@dataclass(frozen=True)
class RunState:
    run: RunId
    state: str  # one of STATES
    reason: str | None  # why missing or stale
    record: dict | None  # run.json: how and where the stored results were made

    def to_dict(self) -> dict:
        r = self.run
        return {
            "run": r.stage_name,
            "dataset": r.dataset,
            "method": r.method,
            "ratio": r.ratio,
            "seed": r.seed,
            "state": self.state,
            "reason": self.reason,
            "wall_seconds": run_seconds(self.record),
        }


def read_record(pub: Publication, run: RunId) -> dict | None:
    """A stored run's ``run.json``; None where there is none; a one-line error when it is not JSON."""
    path = run.eval_dir(pub.runs_root) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KnowsamError(
            f"{path}: unreadable run record ({type(exc).__name__}); store the run again with `{pub.produce}`"
        ) from None
    return record if isinstance(record, dict) else None


def status(pub: Publication, params: Params) -> list[RunState]:
    """Every run of the publication's matrix, in table order, with its state."""
    results = load_summaries(
        params, matrix(params), pub.runs_root, None, allow_stale=True, per_case=True, code=pub.code()
    )
    why = {item.run: ("stale", item.reason) for item in results.stale}
    why.update({item.run: ("missing", item.reason) for item in results.left_out})
    return [RunState(run, *why.get(run, ("done", None)), read_record(pub, run)) for run in matrix(params)]


def run_seconds(record: dict | None) -> float | None:
    """A stored run's training plus evaluation wall time, None unless both were timed from step 0."""
    if not record or record.get("resumed_at_step"):
        return None
    wall = record.get("wall_seconds") or {}
    if not all(isinstance(wall.get(k), (int, float)) for k in ("train", "evaluate")):
        return None
    return float(wall["train"] + wall["evaluate"])


def recorded_seconds(states: list[RunState]) -> dict[tuple[str, str], float]:
    """Median wall seconds of a run per (dataset, method), over the done runs timed from step 0."""
    timed: dict[tuple[str, str], list[float]] = {}
    for s in states:
        seconds = run_seconds(s.record) if s.state == "done" else None
        if seconds is not None:
            timed.setdefault((s.run.dataset, s.run.method), []).append(seconds)
    return {key: statistics.median(values) for key, values in timed.items()}


def store_run(
    pub: Publication,
    params: Params,
    run: RunId,
    record: dict,
    eval_root: str | Path = "data/eval",
    runs_root: str | Path = "data/runs",
) -> Path:
    """Copy an evaluated run's results into the publication, whole or not at all; returns its folder there.

    The results must be of the current params and the publication's training code and read back whole (summary and per-case
    table, strictly); the folder is built beside its place and renamed into it (``fileio.atomic_dir``),
    so an interruption leaves the earlier results, or none, never part of a run.
    """
    summary = read_summary(run, eval_root)
    if summary is None:
        raise KnowsamError(f"{run.summary_file(eval_root)}: not found; evaluate {run.stage_name} first")
    reason = stale_reason(summary, identity(params, run, pub.code()))
    if reason is not None:
        raise KnowsamError(
            f"{run.summary_file(eval_root)}: stale for {pub.params_file} ({reason}); "
            f"train and evaluate {run.stage_name} again"
        )
    load_per_case(run, eval_root, summary)
    sources = [run.eval_dir(eval_root) / name for name in EVAL_FILES]
    sources += [run.train_dir(runs_root) / name for name in TRAINING_FILES]
    target = run.eval_dir(pub.runs_root)
    with fileio.atomic_dir(target, writer=STORE_WRITER, inputs=[eval_root, runs_root]) as tmp:
        for source in sources:
            if source.is_file():
                shutil.copyfile(source, tmp / source.name)
        fileio.write_json(tmp / RECORD, record)
    return target


def remove_leftovers(pub: Publication) -> list[Path]:
    """Remove what a store killed half-way left beside a run's folder (``fileio.atomic_dir``'s staging and
    retired folders); only a running store makes them, so call this with the publication held."""
    found = [p for pattern in (".*.tmp", ".*.old") for p in pub.runs_root.glob(f"*/*/{pattern}") if p.is_dir()]
    for path in found:
        shutil.rmtree(path)
    return found


def write_pin(pub: Publication, *, replace: bool = False) -> dict:
    """Pin this checkout's training code (fingerprint and Git commit) as the publication's; returns the pin.

    The training sources must be committed, so the commit recorded is code anyone can check out. An
    existing pin of other code is replaced only with ``replace`` (every run stored under it becomes stale).
    """
    import datetime as _dt
    import subprocess

    from knowsam.runs import SOURCE_ROOT, TRAINING_SOURCES, code_fingerprint

    fingerprint = code_fingerprint()
    old = pub.pin()
    if old is not None and old["fingerprint"] != fingerprint and not replace:
        raise KnowsamError(
            f"{pub.pin_file}: pins training code {old['fingerprint']} (commit {old.get('commit')}), this checkout's "
            f"is {fingerprint}; add --replace to pin this code (every run stored under the old pin becomes stale)",
            2,
        )
    git = ["git", "-C", str(SOURCE_ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        raise KnowsamError(f"{SOURCE_ROOT}: not a Git checkout; a pin records the commit that holds the code", 2)
    edited = subprocess.run(
        [*git, "status", "--porcelain", "--", *TRAINING_SOURCES], capture_output=True, text=True
    ).stdout.split("\n")[0]
    if edited:
        raise KnowsamError(
            f"training code has uncommitted changes ({edited.strip()}); commit them first, so the pinned commit holds "
            "the code the runs are made with",
            2,
        )
    pin = {
        "fingerprint": fingerprint,
        "commit": head.stdout.strip(),
        "pinned_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fileio.write_json(pub.pin_file, pin)
    return pin


def check_training_code(pub: Publication) -> None:
    """A one-line error unless this checkout's training code is the publication's (its pin, if any)."""
    from knowsam.runs import code_fingerprint

    pin = pub.pin()
    if pin is None or pin["fingerprint"] == code_fingerprint():
        return
    commit = pin.get("commit") or "?"
    raise KnowsamError(
        f"{pub.pin_file}: the runs are made with training code {pin['fingerprint']} (commit {commit[:12]}), this "
        f"checkout's is {code_fingerprint()}; run the sitting from a checkout of that commit (`git worktree add "
        f"--detach ../knowsam-pinned {commit[:12]} && cd ../knowsam-pinned && python -m knowsam publication run "
        f"{pub.folder.resolve()} ...`), or pin this code with `{pub.pin_command} --replace`",
        2,
    )

"""``knowsam-bench``: the command line. Heavy imports (torch, pandas) happen inside commands
so that ``--help`` stays fast. Expected failures print one line on stderr and exit non-zero;
``--debug`` shows the traceback instead."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer
from typer.exceptions import TyperException

from knowsam import log
from knowsam.errors import KnowsamError, environment_failure

app = typer.Typer(
    name="knowsam-bench",
    help="Benchmark harness for KnowSAM and semi-supervised medical image segmentation.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False, "verbosity": 0}  # verbosity: -1 --quiet, 0, 1 --verbose


class CompareFormat(str, enum.Enum):
    """``compare --format`` (report.compare.FORMATS; listed here so that --help loads no pandas)."""

    table = "table"
    md = "md"
    json = "json"


def _completions(names: list[str], incomplete: str) -> list[str]:
    """Shell completion of a name, or of the last name of a comma-separated list."""
    head, _, last = incomplete.rpartition(",")
    prefix = f"{head}," if head else ""
    return [prefix + n for n in names if n.startswith(last)]


def _complete_method(incomplete: str) -> list[str]:
    from knowsam.methods import method_names

    return _completions(method_names(), incomplete)


def _complete_dataset(incomplete: str) -> list[str]:
    from knowsam.data.sources import DATASETS

    return _completions(sorted(DATASETS), incomplete)


def _complete_profile(incomplete: str) -> list[str]:
    from knowsam.config import profile_names

    return _completions(profile_names(), incomplete)


DATASET_ARGUMENT = typer.Argument(
    ..., help="Dataset name, e.g. polyp or acdc.", autocompletion=_complete_dataset, show_default=False
)
METHOD_HELP = "Method name (see `knowsam-bench methods`)."
METHODS_HELP = "Comma-separated method names"


class OutputFormat(str, enum.Enum):
    """``--format`` of the commands that print one result: a table to read, or one JSON object."""

    table = "table"
    json = "json"


FORMAT_OPTION = typer.Option(OutputFormat.table, "--format", help="table: for reading; json: one JSON object.")
PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="Params file (DVC's params.yaml).")
ALLOW_STALE_OPTION = typer.Option(
    False,
    "--allow-stale",
    help="Also show runs scored under other params or code (marked †) instead of leaving them out.",
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Say more while working, e.g. one line per validation while training."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or notes: results and errors only."),
) -> None:
    if verbose and quiet:
        raise KnowsamError("give at most one of --verbose and --quiet", 2)
    _state["debug"] = debug
    _state["verbosity"] = 1 if verbose else -1 if quiet else 0
    log.configure(_state["verbosity"])


def _bars() -> bool:
    """Whether progress bars are drawn (not under --quiet)."""
    return _state["verbosity"] >= 0


def _load_params(path: Path):
    from knowsam import validation

    return validation.load(path)


def _run_ids(params, method, dataset, ratio, seed):
    from knowsam.runs import RunId

    params.require("datasets", dataset)
    params.require("methods", method)
    _check_ratio_seed(ratio, seed)
    return RunId(method=method, dataset=dataset, ratio=ratio, seed=seed)


def _check_ratio_seed(ratio: float | None, seed: int | None) -> None:
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise KnowsamError(f"--ratio {ratio:g} must be in (0, 1]", 2)
    from knowsam.config import check_seed

    if seed is not None:
        check_seed(seed, f"--seed {seed}")


@app.command()
def methods() -> None:
    """List the registered methods, one line each."""
    from rich.console import Console

    from knowsam.methods import get_method, method_names

    console = Console()
    names = method_names()
    width = max(map(len, names))
    for name in names:
        console.print(f"[bold]{name:<{width}}[/]  {get_method(name).description}", highlight=False, soft_wrap=True)


@app.command()
def describe(
    method: str = typer.Argument(..., help=METHOD_HELP, autocompletion=_complete_method, show_default=False),
    dataset: str | None = typer.Argument(
        None,
        help="Dataset whose classes and channels to use (default: the first in params).",
        autocompletion=_complete_dataset,
        show_default=False,
    ),
    sam_arch: str | None = typer.Option(None, "--sam-arch", help="SAM variant (default: params' sam.arch)."),
    fmt: OutputFormat = FORMAT_OPTION,
    params_file: Path = PARAMS_OPTION,
) -> None:
    """A method's networks with their parameter counts (total and trainable), without training."""
    from knowsam.describe import describe as describe_method
    from knowsam.describe import render

    params = _load_params(params_file)
    summary = describe_method(params, method, dataset or params.datasets[0], sam_arch)
    typer.echo(render(summary, fmt is OutputFormat.json))


@app.command()
def profile(
    name: str = typer.Argument(..., help="Profile name, e.g. demo, cpu, paper.", autocompletion=_complete_profile),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Switch params.yaml to a profile (the demo is the default)."""
    from knowsam import config, fileio, validation

    source = config.profile_path(name)
    validation.validate(config.read(source))
    if params_file.is_file():  # edits of the user's own are kept, never overwritten
        current = params_file.read_bytes()
        if all(current != config.profile_path(p).read_bytes() for p in config.profile_names()):
            backup, new = fileio.keep_copy(params_file, current)
            typer.echo(f"{params_file}: differs from every profile; {'kept as' if new else 'already kept as'} {backup}")
    fileio.write_text(params_file, source.read_text())
    typer.echo(f"{params_file}: now profile '{name}' (from {source.name}); run `dvc repro`")


@app.command()
def acquire(
    dataset: str = DATASET_ARGUMENT,
    params_file: Path = PARAMS_OPTION,
    offline: bool = typer.Option(False, help="Use only the mirror, never the network."),
) -> None:
    """Fetch a dataset (mirror, else official download) into data/raw/<dataset>."""
    from knowsam.data.acquire import acquire as do_acquire

    params = _load_params(params_file)
    path = do_acquire(dataset, Path(params.data.raw_root), mirror=params.data.mirror, offline=offline, progress=_bars())
    typer.echo(f"{dataset}: ready in {path}")


@app.command()
def prepare(dataset: str = DATASET_ARGUMENT, params_file: Path = PARAMS_OPTION) -> None:
    """Prepare a dataset: checked, resized arrays + original masks + fingerprint report."""
    import time

    from knowsam.data.prepare import prepare_dataset

    params = _load_params(params_file)
    start = time.perf_counter()
    meta = prepare_dataset(dataset, params.data)
    counts = ", ".join(f"{k} {v}" for k, v in meta["test_sets"].items())
    typer.echo(
        f"{dataset}: train {meta['train']}; test {counts} "
        f"({time.perf_counter() - start:.1f} s at {meta['image_size']} px)"
    )


@app.command()
def embed(
    dataset: str = DATASET_ARGUMENT,
    batch: int = typer.Option(1, help="Images per encoder call (1 was fastest on CPU; more on a GPU)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Cache the frozen SAM encoder's embeddings of every image of a dataset (sam.encoder: cached)."""
    from rich.progress import Progress

    from knowsam.embed import embed as embed_dataset

    params = _load_params(params_file)
    if batch < 1:
        raise KnowsamError(f"--batch {batch} must be >= 1", 2)
    with Progress(transient=True, disable=not _bars()) as bar:
        task = bar.add_task(f"embed {dataset}", total=None)
        meta = embed_dataset(
            params, dataset, batch=batch, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if not meta["needed"]:
        typer.echo(f"{dataset}: sam.encoder is {params.sam.encoder}; no embedding cache needed")
        return
    last = meta["last_call"]
    typer.echo(
        f"{dataset}: {sum(meta['done'].values())} embeddings ({', '.join(f'{k} {v}' for k, v in meta['done'].items())}); this call {last['images']} images in {last['seconds']} s "
        f"({last['images_per_second']} images/s)"
    )


@app.command()
def split(
    dataset: str = DATASET_ARGUMENT,
    params_file: Path = PARAMS_OPTION,
    ratio: float | None = typer.Option(None, help="Only this ratio (default: every ratio in params)."),
    seed: int | None = typer.Option(None, help="Only this seed (default: every seed in params)."),
) -> None:
    """Write the split files of a dataset (every ratio and seed in params unless one is given)."""
    from knowsam.data.dataset import PreparedDataset
    from knowsam.data.splits import split_path, write_split

    params = _load_params(params_file)
    _check_ratio_seed(ratio, seed)
    data = PreparedDataset(Path(params.data.prepared_root) / dataset)
    for r in [ratio] if ratio is not None else params.ratios:
        for s in [seed] if seed is not None else params.seeds:
            out = split_path(params.data.splits_root, dataset, r, s)
            counts = write_split(data, out, r, s, params.data.val_fraction)["counts"]
            typer.echo(
                f"{out}: labeled {counts['labeled']}, unlabeled {counts['unlabeled']}, "
                f"validation {counts['validation']}"
            )


@app.command()
def train(
    dataset: str = DATASET_ARGUMENT,
    method: str = typer.Option(..., help=METHOD_HELP, autocompletion=_complete_method),
    ratio: float = typer.Option(...),
    seed: int = typer.Option(...),
    params_file: Path = PARAMS_OPTION,
    progress: bool = typer.Option(True, help="Show a progress bar (none under --quiet)."),
    restart_stale: bool = typer.Option(
        False,
        help="Discard a checkpoint of another configuration "
        "(the pipeline does: DVC re-runs a stage when its params changed).",
    ),
) -> None:
    """Train one run (what a DVC train stage calls); resumes from its last checkpoint."""
    from knowsam.train import train_run

    params = _load_params(params_file)
    run = _run_ids(params, method, dataset, ratio, seed)
    summary = train_run(
        params, run, progress=progress and _bars(), lines=_state["verbosity"] > 0, restart_stale=restart_stale
    )
    if summary["best_val_dice"] is None:
        typer.echo(
            f"{run.stage_name}: {summary['iterations']} iterations; no validation images "
            f"(data.val_fraction {params.data.val_fraction:g}), so the final weights are the reported ones"
        )
        return
    typer.echo(
        f"{run.stage_name}: {summary['iterations']} iterations, best validation Dice "
        f"{summary['best_val_dice']:.4f} at {summary['best_step']}"
    )


@app.command()
def evaluate(
    dataset: str = DATASET_ARGUMENT,
    ratio: float = typer.Option(...),
    seed: int = typer.Option(...),
    methods: str | None = typer.Option(
        None,
        help=f"{METHODS_HELP} (default: every method in params, as the evaluate stage does).",
        autocompletion=_complete_method,
    ),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Score the trained runs of one (dataset, ratio, seed) group on every test set of the dataset."""
    from knowsam.evaluate import evaluate_group

    params = _load_params(params_file)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else list(params.methods)
    if not names:
        raise KnowsamError("--methods names no method", 2)
    for name in names:  # every name checked before any scoring
        _run_ids(params, name, dataset, ratio, seed)

    def report(method: str, summary: dict) -> None:
        parts = ", ".join(f"{k} {v['mDice']:.4f}" for k, v in summary["test_sets"].items())
        typer.echo(f"{_run_ids(params, method, dataset, ratio, seed).stage_name}: mDice {parts}")

    evaluate_group(params, dataset, ratio, seed, names, on_result=report)


@app.command()
def leaderboard(
    params_file: Path = PARAMS_OPTION,
    out: Path = typer.Option(
        Path("reports"),
        help="Folder for leaderboard.md/.csv and figures (replaces only the files the leaderboard wrote there).",
    ),
    allow_stale: bool = ALLOW_STALE_OPTION,
) -> None:
    """Build reports/leaderboard.md and .csv from every run of the params matrix evaluated under the current
    params and code."""
    from knowsam.report.leaderboard import write_leaderboard
    from knowsam.report.results import repro_hint

    params = _load_params(params_file)
    path, results = write_leaderboard(params, out, allow_stale=allow_stale)
    typer.echo(f"wrote {path}")
    if results.left_out:
        typer.echo(f"left out {len(results.left_out)} run(s): {repro_hint(results.left_out)}")
    if results.stale:
        typer.echo(f"shown marked as stale: {', '.join(map(str, results.stale))}")


@app.command("teacher-check")
def teacher_check(
    dataset: str = DATASET_ARGUMENT,
    prompt: list[str] = typer.Option(
        ["box"],
        "--prompt",
        help="box (ground-truth boxes) or none (whole-image box); repeat to score both from one encoder pass.",
    ),
    limit: int | None = typer.Option(None, help="Only the first N cases of each test set."),
    sets: str | None = typer.Option(None, help="Comma-separated test sets (default: all)."),
    fmt: OutputFormat = FORMAT_OPTION,
    raw: Path | None = typer.Option(None, help="Raw dataset folder (default: data.raw_root/DATASET)."),
    arch: str | None = typer.Option(None, help="SAM arch (default: params sam.arch)."),
    checkpoint: str | None = typer.Option(None, help="SAM checkpoint (default: params sam.checkpoint)."),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Score the pretrained SAM teacher alone on the dataset's test sets, prompted with boxes."""
    import json

    from knowsam.teacher_check import check_prompts, pretrained_teacher
    from knowsam.teacher_check import teacher_check as check

    params = _load_params(params_file)
    if limit is not None and limit < 1:
        raise KnowsamError(f"--limit {limit} must be >= 1", 2)
    prompts = tuple(dict.fromkeys(prompt))
    check_prompts(prompts)
    folder = raw if raw is not None else Path(params.data.raw_root) / dataset
    if not folder.is_dir():
        raise KnowsamError(
            f"{folder}: raw dataset folder not found; run `knowsam-bench acquire {dataset}` or pass --raw"
        )
    teacher, weights = pretrained_teacher(
        arch or params.sam.arch,
        checkpoint or params.sam.checkpoint,
        params.sam.cache_dir,
        params.train,
        params.sam.amp_bf16,
    )
    only = [t.strip() for t in sets.split(",") if t.strip()] if sets is not None else None
    result = check(dataset, folder, teacher, prompts, limit=limit, test_sets=only)
    result["teacher"] = weights
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"{dataset}: {weights}; {result['images']} images in {result['seconds']:.0f} s")
    for name, parts in result["scores"].items():
        for part, entry in parts.items():
            classes = "".join(f", {c} {_score(v)}" for c, v in entry.get("per_class", {}).items())
            excluded = entry["excluded"]
            left_out = (
                f"; {len(excluded)} excluded, an empty ground truth gives no box: "
                f"{', '.join(excluded[:5])}{', ...' if len(excluded) > 5 else ''}"
                if excluded
                else ""
            )
            typer.echo(
                f"  --prompt {name:<4} {part}: mDice {_score(entry['mDice'])} (n={entry['n']}){classes}{left_out}"
            )


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@app.command()
def score(
    pred_dir: Path = typer.Argument(..., help="Folder of predictions: probability maps or masks."),
    gt_dir: Path = typer.Argument(..., help="Folder of ground-truth masks, matched by file stem."),
    threshold: float = typer.Option(0.5, help="A probability map's foreground: probability > threshold."),
    pred_encoding: str = typer.Option(
        "auto",
        "--pred-encoding",
        help="auto | labels (read as masks, like ground truth) | probability "
        "(grey level / full scale) | colormap:<name> (matplotlib's). "
        "auto refuses what it cannot tell apart.",
    ),
    fmt: OutputFormat = FORMAT_OPTION,
    out: Path | None = typer.Option(
        None, help="Write the per-image CSV here (a new file, or one score wrote; not inside the folders it reads)."
    ),
    resize: bool = typer.Option(
        False, "--resize", help="Resize predictions of another size to their mask's (refused otherwise)."
    ),
) -> None:
    """Score any folder of predictions against ground-truth masks at the masks' resolution."""
    from knowsam.report.score import score_command

    raise typer.Exit(score_command(pred_dir, gt_dir, threshold, out, fmt is OutputFormat.json, resize, pred_encoding))


@app.command()
def compare(
    methods: list[str] = typer.Option(
        ..., "--methods", help=f"{METHODS_HELP}, e.g. ucmt,knowsam.", autocompletion=_complete_method
    ),
    dataset: str | None = typer.Option(None, help="Only this dataset.", autocompletion=_complete_dataset),
    ratio: float | None = typer.Option(None, help="Only this labeled ratio."),
    fmt: CompareFormat = typer.Option(
        CompareFormat.table,
        "--format",
        help="table: terminal tables; md: Markdown with the Holm and over-seeds p-values; json: one object.",
    ),
    metric: str | None = typer.Option(
        None, "--metric", help="Summary name of the metric compared, e.g. mIoU or HD95 (default: mDice)."
    ),
    allow_stale: bool = ALLOW_STALE_OPTION,
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Compare methods: mean ± std over seeds, difference, paired Wilcoxon p-value, paper number."""
    from knowsam.report.compare import DEFAULT_METRIC, compare_command

    raise typer.Exit(
        compare_command(params_file, methods, dataset, ratio, fmt.value, allow_stale, metric or DEFAULT_METRIC)
    )


@app.command()
def publish(
    out: Path = typer.Argument(
        ..., help="A new folder, or one publish wrote before (it is replaced), e.g. reports/published/cpu."
    ),
    methods: str = typer.Option(
        "ucmt,knowsam",
        "--compare",
        help="Methods for the comparison (first = baseline).",
        autocompletion=_complete_method,
    ),
    wall_seconds: float | None = typer.Option(None, help="Wall time of the pipeline run, in seconds."),
    command: str = typer.Option("dvc repro", help="The command that produced the runs."),
    allow_stale: bool = ALLOW_STALE_OPTION,
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Freeze the evaluated runs into a folder for Git: leaderboard, figures, comparison, params, versions."""
    from knowsam.report.compare import parse_methods
    from knowsam.report.publish import publish as publish_results

    path = publish_results(
        params_file, out, parse_methods(methods), wall_seconds=wall_seconds, command=command, allow_stale=allow_stale
    )
    typer.echo(f"wrote {path}")


@app.command()
def plan(
    params_file: Path = PARAMS_OPTION,
    steps: int = typer.Option(2, min=1, help="Training steps timed per method (after one warm-up step)."),
    fmt: OutputFormat = FORMAT_OPTION,
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Also break each method's step into its parts, beside a labeled-only step measured in the same run.",
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="KEY=VALUE: plan with this param changed, e.g. data.image_size=128 or 'methods=[knowsam]' (repeatable).",
    ),
) -> None:
    """Before `dvc repro`: the runs the params expand to, those complete, and the training time on this machine."""
    import json

    from rich.console import Console
    from rich.table import Table

    from knowsam.plan import duration, make_plan, profile_steps, render, with_overrides

    params = with_overrides(_load_params(params_file), overrides)
    breakdown = profile_steps(params, params.methods, steps) if profile else None
    measured = {m["method"]: m["step_s"] for m in breakdown["methods"]} if breakdown else None
    result = make_plan(params, steps=steps, step_seconds=measured)
    if breakdown:
        result["breakdown"] = breakdown
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"profile '{result['profile']}': {result['iterations']} iterations per run")
    for header in ("Method", "s/step", "Per run", "Runs", "To train"):
        table.add_column(header, justify="left" if header == "Method" else "right")
    for m in result["methods"]:
        table.add_row(m["method"], f"{m['step_s']:.3f}", duration(m["run_s"]), str(m["runs"]), str(m["pending"]))
    console = Console()
    console.print(table)
    for line in render(result):
        console.print(line, soft_wrap=True, highlight=False)
    if breakdown:
        console.print(_profile_table(breakdown, params))


def _profile_table(breakdown: dict, params):
    """One column per method, one row per part of a step (the step, then its parts, in seconds)."""
    from rich.table import Table

    from knowsam.step_timing import PARTS

    methods = breakdown["methods"]
    parts = [p for p in (*PARTS, "data", "other") if any(p in m["parts"] for m in methods)]
    t, s = params.train, params.sam
    table = Table(
        title=f"Seconds per step by part: {params.data.image_size} px, batch {t.batch_size} "
        f"({t.labeled_batch} labeled), {t.threads or 'default'} threads, SAM {s.arch} "
        f"({s.encoder} encoder, prompt grid {s.prompt_grid}, bf16 {str(s.amp_bf16).lower()}); "
        f"medians of {breakdown['steps']} step(s)"
    )
    table.add_column("Part")
    for m in methods:
        table.add_column(m["method"], justify="right")
    table.add_row("step", *(f"{m['step_s']:.3f}" for m in methods))
    table.add_row(f"x {breakdown['reference']}", *(f"{m['vs_reference']:.2f}" for m in methods))
    table.add_row("teacher (its parts below)", *(f"{m['teacher_s']:.3f}" for m in methods))
    for part in parts:
        table.add_row(part, *(f"{m['parts'][part]:.3f}" if part in m["parts"] else "-" for m in methods))
    return table


publication_app = typer.Typer(
    help="A publication folder whose results accumulate in Git run by run, across machines: its params.yaml "
    "(the matrix) and runs/ (each evaluated run's results). See docs/publications.md.",
    no_args_is_help=True,
)
app.add_typer(publication_app, name="publication")
FOLDER_ARGUMENT = typer.Argument(..., help="The publication folder, e.g. reports/published/cpu-ranked.")
STATE_STYLES = {"done": "green", "missing": "red", "stale": "yellow"}


@publication_app.command("status")
def publication_status(folder: Path = FOLDER_ARGUMENT, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """The publication's matrix: each run done, missing or stale (with the reason), and what is left."""
    import json

    from rich.console import Console
    from rich.table import Table

    from knowsam.plan import duration
    from knowsam.report.publication import STATES, Publication, recorded_seconds, status
    from knowsam.report.results import ratio_label

    pub = Publication(folder)
    params = pub.params()
    states = status(pub, params)
    known = recorded_seconds(states)
    todo = [s.run for s in states if s.state != "done"]
    estimate = sum(known.get((r.dataset, r.method), 0.0) for r in todo)
    unknown = sum((r.dataset, r.method) not in known for r in todo)
    counts = {state: sum(s.state == state for s in states) for state in STATES}
    if fmt is OutputFormat.json:
        typer.echo(
            json.dumps(
                {
                    "folder": str(folder),
                    "training_code": pub.pin(),
                    "runs": [s.to_dict() for s in states],
                    "counts": counts,
                    "todo_seconds_recorded": round(estimate, 1),
                    "todo_without_record": unknown,
                }
            )
        )
        return
    console = Console()
    for dataset in params.datasets:
        for ratio in params.ratios:
            table = Table(title=f"{folder}: {dataset}, {ratio_label(ratio)} labeled")
            for header in ("Method", "Done", *(f"seed {s}" for s in params.seeds)):
                table.add_column(header, justify="left" if header == "Method" else "right")
            for method in params.methods:
                row = [s for s in states if (s.run.dataset, s.run.ratio, s.run.method) == (dataset, ratio, method)]
                table.add_row(
                    method,
                    f"{sum(s.state == 'done' for s in row)}/{len(row)}",
                    *(f"[{STATE_STYLES[s.state]}]{s.state}[/]" for s in row),
                )
            console.print(table)
    for s in states:
        if s.state == "stale":
            console.print(f"stale: {s.run.stage_name} ({s.reason})", soft_wrap=True, highlight=False)
    pin = pub.pin()
    console.print(
        f"training code: {pin['fingerprint']}, pinned at commit {str(pin.get('commit'))[:12]} ({pub.pin_file})"
        if pin
        else "training code: this checkout's (not pinned)",
        soft_wrap=True,
        highlight=False,
    )
    line = f"{counts['done']} of {len(states)} runs done, {counts['missing']} missing, {counts['stale']} stale"
    if todo:
        cost = "no done run of their dataset and method to time them by"
        if estimate:
            cost = f"about {duration(estimate)} at the done runs' wall times" + (
                f", {unknown} of them not counted: no done run of their dataset and method" if unknown else ""
            )
        line += f"; make them with `knowsam-bench publication run {folder}` ({cost})"
    console.print(line + ".", soft_wrap=True, highlight=False)


@publication_app.command("run")
def publication_run(
    folder: Path = FOLDER_ARGUMENT,
    jobs: int = typer.Option(
        1, "--jobs", help="Runs side by side (on a CPU: two 1-thread runs make more progress than one 2-thread run)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="torch threads per run (default: train.threads for one job, 1 for several)."
    ),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Start no run that its estimate says would end after this many minutes from now."
    ),
    commit: bool = typer.Option(
        False, "--commit", help="git commit each run's results alone as soon as they are stored."
    ),
    methods: str | None = typer.Option(
        None, "--methods", help=f"Only these: {METHODS_HELP}, e.g. the key ones first.", autocompletion=_complete_method
    ),
    datasets: str | None = typer.Option(
        None,
        "--datasets",
        help="Only these datasets (comma-separated); the others' data are not made ready.",
        autocompletion=_complete_dataset,
    ),
    restart_stale: bool = typer.Option(
        False, help="Discard a run folder of another configuration in data/runs instead of failing that run."
    ),
) -> None:
    """Train and evaluate the publication's missing and stale runs, storing each run's results once evaluated."""
    from knowsam.plan import duration
    from knowsam.report.compare import parse_methods
    from knowsam.run_missing import run_missing

    outcome = run_missing(
        folder,
        jobs=jobs,
        threads=threads,
        max_minutes=max_minutes,
        commit=commit,
        restart_stale=restart_stale,
        methods=parse_methods(methods) if methods else None,
        datasets=[d.strip() for d in datasets.split(",") if d.strip()] if datasets else None,
        echo=logging.getLogger("knowsam.run_missing").info,  # the runner's notes
    )
    if outcome.not_started:
        typer.echo(
            f"not started, would end after {max_minutes:g} min: "
            + ", ".join(f"{run.stage_name} (about {duration(seconds)})" for run, seconds in outcome.not_started)
        )
    if outcome.todo:
        typer.echo(
            f"stored {len(outcome.stored)} of {len(outcome.todo)} run(s)"
            + (" and committed each" if commit else f"; commit {folder}/runs to keep them")
            + "; then "
            f"`knowsam-bench publication build {folder}`"
        )
    if outcome.failed:
        raise KnowsamError(
            f"{len(outcome.failed)} run(s) failed: "
            + "; ".join(f"{run.stage_name} ({why})" for run, why in outcome.failed)
        )


@publication_app.command("pin")
def publication_pin(
    folder: Path = FOLDER_ARGUMENT,
    replace: bool = typer.Option(
        False, "--replace", help="Replace a pin of other code (every run stored under it becomes stale)."
    ),
) -> None:
    """Pin this checkout's (committed) training code as the one the publication's runs are made with."""
    from knowsam.report.publication import Publication, write_pin

    pub = Publication(folder)
    pub.params()  # a publication folder, not any folder
    pin = write_pin(pub, replace=replace)
    typer.echo(
        f"wrote {pub.pin_file}: training code {pin['fingerprint']} at commit {pin['commit'][:12]}; commit it with "
        "the publication"
    )


@publication_app.command("build")
def publication_build(
    folder: Path = FOLDER_ARGUMENT,
    methods: list[str] = typer.Option(
        ["ucmt,knowsam"],
        "--compare",
        help="Methods of one comparison, first = baseline (repeatable).",
        autocompletion=_complete_method,
    ),
    allow_stale: bool = ALLOW_STALE_OPTION,
) -> None:
    """Build the publication's report/ (leaderboard, figures, comparisons, status README) from its folder alone."""
    from knowsam.report.compare import parse_methods
    from knowsam.report.publication import Publication
    from knowsam.report.publication_build import build

    typer.echo(f"wrote {build(Publication(folder), [parse_methods(m) for m in methods], allow_stale=allow_stale)}")


@app.command()
def pipeline(
    write: bool = typer.Option(False, "--write", help="Write dvc.yaml's code deps from knowsam/pipeline.py."),
    check: bool = typer.Option(False, "--check", help="Fail, naming the stages, where they differ from it."),
    dvc_file: Path = typer.Option(Path("dvc.yaml"), "--file", help="The pipeline file."),
) -> None:
    """dvc.yaml's code deps from the one table of what each stage runs (knowsam/pipeline.py)."""
    if write == check:
        raise KnowsamError("give one of --write and --check", 2)
    from knowsam import dvc_yaml

    typer.echo(dvc_yaml.write(dvc_file) if write else dvc_yaml.check(dvc_file))


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="Seconds instead of minutes: reduced sizes (for tests)."),
    out: Path = typer.Option(
        Path("reports/benchmarks.md"), help="Markdown report to write (a new file, or one bench wrote)."
    ),
    threads: int = typer.Option(2, help="torch threads for the training steps."),
    mirror: Path | None = typer.Option(None, help="Offline data mirror (default: $KNOWSAM_MIRROR)."),
) -> None:
    """Measure step times, data-wait share, scoring/preparation throughput, CLI and pipeline overheads."""
    from knowsam.bench import run_bench

    typer.echo(f"wrote {run_bench(out, quick=quick, threads=threads, mirror=mirror)}")


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread. Not a ``KeyboardInterrupt``, which typer turns into
    a silent exit; it unwinds through every atomic write, so nothing half-written is left."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM stop any command with one line (see :func:`main`); handlers restored afterwards."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    owner = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != owner:  # a forked worker (a process pool) ends silently, as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point: turns expected errors into one stderr line and an exit status; SIGINT and SIGTERM
    into ``interrupted (<signal>)`` and 128 + the signal's number (130, 143), as a shell reports them."""
    try:
        with _stop_on_signals():
            # Not standalone: click's usage errors come here, to be one line like every other error.
            status = app(args=argv, prog_name="knowsam-bench", standalone_mode=False)
        return status if isinstance(status, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TyperException as exc:  # bad or missing options and arguments (click's UsageError and kin)
        message = exc.format_message()
        if message:  # no arguments at all: the help was printed already
            print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KnowsamError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"interrupted ({exc}); nothing was left half-written, rerun the command to continue", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # the machine, not the code: disk full or out of memory get one line too
        line = environment_failure(exc)
        if line is None or _state["debug"]:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def console_main() -> None:
    sys.exit(main())

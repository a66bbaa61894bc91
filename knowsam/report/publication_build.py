"""``knowsam-bench publication build``: a publication's ``report/`` from its params file and ``runs/`` alone.

The leaderboard (Markdown, CSV, bar chart, training curves), one comparison per ``--compare`` and a
README with the matrix's status, the machine time and the package versions the runs recorded. Nothing
is read from data/ and nothing depends on the date or the machine that builds, so a fresh clone
rebuilds the committed report byte for byte. While runs are missing or stale the report says so:
the leaderboard's cells show n, "Runs left out" names each run, each comparison says which runs
its numbers lack, and the README's status table shows every run.

``report/`` is the build's own folder: it is rebuilt beside its place and renamed into it
(``fileio.atomic_dir``), and refused if it holds anything the build did not write.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from knowsam import fileio
from knowsam.config import Params
from knowsam.report.compare import compare, render_markdown
from knowsam.report.leaderboard import write_leaderboard
from knowsam.report.publication import PIN, Publication, RunState, run_seconds, status
from knowsam.report.results import ratio_label

BUILD_WRITER = "knowsam-bench publication build"


def compare_name(methods: list[str]) -> str:
    return "compare-" + "-vs-".join(methods)


def build(pub: Publication, compare_sets: list[list[str]], *, allow_stale: bool = False) -> Path:
    """Write ``pub.report_dir``; returns it. ``compare_sets``: the methods of each comparison (first = baseline)."""
    params = pub.params()
    fileio.check_replaceable(pub.report_dir, BUILD_WRITER, [pub.runs_root, pub.params_file])  # before any work
    states = status(pub, params)
    code = pub.code()
    comparisons = {
        compare_name(m): compare(
            params, m, eval_root=pub.runs_root, runs_root=None, allow_stale=allow_stale, incomplete=True, code=code
        )
        for m in compare_sets
    }
    with fileio.atomic_dir(pub.report_dir, writer=BUILD_WRITER, inputs=[pub.runs_root, pub.params_file]) as tmp:
        write_leaderboard(
            params,
            tmp,
            pub.runs_root,
            overlays=False,
            allow_stale=allow_stale,
            runs_root=None,
            produce=pub.produce,
            code=code,
        )
        for name, comparison in comparisons.items():
            fileio.write_text(tmp / f"{name}.md", render_markdown(comparison))
            fileio.write_text(tmp / f"{name}.json", json.dumps(comparison.to_dict(), indent=2) + "\n")
        fileio.write_text(tmp / "README.md", readme(pub, params, states, compare_sets, allow_stale))
    return pub.report_dir


def build_command(pub: Publication, compare_sets: list[list[str]], allow_stale: bool) -> str:
    options = [f"--compare {','.join(m)}" for m in compare_sets] + (["--allow-stale"] if allow_stale else [])
    return " ".join([f"knowsam-bench publication build {pub.folder}", *options])


def readme(
    pub: Publication, params: Params, states: list[RunState], compare_sets: list[list[str]], allow_stale: bool
) -> str:
    counts = Counter(s.state for s in states)
    complete = counts["done"] == len(states)
    lines = [
        f"# Publication `{pub.folder.name}`",
        "",
        f"Built by `{build_command(pub, compare_sets, allow_stale)}` from `params.yaml` (the matrix and "
        "every setting) and `runs/` (each evaluated run's results, stored as it finished) alone.",
        "",
        pin_line(pub),
        "",
        "## Status",
        "",
        f"{counts['done']} of {len(states)} runs done, {counts['missing']} missing, {counts['stale']} stale"
        + (
            ": complete."
            if complete
            else f". **Incomplete**: continue with `{pub.produce}`; the tables show "
            "n (seeds) per cell and name the runs they lack."
        ),
        "",
        *status_table(params, states),
        "",
    ]
    stale = [s for s in states if s.state == "stale"]
    if stale:
        lines += [
            "Stale (scored under other params or code than these; "
            + ("shown marked †" if allow_stale else "left out of the tables")
            + "): "
            + ", ".join(f"{s.run.stage_name} ({s.reason})" for s in stale)
            + ".",
            "",
        ]
    lines += [
        "## Machine time",
        "",
        *machine_time(params, states),
        "",
        "## Package versions",
        "",
        *versions(states),
        "",
        "## Files",
        "",
        "| File | What |",
        "|---|---|",
        "| [leaderboard.md](leaderboard.md), [leaderboard.csv](leaderboard.csv) | the leaderboard, with its "
        "footnotes; [figures/](figures/): its bar chart and the training curves |",
        *(
            f"| [{compare_name(m)}.md]({compare_name(m)}.md), [.json]({compare_name(m)}.json) | "
            f"`knowsam-bench compare --methods {','.join(m)}` over the stored runs |"
            for m in compare_sets
        ),
        f"| `{fileio.OUTPUT_RECORD}` | what the build wrote here, so that building again replaces exactly that |",
    ]
    return "\n".join(lines) + "\n"


def pin_line(pub: Publication) -> str:
    pin = pub.pin()
    if pin is None:
        return "Training code: the code that built this report (`runs.code_fingerprint`; not pinned)."
    return (
        f"Training code: `{pin['fingerprint']}`, pinned at commit `{pin.get('commit')}` ({pin.get('pinned_utc')}; "
        f"`{PIN}`): every run counted as done was trained and scored with it."
    )


def status_table(params: Params, states: list[RunState]) -> list[str]:
    """One row per dataset x ratio x method: n done and each seed's state."""
    lines = [
        "| Dataset | Labeled | Method | Done | " + " | ".join(f"seed {s}" for s in params.seeds) + " |",
        "|---|---|---|---|" + "---|" * len(params.seeds),
    ]
    for dataset in params.datasets:
        for ratio in params.ratios:
            for method in params.methods:
                row = [s for s in states if (s.run.dataset, s.run.ratio, s.run.method) == (dataset, ratio, method)]
                done = sum(s.state == "done" for s in row)
                cells = [s.state for s in row]  # status lists a run's seeds in params order
                lines.append(
                    f"| {dataset} | {ratio_label(ratio)} | {method} | {done}/{len(row)} | " + " | ".join(cells) + " |"
                )
    return lines


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def machine_time(params: Params, states: list[RunState]) -> list[str]:
    """Training and evaluation wall time per dataset, summed over the done runs that recorded it from step 0."""
    lines = ["| Dataset | Runs timed | Training | Evaluation | Total |", "|---|---|---|---|---|"]
    untimed = []
    for dataset in params.datasets:
        done = [s for s in states if s.run.dataset == dataset and s.state == "done"]
        timed = [s.record["wall_seconds"] for s in done if run_seconds(s.record) is not None]
        untimed += [s.run.stage_name for s in done if run_seconds(s.record) is None]
        train, evaluate = sum(w["train"] for w in timed), sum(w["evaluate"] for w in timed)
        lines.append(
            f"| {dataset} | {len(timed)} of {len(done)} done | {_hours(train)} | {_hours(evaluate)} | "
            f"{_hours(train + evaluate)} |"
        )
    setups = Counter(
        (s.record.get("side_by_side"), s.record.get("threads"), s.record.get("machine", {}).get("cpu"))
        for s in states
        if s.state == "done" and s.record
    )
    if setups:
        lines += [
            "",
            "Runs made "
            + "; ".join(
                f"{jobs} side by side with {threads} thread(s) each on {cpu} ({n} runs)"
                for (jobs, threads, cpu), n in sorted(setups.items(), key=str)
            )
            + "; each run's `run.json` has its own times.",
        ]
    if untimed:
        lines += ["", f"Not in the sums (resumed from an earlier sitting's checkpoint): {', '.join(untimed)}."]
    return lines


def versions(states: list[RunState]) -> list[str]:
    """Each package's versions over the done runs' records, with the number of runs per version."""
    seen: dict[str, Counter] = {}
    for s in states:
        if s.state == "done" and s.record:
            for package, version in sorted((s.record.get("packages") or {}).items()):
                seen.setdefault(package, Counter())[version] += 1
    if not seen:
        return ["No done run recorded its packages."]
    lines = ["| Package | Version (runs) |", "|---|---|"]
    for package, counter in seen.items():
        lines.append(f"| {package} | " + ", ".join(f"{v} ({n})" for v, n in sorted(counter.items())) + " |")
    return lines

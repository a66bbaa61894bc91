"""``knowsam-bench publish``: freeze the results of a finished pipeline into a folder meant for Git.

The folder holds everything a reader needs to judge the numbers without the run itself: the
leaderboard (Markdown + CSV) and its figures, regenerated from the evaluated runs; a method
comparison (Markdown + JSON); the exact params; package versions and machine facts; and a
README with the wall time and the commands that produced it. It is written to a temporary
sibling folder and renamed into place, so a failure leaves the previous publication intact.
It goes only into a new folder or one publish wrote before, untouched since (``fileio.atomic_dir``):
a folder holding anything else, the workspace, its inputs or a Git repository is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

from knowsam import fileio, validation
from knowsam.config import Params
from knowsam.machine import cpu_model
from knowsam.report.compare import compare, render_markdown
from knowsam.report.leaderboard import write_leaderboard

WRITER = "knowsam-bench publish"
PACKAGES = (
    "knowsam-bench",
    "torch",
    "torchvision",
    "segment-anything",
    "dvc",
    "dvclive",
    "numpy",
    "scipy",
    "pandas",
    "medpy",
    "scikit-image",
    "SimpleITK",
    "h5py",
    "Pillow",
    "typer",
    "rich",
    "PyYAML",
    "matplotlib",
)


def package_versions() -> dict[str, str]:
    """Installed version of each package the numbers depend on ("not installed" where absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_facts() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{seconds:.0f} s ({minutes} min {secs:02d} s)"


def _readme(
    params: Params,
    compare_methods: list[str],
    wall_seconds: float | None,
    command: str,
    versions: dict[str, str],
    machine: dict[str, str],
) -> str:
    t = params.train
    wall = _duration(wall_seconds) if wall_seconds is not None else "not recorded"
    methods = ",".join(compare_methods)
    lines = [
        f"# Published results: profile `{params.profile}`",
        "",
        f"Published on {_dt.date.today().isoformat()} by `knowsam-bench publish`.",
        "",
        f"- Pipeline: `{command}`; wall time {wall}.",
        f"- Matrix: datasets {', '.join(params.datasets)}; methods {', '.join(params.methods)}; "
        f"labeled ratios {', '.join(f'{r:g}' for r in params.ratios)}; seeds {', '.join(map(str, params.seeds))}.",
        f"- Training: {params.data.image_size} px, {t.iterations} iterations, batch {t.batch_size} "
        f"({t.labeled_batch} labeled), lr {t.lr:g}, {t.threads} threads on {t.device}.",
        f"- SAM: `{params.sam.arch}`, checkpoint `{params.sam.checkpoint}`.",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}; "
        f"torch {versions['torch']}.",
        "",
        "| File | What |",
        "|---|---|",
        "| [leaderboard.md](leaderboard.md), [leaderboard.csv](leaderboard.csv) | the leaderboard, with its footnotes |",
        "| [figures/](figures/) | bar chart of the leaderboard, training curves (overlays show dataset images: regenerate them "
        "with `dvc repro`, they are not published) |",
        f"| [compare.md](compare.md), [compare.json](compare.json) | `knowsam-bench compare --methods {methods}` |",
        "| [params.yaml](params.yaml) | the exact parameters of the run |",
        "| [versions.json](versions.json) | package versions and machine facts |",
        f"| `{fileio.OUTPUT_RECORD}` | what publish wrote here, so that publishing again replaces exactly that |",
    ]
    return "\n".join(lines) + "\n"


def publish(
    params_file: str | Path,
    out_dir: str | Path,
    compare_methods: list[str],
    *,
    wall_seconds: float | None = None,
    command: str = "dvc repro",
    eval_root: str | Path = "data/eval",
    allow_stale: bool = False,
) -> Path:
    """Write the publication folder ``out_dir`` from the evaluated runs of ``params_file``; returns it.

    Every run of the comparison must be evaluated under these params and the current code
    (``compare`` raises otherwise, unless ``allow_stale``: then stale runs are published marked);
    the leaderboard names the runs it leaves out in its own notes.
    """
    out_dir, inputs = Path(out_dir), [params_file, eval_root]
    fileio.check_replaceable(out_dir, WRITER, inputs)  # before any work
    params = validation.load(params_file)
    comparison = compare(params, compare_methods, eval_root=eval_root, allow_stale=allow_stale)
    versions, machine = package_versions(), machine_facts()
    with fileio.atomic_dir(out_dir, writer=WRITER, inputs=inputs) as tmp:
        # No overlays: they show dataset images, which a Git repository must not redistribute.
        write_leaderboard(params, tmp, eval_root, overlays=False, allow_stale=allow_stale)
        fileio.write_text(tmp / "compare.md", render_markdown(comparison))
        fileio.write_text(tmp / "compare.json", json.dumps(comparison.to_dict(), indent=2) + "\n")
        shutil.copyfile(params_file, tmp / "params.yaml")
        fileio.write_json(tmp / "versions.json", {"packages": versions, "machine": machine})
        fileio.write_text(tmp / "README.md", _readme(params, compare_methods, wall_seconds, command, versions, machine))
    return out_dir

"""KnowSAM's outputs over training, arm by arm: validation Dice curves, the stability check, test mDice.

Each argument is ``label=<runs root>``: a publication's ``runs/`` folder or a workspace's
``data/eval`` (the same layout), holding a knowsam run of the dataset, ratio and seed given. For
every arm it reads the run's ``curves.csv`` (validation Dice of the fused output, of each student
alone and of the SAM teacher, every ``train.eval_every`` iterations) and ``summary.json`` (its
configuration and test scores), then prints Markdown: the curves side by side, and per arm the
mixing start, the fused output's best validation Dice, its lowest after mixing starts and whether
that stays above half the best (issue "CPU publication": the stability criterion), and the test
mDice of the fused and SAM outputs; then each student's supervised and distillation terms averaged
over windows of ``--window`` iterations (which term drives a student). ``--figure`` draws the four
outputs' curves, one panel each. A root may also be a publication folder (its ``runs/`` is read).

    python benchmarks/knowsam_study.py --figure study.png \\
        "official schedule=reports/published/cpu-ranked/runs" "no KD=reports/published/cpu-ranked/knowsam-study/kd0/runs"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

OUTPUTS = {  # curves.csv column -> what it is
    "val_dice": "fused (reported)",
    "val_dice_unet": "U-Net alone",
    "val_dice_vnet": "V-Net alone",
    "val_dice_sam": "SAM teacher",
}


TERMS = ("unet_sup", "unet_kd", "vnet_sup", "vnet_kd")  # curves.csv columns: each student's CE+Dice and KD


def load_arm(root: Path, dataset: str, ratio: str, seed: int) -> tuple[pd.DataFrame, dict]:
    """(every curves.csv row indexed by step, summary.json) of the knowsam run under ``root``."""
    runs_root = root / "runs" if (root / "params.yaml").is_file() else root
    folder = runs_root / dataset / f"ratio-{ratio}_seed-{seed}" / "knowsam"
    curves = pd.read_csv(folder / "curves.csv").set_index("step")
    summary = json.loads((folder / "summary.json").read_text())
    return curves, summary


def validation(curves: pd.DataFrame) -> pd.DataFrame:
    """The validation rows, one column per output."""
    return curves.dropna(subset=["val_dice"])[[c for c in OUTPUTS if c in curves]]


def term_windows(curves: pd.DataFrame, window: int) -> pd.DataFrame:
    """Mean of each of ``TERMS`` over iterations 1-window, window+1-2 window, ... (rows: terms)."""
    terms = curves[[t for t in TERMS if t in curves]]
    first = (terms.index - 1) // window * window + 1
    means = terms.groupby(first).mean().T
    means.columns = [f"{a}-{a + window - 1}" for a in means.columns]
    return means


def mixing_start(summary: dict) -> int:
    """The first iteration of the mixed stage (knowsam's ``mixed_iterations``: a fraction of the run or a count)."""
    cfg = summary["config"]
    iterations = cfg["train"]["iterations"]
    mixed = cfg["method_params"]["mixed_iterations"]
    return round(mixed * iterations) if isinstance(mixed, float) and mixed <= 1.0 else int(mixed)


def stability(fused: pd.Series, start: int, iterations: int) -> tuple[str, float, str]:
    """(mixing start, lowest fused Dice from the start on, whether it stays >= half the run's best)."""
    if start >= iterations - 1:  # official: the mixed stage runs while iter_num > mixed_iterations
        return "never", float("nan"), "-"
    after = fused[fused.index >= start]
    lowest = after.min() if len(after) else float("nan")
    return str(start), lowest, "yes" if len(after) and lowest >= fused.max() / 2 else "no"


def test_mdice(summary: dict, variant: str) -> dict[str, float]:
    """Test-set mDice (%) of the reported output (variant "") or a variant such as "sam"."""
    tables = summary["test_sets"] if not variant else (summary.get("variants") or {}).get(variant, {})
    return {test_set: 100 * metrics["mDice"] for test_set, metrics in tables.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arms", nargs="+", help="label=<runs root>")
    parser.add_argument("--dataset", default="polyp")
    parser.add_argument("--ratio", default="0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=200, help="Iterations per window of the terms table.")
    parser.add_argument("--figure", type=Path, help="Draw the curves into this PNG.")
    args = parser.parse_args(argv)
    arms = {}
    for arm in args.arms:
        label, _, root = arm.partition("=")
        if not root:
            parser.error(f"{arm!r}: expected label=<runs root>")
        try:
            arms[label] = load_arm(Path(root), args.dataset, args.ratio, args.seed)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {root}: no readable knowsam run of {args.dataset} {args.ratio} seed {args.seed} ({exc})")
            return 1
    table = pd.concat(
        {
            f"{label}: {OUTPUTS[c]}": validation(curves)[c]
            for label, (curves, _) in arms.items()
            for c in validation(curves)
        },
        axis=1,
    )
    print("| iteration | " + " | ".join(table.columns) + " |")
    print("|---" * (len(table.columns) + 1) + "|")
    for step, row in table.iterrows():
        print(f"| {step} | " + " | ".join("" if pd.isna(v) else f"{v:.3f}" for v in row) + " |")
    print()
    print(
        "| arm | mixing from | fused best (iteration) | fused lowest after mixing starts | >= half the best | "
        "test mDice fused | test mDice SAM |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, (curves, summary) in arms.items():
        fused = validation(curves)["val_dice"]
        start, lowest, holds = stability(fused, mixing_start(summary), summary["config"]["train"]["iterations"])
        tests = {k: " / ".join(f"{v:.2f}" for v in test_mdice(summary, k).values()) for k in ("", "sam")}
        print(
            f"| {label} | {start} | {fused.max():.3f} ({fused.idxmax()}) | {lowest:.3f} | {holds} | "
            f"{tests['']} | {tests['sam']} |"
        )
    test_sets = list(test_mdice(next(iter(arms.values()))[1], ""))
    print(
        f"\nTest sets, in order: {', '.join(test_sets)}. Iterations count from 1; validation every "
        f"{int(table.index[1] - table.index[0]) if len(table) > 1 else '?'} iterations."
    )
    print_terms(arms, args.window)
    if args.figure:
        draw(arms, args.figure)
        print(f"wrote {args.figure}")
    return 0


def print_terms(arms: dict[str, tuple[pd.DataFrame, dict]], window: int) -> None:
    tables = {label: term_windows(curves, window) for label, (curves, _) in arms.items()}
    columns = max((t.columns for t in tables.values()), key=len)
    print(f"\nLoss terms, mean per window of {window} iterations:\n")
    print("| arm | term | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for label, table in tables.items():
        for term, row in table.reindex(columns=columns).iterrows():
            print(f"| {label} | {term} | " + " | ".join("" if pd.isna(v) else f"{v:.3f}" for v in row) + " |")


def draw(arms: dict[str, tuple[pd.DataFrame, dict]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey=True).ravel()
    for ax, (column, title) in zip(axes, OUTPUTS.items()):
        for i, (label, (run_curves, summary)) in enumerate(arms.items()):
            curves = validation(run_curves)
            if column in curves:
                line = ax.plot(curves.index, curves[column], label=label, color=f"C{i}", lw=1.3)[0]
                ax.axvline(mixing_start(summary), color=line.get_color(), ls=":", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("iteration")
    for ax in axes[::2]:
        ax.set_ylabel("validation Dice")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("KnowSAM outputs during training (dotted: the mixed stage starts)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))


if __name__ == "__main__":
    sys.exit(main())

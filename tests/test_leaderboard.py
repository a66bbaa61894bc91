"""Leaderboard tables, CSV, footnotes and figures on fabricated evaluation outputs.

Per-case Dice values are chosen so that every expected cell can be worked out by hand:
case i of a test set scores base + 0.02 x seed + 0.01 x i (minus 0.05 on CVC-ClinicDB),
IoU = 0.8 x Dice.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from knowsam import config, fileio
from knowsam.data.dataset import FORMAT_VERSION, PreparedDataset
from knowsam.metrics import EMPTY_MASK_POLICY, summarize
from knowsam.report import figures, reference
from knowsam.report.figures import mean_curve, overlay_cases
from knowsam.report.leaderboard import write_leaderboard
from knowsam.report.results import load_per_case
from knowsam.runs import RunId
from knowsam.summaries import identity

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
POLYP_SETS = {"Kvasir": 4, "CVC-ClinicDB": 3}
# tests.conftest imports torch, which the subprocess test below must not.
REPO = Path(__file__).resolve().parents[1]
POLYP_BASE = {"labeled-only": 0.60, "ucmt": 0.70, "knowsam": 0.80, "fully-supervised": 0.90}


def case_rows(
    test_set: str, dice: list[float], variant: str = "", hd95: list[float] | None = None, asd: list[float] | None = None
) -> list[dict]:
    """Per-case rows as evaluate writes them (the metric columns the tables read)."""
    hd95 = hd95 or [20.0 * (1.0 - d) for d in dice]
    asd = asd or [h / 2.0 for h in hd95]
    return [
        {
            "variant": variant,
            "test_set": test_set,
            "case": f"{test_set.lower()}_{i:03d}",
            "dice": d,
            "iou": 0.8 * d,
            "hd95": hd95[i],
            "asd": asd[i],
        }
        for i, d in enumerate(dice)
    ]


def write_run(
    root: Path,
    run: RunId,
    rows: list[dict],
    provenance: dict | None = None,
    resolution: str = "original",
    *,
    params: config.Params,
) -> None:
    """per_case.csv and summary.json under root/data/eval, like evaluate writes them (scored under ``params``
    and this code)."""
    table = pd.DataFrame(rows)
    fileio.write_text(run.eval_dir(root / "data/eval") / "per_case.csv", table.to_csv(index=False))

    def summaries(part: pd.DataFrame) -> dict:
        return {t: summarize(g) for t, g in part.groupby("test_set", sort=True)}

    variants = sorted(set(table.variant) - {""})
    fileio.write_json(
        run.eval_dir(root / "data/eval") / "summary.json",
        {
            "run": dataclasses.asdict(run),
            "best_step": 1,
            "evaluation_resolution": resolution,
            "empty_mask_policy": EMPTY_MASK_POLICY,
            "provenance": provenance or {},
            "test_sets": summaries(table[table.variant == ""]),
            "variants": {v: summaries(table[table.variant == v]) for v in variants},
            **identity(params, run),
        },
    )


def make_params(root: Path, dataset: str, methods: list[str], ratios: list[float], seeds: list[int]) -> config.Params:
    return config.Params(
        profile="unit",
        datasets=[dataset],
        methods=methods,
        ratios=ratios,
        seeds=seeds,
        data=config.DataParams(prepared_root=str(root / "data/prepared"), image_size=64),
        train=config.TrainParams(iterations=300),
        eval=config.EvalParams(overlay_images=3),
    )


def curves_table(level: float, seed: int) -> pd.DataFrame:
    """300 iterations like evaluate copies them: loss every iteration, validation Dice every 100."""
    steps = np.arange(1, 301)
    return pd.DataFrame(
        {
            "step": steps,
            "loss": 1.0 / steps + 0.1 * seed,
            "val_dice": np.where(steps % 100 == 0, level * steps / 300 + 0.02 * seed, np.nan),
        }
    )


def polyp_dice(method: str, seed: int, test_set: str, offset: float = 0.0) -> list[float]:
    shift = -0.05 if test_set == "CVC-ClinicDB" else 0.0
    return [POLYP_BASE[method] + offset + 0.02 * seed + 0.01 * i + shift for i in range(POLYP_SETS[test_set])]


def write_prepared_polyp(root: Path) -> None:
    """A minimal prepared polyp folder (16 px images, odd-sized original masks) for the overlay grid."""
    out = root / "data/prepared/polyp"
    out.mkdir(parents=True)
    fileio.write_json(
        out / "meta.json",
        {
            "format_version": FORMAT_VERSION,
            "dataset": "polyp",
            "num_classes": 2,
            "in_channels": 3,
            "image_size": 16,
            "test_sets": POLYP_SETS,
        },
    )
    rng = np.random.default_rng(0)
    for test_set, n in POLYP_SETS.items():
        np.save(out / f"{test_set}_images.npy", rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8))
        cases = [f"{test_set.lower()}_{i:03d}" for i in range(n)]
        pd.DataFrame(
            {
                "name": cases,
                "case": cases,
                "slice": 0,
                "orig_h": 20,
                "orig_w": 24,
                "spacing_z": 1.0,
                "spacing_y": 1.0,
                "spacing_x": 1.0,
            }
        ).to_csv(out / f"{test_set}_index.csv", index=False)
        masks = {c: (rng.random((20, 24)) > 0.5).astype(np.uint8) for c in cases}
        np.savez(out / f"{test_set}_gt.npz", **masks)


@pytest.fixture(scope="module")
def polyp_workspace(tmp_path_factory) -> tuple[Path, config.Params, str]:
    """Four methods x 2 seeds at 10%; ucmt seed 1 never evaluated; knowsam has a SAM variant and random-init SAM.

    Built once per module (the figures dominate the cost); returns the root, the params and
    the leaderboard text written to root/reports.
    """
    root = tmp_path_factory.mktemp("polyp")
    params = make_params(root, "polyp", list(POLYP_BASE), [0.1], [0, 1])
    for method in POLYP_BASE:
        for seed in (0, 1):
            if (method, seed) == ("ucmt", 1):
                continue
            rows = [r for t in POLYP_SETS for r in case_rows(t, polyp_dice(method, seed, t))]
            provenance = None
            if method == "knowsam":
                rows += [r for t in POLYP_SETS for r in case_rows(t, polyp_dice(method, seed, t, -0.05), "sam")]
                provenance = {"sam_arch": "tiny", "sam_weights": "random-init"}
            run = RunId(method, "polyp", 0.1, seed)
            write_run(root, run, rows, provenance, params=params)
            if (method, seed) != ("knowsam", 1):
                fileio.write_text(
                    run.curves_file(root / "data/eval"), curves_table(POLYP_BASE[method], seed).to_csv(index=False)
                )
            if seed == 0 and method != "ucmt":
                preds = {
                    f"{t}/{r['case']}": np.eye(20, 24, dtype=np.uint8)
                    for t in POLYP_SETS
                    for r in case_rows(t, polyp_dice(method, 0, t))
                }
                np.savez(run.eval_dir(root / "data/eval") / "predictions.npz", **preds)
    write_prepared_polyp(root)
    return root, params, build(root, params)


def section_table(text: str, heading: str, first_header: str = "| Method") -> list[list[str]]:
    """Cells of the first Markdown table after ``heading`` whose header starts with ``first_header``."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip()[1:-1].split("|")])
    return [[c.strip() for c in lines[start].strip()[1:-1].split("|")], *rows]


def build(root: Path, params: config.Params, out: str = "reports") -> str:
    path, _ = write_leaderboard(params, root / out, root / "data/eval", runs_root=root / "data/runs")
    return path.read_text()


def test_polyp_table_cells(polyp_workspace) -> None:
    _, _, text = polyp_workspace
    header, *rows = section_table(text, "## polyp")
    assert header == ["Method", "Labeled", "Kvasir mDice", "Kvasir mIoU", "CVC-ClinicDB mDice", "CVC-ClinicDB mIoU"]
    # Kvasir: mean offset 0.015 over 4 cases, seeds +0 / +0.02 -> mean base + 0.025, std sqrt(2) x 1 pp.
    # CVC-ClinicDB: offset 0.01 - 0.05; IoU = 0.8 x Dice so its std is 0.8 x 1.41.
    assert rows == [
        ["labeled-only", "10%", "62.50 ± 1.41 (n=2)", "50.00 ± 1.13 (n=2)", "57.00 ± 1.41 (n=2)", "45.60 ± 1.13 (n=2)"],
        ["ucmt", "10%", "71.50 (n=1)", "57.20 (n=1)", "66.00 (n=1)", "52.80 (n=1)"],
        [
            "knowsam",
            "10%",
            "**82.50 ± 1.41** (n=2)",
            "**66.00 ± 1.13** (n=2)",
            "**77.00 ± 1.41** (n=2)",
            "**61.60 ± 1.13** (n=2)",
        ],
        [
            "knowsam [SAM output]",
            "10%",
            "77.50 ± 1.41 (n=2)",
            "62.00 ± 1.13 (n=2)",
            "72.00 ± 1.41 (n=2)",
            "57.60 ± 1.13 (n=2)",
        ],
        [
            "fully-supervised",
            "100%",
            "92.50 ± 1.41 (n=2)",
            "74.00 ± 1.13 (n=2)",
            "87.00 ± 1.41 (n=2)",
            "69.60 ± 1.13 (n=2)",
        ],
    ]


def test_reference_rows_and_difference(polyp_workspace) -> None:
    _, _, text = polyp_workspace
    header, *rows = section_table(text, "Reported by the paper (polyp)")
    assert header == ["Method", "Labeled", "Test set", "Metric", "Paper", "Ours", "Ours − paper"]
    assert rows[0] == [
        "knowsam (paper)",
        "10%",
        "Kvasir",
        "mDice (listed as Dice)",
        "86.64",
        "82.50 ± 1.41 (n=2)",
        "-4.14",
    ]
    assert rows[1] == [
        "knowsam (paper)",
        "10%",
        "CVC-ClinicDB",
        "mDice (listed as Dice)",
        "82.54",
        "77.00 ± 1.41 (n=2)",
        "-5.54",
    ]
    assert rows[2] == ["knowsam (paper)", "10%", "CVC-ColonDB", "mDice (listed as mDice)", "68.21", "-", "-"]
    assert len(rows) == 5


def test_footnotes_and_missing_runs(polyp_workspace) -> None:
    _, _, text = polyp_workspace
    notes = text[text.index("## Notes") :]
    assert "Profile `unit`: images resized to 64x64 px for the networks, 300 training iterations, seeds 0, 1." in notes
    assert "**SAM teacher: random initialisation, no pretrained SAM weights** in runs of knowsam" in notes
    assert f"- {EMPTY_MASK_POLICY}" in notes
    assert "mDice = mean of per-image Dice" in notes
    assert "Evaluation resolution: each image's original resolution" in notes
    assert "same U-Net backbone, input size, iteration budget and batch composition" in notes
    assert "DeepLabv3+" in notes
    assert "fully-supervised (the upper bound" in notes
    assert (
        "1 of 8 runs have no current metrics and are not shown: ucmt-polyp-0.1-1 (not trained); produce them "
        "with `dvc repro evaluate@polyp-0.1-1`."
    ) in text


def test_csv_matches_table(polyp_workspace) -> None:
    root, _, _ = polyp_workspace
    csv = pd.read_csv(root / "reports/leaderboard.csv", keep_default_na=False, na_values=[""])
    row = csv[(csv.method == "knowsam") & (csv.variant.isna()) & (csv.test_set == "Kvasir") & (csv.metric == "mDice")]
    assert len(row) == 1
    row = row.iloc[0]
    assert (row["mean"], row["std"], row["n"], row["best"]) == (82.5, 1.4142, 2, True)
    assert (row["paper"], row["diff_vs_paper"]) == (86.64, -4.14)
    sam = csv[(csv.variant == "sam") & (csv.test_set == "Kvasir") & (csv.metric == "mDice")].iloc[0]
    assert (sam["label"], sam["mean"], bool(sam["best"])) == ("knowsam [SAM output]", 77.5, False)
    assert np.isnan(sam["paper"])
    assert len(csv) == 5 * 2 * 2  # (4 methods + 1 variant) x 2 test sets x 2 metrics


def test_figures_written_and_deterministic(polyp_workspace) -> None:
    root, params, text = polyp_workspace
    build(root, params, "again")
    for name in ("figures/leaderboard.png", "figures/curves_polyp.png", "figures/overlays_polyp.png"):
        data = (root / "reports" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert data == (root / "again" / name).read_bytes()
        assert f"]({name})" in text
    cases = overlay_cases(PreparedDataset(root / "data/prepared/polyp"), 3)
    assert cases == [("Kvasir", "kvasir_000"), ("CVC-ClinicDB", "cvc-clinicdb_000"), ("Kvasir", "kvasir_001")]


def test_leaderboard_without_overlays_draws_no_dataset_images(polyp_workspace) -> None:
    # What `publish` writes: the overlays show dataset images, which must not go into Git.
    root, params, _ = polyp_workspace
    text = write_leaderboard(params, root / "plain", root / "data/eval", overlays=False)[0].read_text()
    assert sorted(p.name for p in (root / "plain/figures").iterdir()) == ["curves_polyp.png", "leaderboard.png"]
    assert "overlays" not in text and "](figures/leaderboard.png)" in text


def test_training_curves_average_seeds_at_shared_steps() -> None:
    seeds = [curves_table(0.6, 0), curves_table(0.6, 1)]
    dice = mean_curve(seeds, "val_dice")
    assert list(dice.index) == [100, 200, 300]
    assert dice.to_numpy() == pytest.approx([0.21, 0.41, 0.61])  # 0.6 * step / 300 + 0.02 * mean seed (0.5)
    # Loss: a trailing mean over 4 iterations in each seed, then the seed mean.
    loss = mean_curve(seeds, "loss", window=4)
    assert loss[1] == pytest.approx(1.0 + 0.05)
    assert loss[10] == pytest.approx(np.mean([1 / 7, 1 / 8, 1 / 9, 1 / 10]) + 0.05)
    # A seed stopped early: only the steps both reached are averaged.
    assert list(mean_curve([seeds[0], seeds[1][seeds[1].step <= 200]], "val_dice").index) == [100, 200]


def test_training_curves_draw_the_teacher_dotted_in_its_method_colour(tmp_path: Path, monkeypatch) -> None:
    params = make_params(tmp_path, "polyp", ["ucmt", "knowsam"], [0.1], [0, 1])
    for seed in (0, 1):
        for method in ("ucmt", "knowsam"):
            table = curves_table(0.6, seed)
            if method == "knowsam":
                table["val_dice_sam"] = table["val_dice"] / 2
            path = RunId(method, "polyp", 0.1, seed).curves_file(tmp_path / "eval")
            path.parent.mkdir(parents=True)
            table.to_csv(path, index=False)
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig))
    figures.training_curves(
        params,
        "polyp",
        tmp_path / "curves.png",
        tmp_path / "eval",
        {RunId(m, "polyp", 0.1, s): False for m in ("ucmt", "knowsam") for s in (0, 1)},
    )
    lines = {line.get_label(): line for line in drawn["fig"].axes[0].get_lines()}
    assert list(lines) == ["ucmt (n=2)", "knowsam (n=2)", "knowsam [SAM output]"]
    teacher, knowsam = lines["knowsam [SAM output]"], lines["knowsam (n=2)"]
    assert teacher.get_linestyle() == ":" and teacher.get_color() == knowsam.get_color()
    assert teacher.get_ydata() == pytest.approx(knowsam.get_ydata() / 2)


def test_leaderboard_does_not_import_torch(polyp_workspace) -> None:
    # The leaderboard stage and `compare` only read tables: importing torch would add seconds to each.
    root, _, text = polyp_workspace
    code = (
        "import sys; from pathlib import Path; from tests.test_leaderboard import POLYP_BASE, make_params; "
        "from knowsam.report.leaderboard import write_leaderboard; root = Path(sys.argv[1]); "
        "write_leaderboard(make_params(root, 'polyp', list(POLYP_BASE), [0.1], [0, 1]), root / 'reports-again', "
        "root / 'data/eval', runs_root=root / 'data/runs'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
    assert (root / "reports-again/leaderboard.md").read_text() == text


def test_volume_table_and_reference(tmp_path: Path) -> None:
    params = make_params(tmp_path, "promise12", ["mt", "knowsam", "fully-supervised"], [0.05, 0.1], [0])
    base = {"mt": 0.70, "knowsam": 0.78, "fully-supervised": 0.90}
    hd95 = {"mt": 5.0, "knowsam": 6.0, "fully-supervised": 3.0}
    asd = {"mt": 2.0, "knowsam": 1.5, "fully-supervised": 1.0}
    for method in base:
        for ratio, bonus in ((0.05, 0.0), (0.1, 0.05)):
            dice = [base[method] + bonus + 0.01 * i for i in range(3)]
            write_run(
                tmp_path,
                RunId(method, "promise12", ratio, 0),
                case_rows("test", dice, hd95=[hd95[method] - bonus * 10] * 3, asd=[asd[method]] * 3),
                {"sam_arch": "vit_b", "sam_weights": "sam_vit_b.pth sha256 0123456789ab", "sam_encoder": "cached"}
                if method == "knowsam"
                else None,
                params=params,
            )
    text = build(tmp_path, params)
    header, *rows = section_table(text, "### test")
    assert header == ["Method", "5% Dice", "5% IoU", "5% HD95", "5% ASD", "10% Dice", "10% IoU", "10% HD95", "10% ASD"]
    assert rows == [
        [
            "mt",
            "71.00 (n=1)",
            "56.80 (n=1)",
            "**5.00** (n=1)",
            "2.00 (n=1)",
            "76.00 (n=1)",
            "60.80 (n=1)",
            "**4.50** (n=1)",
            "2.00 (n=1)",
        ],
        [
            "knowsam",
            "**79.00** (n=1)",
            "**63.20** (n=1)",
            "6.00 (n=1)",
            "**1.50** (n=1)",
            "**84.00** (n=1)",
            "**67.20** (n=1)",
            "5.50 (n=1)",
            "**1.50** (n=1)",
        ],
        [
            "fully-supervised",
            "91.00 (n=1)",
            "72.80 (n=1)",
            "3.00 (n=1)",
            "1.00 (n=1)",
            "96.00 (n=1)",
            "76.80 (n=1)",
            "2.50 (n=1)",
            "1.00 (n=1)",
        ],
    ]
    _, *refs = section_table(text, "Reported by the paper (promise12)")
    assert refs == [
        ["knowsam (paper)", "5%", "test", "mDice (listed as Dice)", "78.49", "79.00 (n=1)", "+0.51"],
        ["knowsam (paper)", "10%", "test", "mDice (listed as Dice)", "82.93", "84.00 (n=1)", "+1.07"],
    ]
    assert (
        "SAM teacher weights: `vit_b` sam_vit_b.pth sha256 0123456789ab, frozen encoder, embeddings cached (knowsam)."
    ) in text
    assert "None: all 6 runs of the params matrix are evaluated under the current params and code." in text
    assert f"figures/overlays_promise12.png: not drawn, {tmp_path / 'data/prepared/promise12'} is missing." in text
    assert "figures/curves_promise12.png: not drawn, no evaluated run of promise12 has training curves." in text


def test_reference_lookup() -> None:
    assert reference.lookup("polyp", "Kvasir", "knowsam", 0.1, "mDice") == 86.64
    assert reference.lookup("polyp", "CVC-300", "knowsam", 0.1, "mDice") == 86.49
    assert reference.lookup("promise12", "any-test-part", "knowsam", 0.05, "mDice") == 78.49
    assert reference.lookup("promise12", None, "knowsam", 0.1, "mDice") == 82.93
    assert reference.lookup("polyp", "Kvasir", "knowsam", 0.2, "mDice") is None
    assert reference.lookup("polyp", "Kvasir", "ucmt", 0.1, "mDice") is None
    assert reference.lookup("polyp", "Kvasir", "knowsam", 0.1, "HD95") is None
    tables = {e.table for e in reference.load().entries}
    assert tables == {"knowsam"}


def test_no_runs_is_one_line_error(tmp_path: Path) -> None:
    from knowsam.errors import KnowsamError

    params = make_params(tmp_path, "polyp", ["mt"], [0.1], [0])
    with pytest.raises(KnowsamError, match="no evaluated run") as err:
        write_leaderboard(params, tmp_path / "reports", tmp_path / "data/eval")
    assert "\n" not in str(err.value)


def test_per_case_without_variant_column(tmp_path: Path) -> None:
    run = RunId("mt", "polyp", 0.1, 0)
    fileio.write_text(run.eval_dir(tmp_path) / "per_case.csv", "test_set,case,dice\nKvasir,001,0.5\n")
    table = load_per_case(run, tmp_path)
    assert table.to_dict("records") == [{"variant": "", "test_set": "Kvasir", "case": "001", "dice": 0.5}]


def test_truth_outline_is_each_region_s_inner_4_neighbour_border():
    """Independently: a region's pixels with a 4-neighbour outside it (scipy's erosion with a cross)."""
    from scipy import ndimage

    from knowsam.report.figures import truth_outline

    labels = np.zeros((12, 14), np.uint8)
    labels[2:9, 3:10] = 1
    labels[4:7, 10:13] = 2  # touches region 1 on its right edge
    labels[5, 5] = 0  # a hole: its four neighbours become border too
    cross = ndimage.generate_binary_structure(2, 1)
    expected = np.zeros_like(labels, bool)
    for value in (1, 2):
        region = labels == value
        expected |= region & ~ndimage.binary_erosion(region, cross, border_value=1)
    assert np.array_equal(truth_outline(labels), expected)
    assert truth_outline(labels)[4:7, 9].all() and truth_outline(labels)[4:7, 10].all()  # both sides of the contact

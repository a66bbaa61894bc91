"""Evaluation of trained runs on every test part of their dataset, one (dataset, ratio, seed) group at a time.

Predictions are made at training size; by default the class probabilities are resized
(bilinearly) back to each image's original size before the argmax, and scored against
the original masks (the polyp convention). Per case: one 2D image, or one volume made of
its slices with the voxel spacing. Writes ``per_case.csv``, ``predictions.npz`` and the run's
training curves (``curves.csv``, from its dvclive files) to each run's eval folder with its full ``summary.json`` (what
reports read), and the group's headline metrics (DVC metrics, one key per method) to ``reports/metrics``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from knowsam import fileio
from knowsam.config import Params
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.errors import KnowsamError
from knowsam.machine import pick_device
from knowsam.metrics import DVC_METRICS, EMPTY_MASK_POLICY, case_metrics, shown_in, summarize
from knowsam.models import embedding_cache
from knowsam.run_state import trained_weights, training_history
from knowsam.runs import RunId, build_method
from knowsam.summaries import identity, read_summary, stale_reason


@torch.no_grad()
def predict_probs(
    method,
    images: np.ndarray,
    device: torch.device,
    batch: int = 16,
    variant: str | None = None,
    embeddings: np.ndarray | None = None,
) -> torch.Tensor:
    """``method.predict`` over ``images`` in batches; ``embeddings``: the teacher's cached embeddings of them."""
    method.eval()
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(to_float(np.asarray(images[start : start + batch]))).to(device)
        emb = None if embeddings is None else torch.from_numpy(np.array(embeddings[start : start + batch])).to(device)
        out.append(method.predict(x, variant, emb).float().cpu())
    return torch.cat(out)


def _score_part(data: PreparedDataset, part: str, probs: torch.Tensor, resolution: str):
    """Yield (metrics row, prediction key, prediction) for every case of one evaluation part."""
    index = data.index(part)
    gt_all = data.ground_truth(part)
    for case, case_rows in index.groupby("case", sort=False):
        case_rows = case_rows.sort_values("slice")
        first = case_rows.iloc[0]
        shape = (int(first.orig_h), int(first.orig_w))
        pred = case_prediction(probs[torch.from_numpy(case_rows.index.to_numpy().copy())], shape, resolution)
        gt = gt_all[case]
        if gt.ndim == 2:
            pred = pred[0]
        spacing = (float(first.spacing_z), float(first.spacing_y), float(first.spacing_x))[-gt.ndim :]
        if resolution == "training":
            gt = resize_labels(gt, data.image_size)
            spacing = tuple(spacing[:-2]) + (
                spacing[-2] * shape[0] / data.image_size,
                spacing[-1] * shape[1] / data.image_size,
            )
        row = {"test_set": part, "case": case, **case_metrics(pred, gt, data.num_classes, spacing)}
        yield row, f"{part}/{case}", pred


def case_prediction(probs: torch.Tensor, shape: tuple[int, int], resolution: str) -> np.ndarray:
    """(D, K, S, S) slice probabilities -> (D, H, W) labels at the requested resolution."""
    if resolution == "original" and tuple(probs.shape[-2:]) != shape:
        probs = F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)
    return probs.argmax(1).to(torch.uint8).numpy()


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Ground truth to training size for the (non-default) training-resolution evaluation."""
    t = torch.from_numpy(labels.reshape((-1,) + labels.shape[-2:]).astype(np.float32))[:, None]
    return (
        F.interpolate(t, size=(size, size), mode="nearest")[:, 0]
        .to(torch.uint8)
        .numpy()
        .reshape(labels.shape[:-2] + (size, size))
    )


def evaluate_group(
    params: Params,
    dataset: str,
    ratio: float,
    seed: int,
    methods: list[str] | None = None,
    *,
    runs_root: str | Path = "data/runs",
    eval_root: str | Path = "data/eval",
    metrics_root: str | Path = "reports/metrics",
    curves_root: str | Path = "reports/curves",
    on_result=None,
) -> dict[str, dict]:
    """Score the runs of one (dataset, ratio, seed) group; return their summaries by method.

    ``methods`` defaults to every method in params (what the evaluate stage does). Each run's full
    summary goes to its eval folder; the group's metrics file (DVC metrics) is then rebuilt from
    the summaries of every params method evaluated so far, so scoring one method by hand keeps
    the others. Every run's weights, training config and training curves are checked before any scoring starts;
    ``on_result(method, summary)`` is called as each run finishes. Each run with validation curves also
    gets ``RunId.validation_curve_file`` under ``curves_root`` (what ``dvc plots`` draws).
    """
    runs = [
        RunId(method=m, dataset=dataset, ratio=ratio, seed=seed)
        for m in (params.methods if methods is None else methods)
    ]
    weights = {run: trained_weights(params, run, runs_root) for run in runs}
    histories = {run: training_history(run, runs_root) for run in runs}
    device = pick_device(params.train.device)
    data = PreparedDataset(Path(params.data.prepared_root) / dataset)
    summaries = {}
    for run in runs:
        summaries[run.method] = evaluate_run(
            params, run, data, device, weights[run], histories[run], eval_root=eval_root
        )
        write_validation_curve(run, histories[run], curves_root)
        if on_result is not None:
            on_result(run.method, summaries[run.method])
    group = [RunId(method=m, dataset=dataset, ratio=ratio, seed=seed) for m in params.methods]
    fileio.write_json(runs[0].metrics_file(metrics_root), headline_metrics(params, group, eval_root))
    return summaries


def write_validation_curve(run: RunId, history: pd.DataFrame | None, curves_root: str | Path) -> None:
    """``step,val_dice`` at each validation of the run (none without curves or validation images)."""
    path = run.validation_curve_file(curves_root)
    if history is None or "val_dice" not in history:
        path.unlink(missing_ok=True)
        return
    rows = history[["step", "val_dice"]].dropna()
    fileio.write_text(path, rows.to_csv(index=False, float_format="%.6f"))


HEADLINE = tuple(m.name for m in shown_in(DVC_METRICS))  # summary.json has every metric


def headline_metrics(params: Params, group: list[RunId], eval_root: str | Path = "data/eval") -> dict:
    """{method or "method [variant]": {test set: headline metrics}} for the runs of ``group`` whose summary
    scored the current params and code; ``left_out`` names the others and why (only when there are any).

    Kept small on purpose: ``dvc metrics show``/``diff`` print one column per key.
    """
    out, left_out = {}, {}
    for run in group:
        summary = read_summary(run, eval_root)
        reason = "not evaluated" if summary is None else stale_reason(summary, identity(params, run))
        if reason is not None:
            left_out[run.method] = reason
            continue
        outputs = {
            run.method: summary["test_sets"],
            **{f"{run.method} [{v}]": parts for v, parts in summary["variants"].items()},
        }
        for name, parts in outputs.items():
            out[name] = {part: {k: m[k] for k in HEADLINE if k in m} for part, m in parts.items()}
    return {**out, "left_out": left_out} if left_out else out


def evaluate_run(
    params: Params,
    run: RunId,
    data: PreparedDataset,
    device: torch.device,
    weights_path: Path,
    history: pd.DataFrame | None,
    *,
    eval_root: str | Path = "data/eval",
) -> dict:
    """Score one run from its checked ``best.pt``; write ``per_case.csv``, ``predictions.npz``,
    ``curves.csv`` (``history``, see run_state.training_history) and ``summary.json`` (last); return the summary."""
    method = build_method(params, run, data, device, training=False)
    try:
        saved = torch.load(weights_path, map_location=device, weights_only=True)
        method.load_eval_state_dict(saved["weights"])
    except Exception as exc:  # truncated/corrupt files and foreign state dicts raise many different types
        raise KnowsamError(
            f"{weights_path}: unreadable or not this method's weights ({type(exc).__name__}); "
            f"re-run the train stage for {run.stage_name}"
        ) from None
    resolution = params.eval.resolution
    # A frozen, cached teacher encoder: its variant decodes the embed stage's embeddings of each test image.
    cache = embedding_cache.open_for_teacher(
        params.sam.embeddings_root, run.dataset, data, method.provenance(), params.train.amp_bf16
    )
    rows, predictions = [], {}
    for variant in (None, *method.variants):
        for part in data.eval_parts:
            probs = predict_probs(
                method,
                data.images(part),
                device,
                variant=variant,
                embeddings=None if cache is None or variant is None else cache[part],
            )
            for row, key, pred in _score_part(data, part, probs, resolution):
                rows.append({"variant": variant or "", **row})
                if variant is None:
                    predictions[key] = pred
    per_case = pd.DataFrame(rows)
    main = per_case[per_case.variant == ""]
    parts = {p: summarize(main[main.test_set == p].drop(columns=["variant"])) for p in data.eval_parts}
    variants = {
        v: {
            p: summarize(per_case[(per_case.variant == v) & (per_case.test_set == p)].drop(columns=["variant"]))
            for p in data.eval_parts
        }
        for v in method.variants
    }
    out_dir = run.eval_dir(eval_root)
    fileio.write_text(out_dir / "per_case.csv", per_case.to_csv(index=False, float_format="%.6f"))
    with fileio.atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **predictions)
    if history is None:
        run.curves_file(eval_root).unlink(missing_ok=True)  # never leave an earlier training's curves
    else:
        fileio.write_text(run.curves_file(eval_root), history.to_csv(index=False))
    summary = _rounded(
        {
            "run": {"method": run.method, "dataset": run.dataset, "ratio": run.ratio, "seed": run.seed},
            "best_step": int(saved["step"]),
            "iterations": params.train.iterations,  # checked finished before scoring (see run_state.trained_weights)
            "evaluation_resolution": resolution,
            "empty_mask_policy": EMPTY_MASK_POLICY,
            "provenance": method.provenance(),
            "test_sets": parts,
            "variants": variants,
        }
    )
    # The identity of the weights scored (kept unrounded): tables count this summary only while it is the
    # current params' and code's, and while the run folder holds the same training.
    summary.update(identity(params, run))
    fileio.write_json(run.summary_file(eval_root), summary)
    return summary


def _rounded(obj):
    """Round floats for stable, readable metrics files (6 decimals is far below any reported digit)."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj

"""Evaluation summaries (``summary.json``): the identity each one records, its one strict reader, and
whether it stands for the run the current params and code would train.

``evaluate`` records in every summary the identity of the training it scored: the run's
configuration (params and training-code fingerprint, ``runs.run_config``) and its hash. A table
shows a summary only while that hash is the one the current params and code give, so numbers of
other params or code never pass for current ones; the recorded configuration says what differs.
The identity travels in the summary itself, so it is checked where no run folder is at hand.

Kept apart from ``runs`` (a training source): how results are read never changes a trained run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from knowsam.config import Params
from knowsam.errors import KnowsamError
from knowsam.metrics import DVC_METRICS, LEADERBOARD_2D, LEADERBOARD_VOLUME, shown_in
from knowsam.runs import RunId, config_hash, run_config

# What every test set of a summary holds (``metrics.summarize``): the tables read these.
REQUIRED_METRICS = ("n", *(m.name for m in shown_in(LEADERBOARD_2D, LEADERBOARD_VOLUME, DVC_METRICS)))
NO_IDENTITY = "no recorded identity"


def identity(params: Params, run: RunId, code: str | None = None) -> dict:
    """What a summary records of the run it scored: ``config_hash`` and the configuration itself.

    ``code``: judge against this training-code fingerprint instead of this checkout's (a publication's pin).
    """
    cfg = run_config(params, run, code)
    return {"config_hash": config_hash(cfg), "config": cfg}


class _NonFinite(ValueError):
    pass


def _refuse_non_finite(token: str):
    raise _NonFinite(token)


def redo_hint(run: RunId, eval_root: str | Path) -> str:
    """What makes a run's evaluation files again: its evaluate stage, or, for the runs of a publication
    folder (``<folder>/runs`` beside ``<folder>/params.yaml``, docs/publications.md), Git's copy or the
    publication runner."""
    root = Path(eval_root)
    if root.name == "runs" and (root.parent / "params.yaml").is_file():
        return (
            f"restore it from Git (`git checkout -- {run.eval_dir(root)}`) or delete that folder and run "
            f"`knowsam-bench publication run {root.parent}`"
        )
    return f"re-run `dvc repro evaluate@{run.group_stage_name}`"


def read_summary(run: RunId, eval_root: str | Path = "data/eval") -> dict | None:
    """The run's summary, or None when it has none; a KnowsamError naming the file when it is
    empty, truncated, not a summary or holds a NaN (the empty-mask policy gives every case a finite value)."""
    path = run.summary_file(eval_root)
    redo = redo_hint(run, eval_root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise KnowsamError(f"{path}: unreadable evaluation summary ({type(exc).__name__}); {redo}") from None
    try:
        summary = json.loads(text, parse_constant=_refuse_non_finite)
    except _NonFinite as exc:
        raise KnowsamError(
            f"{path}: holds {exc} where every metric is finite (see the empty-mask policy); {redo}"
        ) from None
    except ValueError:
        what = "empty" if not text.strip() else "truncated or not JSON"
        raise KnowsamError(f"{path}: unreadable evaluation summary ({what}); {redo}") from None
    variants = summary.get("variants", {}) if isinstance(summary, dict) else None
    outputs = [summary.get("test_sets"), *variants.values()] if isinstance(variants, dict) else [None]
    for parts in outputs:
        if (
            not isinstance(parts, dict)
            or not parts
            or not all(isinstance(m, dict) and all(k in m for k in REQUIRED_METRICS) for m in parts.values())
        ):
            raise KnowsamError(
                f"{path}: not an evaluation summary (no test sets with {', '.join(REQUIRED_METRICS)}); {redo}"
            )
    return summary


def stale_reason(summary: dict, current: dict) -> str | None:
    """Why ``summary`` does not stand for the run whose ``identity`` is ``current``; None when it does."""
    recorded = summary.get("config_hash")
    if recorded == current["config_hash"]:
        return None
    if recorded is None:
        return NO_IDENTITY
    scored, cfg = summary.get("config"), current["config"]
    if not isinstance(scored, dict):  # recorded before summaries kept the configuration: the hash is all there is
        return "other params or code"
    if scored.get("code") != cfg["code"]:
        return "other code"
    keys = _identity_keys_differing(scored, cfg)
    return "other params" + (f": {', '.join(keys)}" if keys else "")


def _leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _identity_keys_differing(scored: dict, cfg: dict) -> list[str]:
    """Dotted keys whose values differ and count in the hash (speed settings such as threads do not)."""
    theirs, ours = _leaves(scored), _leaves(cfg)
    keys = []
    for key in sorted(ours.keys() & theirs.keys()):
        if theirs[key] == ours[key]:
            continue
        probe = copy.deepcopy(cfg)
        target = probe
        for part in key[:-1]:
            target = target[part]
        target[key[-1]] = theirs[key]
        if config_hash(probe) != config_hash(cfg):
            keys.append(".".join(map(str, key)))
    keys += [".".join(map(str, k)) for k in sorted(ours.keys() ^ theirs.keys())]  # keys added or removed
    return keys

"""What a run is made of: its id and where its files live, its configuration and hash, its method.

Training and evaluation both build a run from here, so a trained run and the one evaluated
are the same by construction. One naming scheme is shared by training, evaluation and reports.

Runs of one (dataset, labeled ratio, seed) share a folder, because they are evaluated and
tabulated together: the evaluate stage scores every method of such a group in one process
and writes one metrics file for it.

    data/runs/<dataset>/ratio-<r>_seed-<s>/<method>/    checkpoints, config, summary, live/ (curves)
    data/eval/<dataset>/ratio-<r>_seed-<s>/<method>/    per-case metrics, predictions, summary
    reports/metrics/<dataset>/ratio-<r>_seed-<s>.json   headline metrics, one key per method
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowsam import pipeline
from knowsam.config import Params, to_dict
from knowsam.methods.registry import method_params

if TYPE_CHECKING:
    import torch

    from knowsam.data.dataset import PreparedDataset
    from knowsam.methods import Method

from knowsam.config import ratio_text


@dataclass(frozen=True)
class RunId:
    method: str
    dataset: str
    ratio: float
    seed: int

    @property
    def slug(self) -> str:
        return f"ratio-{ratio_text(self.ratio)}_seed-{self.seed}"

    @property
    def stage_name(self) -> str:
        """The train stage's matrix suffix, e.g. ``knowsam-polyp-0.1-0``."""
        return f"{self.method}-{self.dataset}-{ratio_text(self.ratio)}-{self.seed}"

    @property
    def group_stage_name(self) -> str:
        """The evaluate stage's matrix suffix (every method of the group), e.g. ``polyp-0.1-0``."""
        return f"{self.dataset}-{ratio_text(self.ratio)}-{self.seed}"

    def train_dir(self, root: str | Path = "data/runs") -> Path:
        return Path(root) / self.dataset / self.slug / self.method

    def live_dir(self, root: str | Path = "data/runs") -> Path:
        """The run's training curves as dvclive writes them (what DVC renders and evaluate reads)."""
        return self.train_dir(root) / "live"

    def eval_dir(self, root: str | Path = "data/eval") -> Path:
        return Path(root) / self.dataset / self.slug / self.method

    def summary_file(self, root: str | Path = "data/eval") -> Path:
        """The run's full evaluation summary (written last by evaluate: its presence means evaluated)."""
        return self.eval_dir(root) / "summary.json"

    def curves_file(self, root: str | Path = "data/eval") -> Path:
        """The run's training curves (loss terms per iteration, validation Dice), copied by evaluate from live_dir."""
        return self.eval_dir(root) / "curves.csv"

    def validation_curve_file(self, root: str | Path = "reports/curves") -> Path:
        """The run's validation Dice per evaluation (``step,val_dice``): what ``dvc plots`` draws from data."""
        return Path(root) / self.dataset / self.slug / f"{self.method}.csv"

    def metrics_file(self, root: str | Path = "reports/metrics") -> Path:
        """The group's headline metrics (DVC metrics); this run's are under its method's key."""
        return Path(root) / self.dataset / f"{self.slug}.json"


# The package sources whose edits can change a trained run's numbers, relative to the repository
# root; folders mean every .py file below them. The train stage's entry in the table of what each
# stage runs names them (knowsam/pipeline.py, from which dvc.yaml's deps are written).
TRAINING_SOURCES = pipeline.TRAINING
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the package

# Where things are kept, not what is computed: moving data or a cache keeps every trained run valid.
LOCATION_KEYS = {
    "data": ("raw_root", "prepared_root", "splits_root", "mirror"),
    "sam": ("cache_dir", "embeddings_root"),
}


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over the sorted relative paths and bytes of ``TRAINING_SOURCES`` under ``root``.

    Part of every run's configuration, so a checkpoint trained by other code is never resumed
    and its weights never evaluated as this code's.
    """
    root = SOURCE_ROOT if root is None else root
    files = set()
    for source in TRAINING_SOURCES:
        path = root / source
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_config(params: Params, run: RunId, code: str | None = None) -> dict[str, Any]:
    """Everything that determines a run's result (and nothing that does not, e.g. eval settings or locations).

    ``code``: the training-code fingerprint to record instead of this checkout's (a publication's pin).
    """
    cfg = to_dict(params)
    for section, keys in LOCATION_KEYS.items():
        for key in keys:
            cfg[section].pop(key)
    return {
        "code": code or code_fingerprint(),
        "run": {"method": run.method, "dataset": run.dataset, "ratio": run.ratio, "seed": run.seed},
        "data": cfg["data"],
        "train": cfg["train"],
        "sam": cfg["sam"],
        "method_params": dataclasses.asdict(method_params(run.method, params.method_params.get(run.method, {}))),
    }


def config_hash(cfg: dict) -> str:
    # Device and thread count change speed, not maths; leave them out so a run moved to
    # another machine can still resume.
    stable = json.loads(json.dumps(cfg))
    stable["train"].pop("device", None)
    stable["train"].pop("threads", None)
    stable["train"].pop("channels_last", None)  # memory layout and compilation: speed only, too
    stable["train"].pop("compile", None)
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def build_method(
    params: Params, run: RunId, data: PreparedDataset, device: torch.device, *, training: bool = True
) -> Method:
    # Imported here: reports name runs through this module and never load torch.
    from knowsam.methods import MethodContext, get_method

    ctx = MethodContext(
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
        iterations=params.train.iterations,
        train=params.train,
        sam=params.sam,
        device=device,
        seed=run.seed,
        training=training,
    )
    return get_method(run.method)(ctx, method_params(run.method, params.method_params.get(run.method, {})))

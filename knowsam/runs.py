"""Where each run's files live: one naming scheme shared by training, evaluation and reports.

Runs of one (dataset, labeled ratio, seed) share a folder, because they are evaluated and
tabulated together: the evaluate stage scores every method of such a group in one process
and writes one metrics file for it.

    data/runs/<dataset>/ratio-<r>_seed-<s>/<method>/    checkpoints, config, log, curves
    data/eval/<dataset>/ratio-<r>_seed-<s>/<method>/    per-case metrics, predictions, summary
    reports/metrics/<dataset>/ratio-<r>_seed-<s>.json   headline metrics, one key per method
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def eval_dir(self, root: str | Path = "data/eval") -> Path:
        return Path(root) / self.dataset / self.slug / self.method

    def summary_file(self, root: str | Path = "data/eval") -> Path:
        """The run's full evaluation summary (written last by evaluate: its presence means evaluated)."""
        return self.eval_dir(root) / "summary.json"

    def curves_file(self, root: str | Path = "data/eval") -> Path:
        """The run's training curves (loss terms per iteration, validation Dice), copied by evaluate."""
        return self.eval_dir(root) / "curves.csv"

    def metrics_file(self, root: str | Path = "reports/metrics") -> Path:
        """The group's headline metrics (DVC metrics); this run's are under its method's key."""
        return Path(root) / self.dataset / f"{self.slug}.json"

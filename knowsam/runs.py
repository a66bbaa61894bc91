"""Where each run's files live: one naming scheme shared by training, evaluation and reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunId:
    method: str
    dataset: str
    ratio: float
    seed: int

    @property
    def slug(self) -> str:
        return f"ratio-{self.ratio:g}_seed-{self.seed}"

    @property
    def stage_name(self) -> str:
        """The DVC matrix stage suffix, e.g. ``knowsam-polyp-0.1-0``."""
        return f"{self.method}-{self.dataset}-{self.ratio:g}-{self.seed}"

    def train_dir(self, root: str | Path = "data/runs") -> Path:
        return Path(root) / self.dataset / self.method / self.slug

    def eval_dir(self, root: str | Path = "data/eval") -> Path:
        return Path(root) / self.dataset / self.method / self.slug

    def metrics_file(self, root: str | Path = "reports/metrics") -> Path:
        return Path(root) / self.dataset / self.method / f"{self.slug}.json"


def parse_metrics_path(path: Path, root: str | Path = "reports/metrics") -> RunId:
    """Inverse of ``RunId.metrics_file``."""
    rel = path.relative_to(root)
    dataset, method, name = rel.parts
    ratio_part, seed_part = Path(name).stem.split("_")
    return RunId(method=method, dataset=dataset, ratio=float(ratio_part.removeprefix("ratio-")),
                 seed=int(seed_part.removeprefix("seed-")))

"""Published numbers (``reference_numbers.yaml``) for the rows our runs are compared with.

The numbers live in one data file so that adding another method's or the SKD table's
values is a data edit, not a code change. Values are percentages as published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from knowsam.errors import KnowsamError

REFERENCE_FILE = Path(__file__).with_name("reference_numbers.yaml")
_KEYS = ("dataset", "test_set", "method", "ratio", "metric", "value", "listed_as")


@dataclass(frozen=True)
class Reference:
    """One published value; ``test_set`` None stands for the dataset's only test set."""

    table: str
    dataset: str
    test_set: str | None
    method: str
    ratio: float
    metric: str
    value: float
    listed_as: str

    def matches(self, dataset: str, test_set: str | None, method: str, ratio: float, metric: str) -> bool:
        return (
            self.dataset == dataset
            and self.method == method
            and self.metric == metric
            and math.isclose(self.ratio, ratio)
            and self.test_set in (None, test_set)
        )


@dataclass(frozen=True)
class ReferenceBook:
    source: str
    protocols: dict[str, str]
    entries: tuple[Reference, ...]

    def lookup(self, dataset: str, test_set: str | None, method: str, ratio: float, metric: str) -> float | None:
        """The published value for this cell, or None where the source gives none."""
        for entry in self.entries:
            if entry.matches(dataset, test_set, method, ratio, metric):
                return entry.value
        return None

    def for_dataset(self, dataset: str) -> list[Reference]:
        return [e for e in self.entries if e.dataset == dataset]


def _entry(table: str, position: int, raw: object, path: Path) -> Reference:
    where = f"{path}: tables.{table}[{position}]"
    if not isinstance(raw, dict) or set(raw) != set(_KEYS):
        raise KnowsamError(f"{where} must have exactly the keys {', '.join(_KEYS)}")
    if not all(isinstance(raw[k], (int, float)) and not isinstance(raw[k], bool) for k in ("ratio", "value")):
        raise KnowsamError(f"{where}: 'ratio' and 'value' must be numbers")
    return Reference(
        table=table,
        dataset=str(raw["dataset"]),
        test_set=None if raw["test_set"] is None else str(raw["test_set"]),
        method=str(raw["method"]),
        ratio=float(raw["ratio"]),
        metric=str(raw["metric"]),
        value=float(raw["value"]),
        listed_as=str(raw["listed_as"]),
    )


@lru_cache(maxsize=4)
def load(path: Path = REFERENCE_FILE) -> ReferenceBook:
    """Read and check the reference file once per process (it ships with the package)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KnowsamError(f"{path}: cannot read reference numbers ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tables"), dict):
        raise KnowsamError(f"{path}: expected a mapping with 'source', 'protocols' and 'tables'")
    entries = tuple(
        _entry(table, i, item, Path(path))
        for table, items in raw["tables"].items()
        for i, item in enumerate(items or [])
    )
    seen: set[tuple] = set()
    for e in entries:
        key = (e.dataset, e.test_set, e.method, round(e.ratio, 9), e.metric)
        if key in seen:
            raise KnowsamError(
                f"{path}: two entries for {e.method} on {e.dataset} {e.test_set or ''} ratio {e.ratio:g} {e.metric}"
            )
        seen.add(key)
    return ReferenceBook(
        source=str(raw.get("source", "")).strip(), protocols=dict(raw.get("protocols") or {}), entries=entries
    )


def lookup(dataset: str, test_set: str | None, method: str, ratio: float, metric: str) -> float | None:
    """The packaged reference value for one (dataset, test set, method, ratio, metric), or None."""
    return load().lookup(dataset, test_set, method, ratio, metric)

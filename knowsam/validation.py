"""Params checked against what exists: the dataset registry, the method registry and each method's
own params. One layer above ``knowsam.config`` (the schema), which must not know the registries.

Nothing here imports torch: acquire, prepare and split validate every method's params too.
"""

from __future__ import annotations

from pathlib import Path

from knowsam import config
from knowsam.config import Params
from knowsam.data.sources import DATASETS
from knowsam.errors import ConfigError
from knowsam.methods.registry import method_names, method_params


def validate(params: Params) -> Params:
    """``config.check`` plus dataset names, method names and ``method_params``. Returns ``params`` unchanged."""
    config.check(params)
    for i, name in enumerate(params.datasets):
        if name not in DATASETS:
            raise ConfigError(f"params: 'datasets[{i}]' unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    known = method_names()
    for i, name in enumerate(params.methods):
        if name not in known:
            raise ConfigError(f"params: 'methods[{i}]' unknown method {name!r}; known: {', '.join(known)}")
    for name, overrides in params.method_params.items():
        if name not in known:
            raise ConfigError(f"params: 'method_params.{name}' names an unknown method; known: {', '.join(known)}")
        method_params(name, overrides)  # a method's own value checks (ConfigError) run before any stage starts
    return params


def load(path: str | Path = "params.yaml") -> Params:
    """Read a params file and check everything about it before anything runs."""
    return validate(config.read(path))

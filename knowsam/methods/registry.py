"""Methods by name (USB-style). ``X+skd`` names compose a registered method with the SKD plug-in.

Adding a method: its module (which registers its class) and its line in ``METHOD_INDEX``; its
hyperparameters, if any, in ``knowsam.methods.params``. docs/contributing.md shows one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from knowsam import config
from knowsam.errors import ConfigError
from knowsam.methods.params import params_class

if TYPE_CHECKING:
    from knowsam.methods.base import Method

_METHODS: dict[str, type[Method]] = {}
_PLUGINS: dict[str, Callable[[type[Method]], type[Method]]] = {}

# Every runnable name (table order) and the module that defines it. Listing and checking names
# must not import the method modules: they import torch, seconds in every pipeline stage that
# never trains (acquire, prepare, split). tests/test_config.py checks this index against what the
# modules register (base methods, then each plug-in on each base method that accepts it).
METHOD_INDEX: dict[str, str] = {
    "labeled-only": "supervised",
    "fully-supervised": "supervised",
    "mt": "mt",
    "cps": "cps",
    "ucmt": "ucmt",
    "knowsam": "knowsam",
    "mt+skd": "skd",
    "cps+skd": "skd",
    "ucmt+skd": "skd",
}

# Methods trained on every training label (``label_pool = "all"``): references in tables, never
# contenders. Listed here so reports tell them apart without importing torch; checked against the
# classes like METHOD_INDEX.
UPPER_BOUNDS: frozenset[str] = frozenset({"fully-supervised"})


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def register_plugin(suffix: str) -> Callable:
    """A plug-in turns a method class into ``<name>+<suffix>`` (a subclass adding its loss)."""

    def decorator(make: Callable[[type[Method]], type[Method]]) -> Callable:
        _PLUGINS[suffix] = make
        return make

    return decorator


def _ensure_loaded() -> None:
    """Import every method module (each registers its classes when imported)."""
    for module in dict.fromkeys(METHOD_INDEX.values()):
        importlib.import_module(f"knowsam.methods.{module}")


def method_names() -> list[str]:
    """Every runnable name: base methods, then each plug-in applied to each base method that accepts it."""
    return list(METHOD_INDEX)


def get_method(name: str) -> type[Method]:
    if name not in METHOD_INDEX:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    _ensure_loaded()
    base, _, suffix = name.partition("+")
    cls = _METHODS[base]
    return _PLUGINS[suffix](cls) if suffix else cls


def method_params(name: str, overrides: dict[str, Any]) -> Any:
    """Method ``name``'s Params from its ``method_params`` entry: checked like every other params key
    (unknown keys, types), then by the method's own value checks; no method module is imported."""
    if name not in METHOD_INDEX:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return config.build(params_class(name), overrides, f"method_params.{name}.")

"""Methods by name (USB-style). ``X+skd`` names compose a registered method with the SKD plug-in."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Callable

from knowsam.errors import ConfigError

if TYPE_CHECKING:
    from knowsam.methods.base import Method

_METHODS: dict[str, type["Method"]] = {}
_PLUGINS: dict[str, Callable[[type["Method"]], type["Method"]]] = {}

# Every runnable name (table order) and the module that defines it. Listing and checking names
# must not import the method modules: they import torch, seconds in every pipeline stage that
# never trains (acquire, prepare, split). tests/test_config.py checks this index against what the
# modules register (base methods, then each plug-in on each base method that accepts it).
METHOD_INDEX: dict[str, str] = {
    "labeled-only": "supervised", "fully-supervised": "supervised", "mt": "mt", "cps": "cps", "ucmt": "ucmt",
    "knowsam": "knowsam", "mt+skd": "skd", "cps+skd": "skd", "ucmt+skd": "skd",
}

# Methods trained on every training label (``label_pool = "all"``): references in tables, never
# contenders. Listed here so reports tell them apart without importing torch; checked against the
# classes like METHOD_INDEX.
UPPER_BOUNDS: frozenset[str] = frozenset({"fully-supervised"})


def register_method(cls: type["Method"]) -> type["Method"]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def register_plugin(suffix: str) -> Callable:
    """A plug-in turns a method class into ``<name>+<suffix>`` (a subclass adding its loss)."""

    def decorator(make: Callable[[type["Method"]], type["Method"]]) -> Callable:
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


def get_method(name: str) -> type["Method"]:
    if name not in METHOD_INDEX:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    _ensure_loaded()
    base, _, suffix = name.partition("+")
    cls = _METHODS[base]
    return _PLUGINS[suffix](cls) if suffix else cls


def validate_method_params(name: str, overrides: dict) -> None:
    cls = get_method(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"params: unknown key 'method_params.{name}.{key}' "
                              f"(known: {', '.join(sorted(fields)) or 'none'})")
        default = fields[key].default
        if isinstance(default, bool) != isinstance(value, bool) or (
            isinstance(default, (int, float)) and not isinstance(value, (int, float))
        ) or (isinstance(default, str) and not isinstance(value, str)):
            raise ConfigError(f"params: 'method_params.{name}.{key}' must be {type(default).__name__}, got {value!r}")
    cls.make_params(overrides)  # a method's own value checks (ConfigError) run before any stage starts

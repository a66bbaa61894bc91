"""Methods by name (USB-style). ``X+skd`` names compose a registered method with the SKD plug-in."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from knowsam.errors import ConfigError

if TYPE_CHECKING:
    from knowsam.methods.base import Method

_METHODS: dict[str, type["Method"]] = {}
_PLUGINS: dict[str, Callable[[type["Method"]], type["Method"]]] = {}


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
    import knowsam.methods  # noqa: F401  (importing the package registers every method)


def method_names() -> list[str]:
    """Every runnable name: base methods, then each plug-in applied to each base method that accepts it."""
    _ensure_loaded()
    names = list(_METHODS)
    for suffix in _PLUGINS:
        names += [f"{n}+{suffix}" for n, cls in _METHODS.items() if suffix in cls.accepts_plugins]
    return names


def get_method(name: str) -> type["Method"]:
    _ensure_loaded()
    base, _, suffix = name.partition("+")
    if base not in _METHODS or (suffix and name not in method_names()):
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")
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

"""Training methods, one module each, found by name through the registry.

Importing the package is cheap: the method modules (which import torch) load on the first
``get_method``, and ``Method``, ``MethodContext`` on first access.
"""

from knowsam.methods.registry import get_method, method_names

__all__ = ["Method", "MethodContext", "get_method", "method_names"]


def __getattr__(name: str):
    if name in ("Method", "MethodContext"):
        from knowsam.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Training methods. Importing this package registers every method (one module each)."""

from knowsam.methods import supervised  # noqa: F401
from knowsam.methods import knowsam  # noqa: F401
from knowsam.methods import cps, mt, skd, ucmt  # noqa: F401
from knowsam.methods.base import Batch, Method, MethodContext
from knowsam.methods.registry import get_method, method_names

__all__ = ["Batch", "Method", "MethodContext", "get_method", "method_names"]

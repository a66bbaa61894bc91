"""Networks, built by name through :func:`build_model`. Importing this package registers them all."""

from knowsam.models import fusion, sam_teacher, unet, vnet  # noqa: F401  (registers)
from knowsam.models.registry import build_model, model_names, register_model

__all__ = ["build_model", "model_names", "register_model"]

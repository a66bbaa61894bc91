"""Networks, built by name through :func:`build_model`. Importing this package registers them all."""

from knowsam.models import fusion, unet, vnet  # noqa: F401  (registers)
from knowsam.models.registry import build_model, model_names, register_model


@register_model("sam_teacher")
def _sam_teacher(**kwargs):
    # segment_anything imports torchvision (seconds): only methods that use SAM pay for it.
    from knowsam.models.sam_teacher import SamTeacher

    return SamTeacher(**kwargs)


__all__ = ["build_model", "model_names", "register_model"]

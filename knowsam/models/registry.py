"""Build networks by name (timm-style): ``build_model("unet", in_channels=3, num_classes=2)``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from knowsam.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Class or factory decorator adding ``name`` to the model registry."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = factory
        return factory

    return decorator


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return _MODELS[name](**kwargs)

"""Facts about the machine a run is on: the device to train on, the CPU model reports state."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

from knowsam.errors import KnowsamError

if TYPE_CHECKING:
    import torch


def pick_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is CUDA, else MPS, else the CPU."""
    import torch  # here, not at the top: reports read cpu_model and never load torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KnowsamError("train.device is 'cuda' but no CUDA device is available", exit_code=2)
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

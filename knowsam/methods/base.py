"""The interface every training method implements: one small class, one ``train_step``.

The shared loop (``knowsam.train``) owns data, schedules of evaluation/checkpoints,
logging and resume; a method owns its networks, optimisers and losses. Everything a
method must persist goes through ``state_dict`` so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from knowsam.config import SamParams, TrainParams


@dataclass
class MethodContext:
    """What a method may know about the run it is part of."""

    in_channels: int
    num_classes: int
    image_size: int
    iterations: int
    train: TrainParams
    sam: SamParams
    device: torch.device
    seed: int = 0
    # False when a method is built only to predict (evaluation): no optimisers are made, which
    # also spares the process importing torch._dynamo (seconds; every optimiser constructor does).
    training: bool = True


@dataclass
class Batch:
    """One training batch: weakly augmented labeled images + labels, and unlabeled images.

    Images are float in [0, 1], shape (B, C, H, W); labels are class ids (B, H, W), int64.
    ``x_u`` has zero rows for methods that do not use unlabeled data.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_u: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        """Labeled then unlabeled images, the order every method's indices rely on."""
        return torch.cat([self.x_l, self.x_u]) if len(self.x_u) else self.x_l

    @property
    def n_labeled(self) -> int:
        return len(self.x_l)


class Method:
    """Base class. Subclasses set ``name``, ``description``, ``Params`` and implement the two hooks."""

    name: ClassVar[str]
    description: ClassVar[str]
    # "labeled": sample labeled images from the labeled subset; "all": from the whole training pool.
    label_pool: ClassVar[str] = "labeled"
    uses_unlabeled: ClassVar[bool] = True
    # Plug-in suffixes (e.g. "skd") that may be composed with this method.
    accepts_plugins: ClassVar[tuple[str, ...]] = ()
    # The student whose prediction a plug-in uses as SAM's dense prompt (methods accepting plug-ins).
    main_student: ClassVar[str] = ""
    # Extra test-time outputs scored as separate leaderboard rows, e.g. ("sam",).
    variants: ClassVar[tuple[str, ...]] = ()
    # Score of an image whose prediction and ground truth are both empty, in validation
    # (model selection). 1 is correct; a method may reproduce a published quirk.
    validation_empty_score: float = 1.0

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, ctx: MethodContext, params: Any):
        self.ctx = ctx
        self.p = params
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    @classmethod
    def make_params(cls, overrides: dict[str, Any]) -> Any:
        return cls.Params(**overrides)

    # --- the two hooks every method implements -------------------------------------------
    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        """One optimisation step at iteration ``step`` (0-based); returns loss terms for logging."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, variant: str | None = None) -> torch.Tensor:
        """Class probabilities (B, K, H, W) of the network the method reports at test time.

        ``variant`` names one of ``self.variants`` (extra outputs scored separately, e.g. the
        SAM teacher's own prediction); ``None`` is the method's reported prediction.
        """
        raise NotImplementedError

    # --- hooks for plug-ins (e.g. SKD) ---------------------------------------------------------
    def student_extra_loss(self, student: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor | float:
        """A loss a plug-in adds to student ``student``'s loss; ``logits`` cover ``batch.x`` in order.

        Methods call this once per student network per update, on logits for the whole batch
        (labeled then unlabeled; possibly a photometric, pixel-aligned view of ``batch.x``).
        The base method adds nothing.
        """
        return 0.0

    def align_to_update(self, student: str, per_pixel: torch.Tensor) -> torch.Tensor:
        """Map per-pixel tensors computed on ``batch.x`` onto the images of the current update.

        Identity, except in methods whose second update sees moved pixels (UCMT's mixing).
        """
        return per_pixel

    # --- shared machinery -----------------------------------------------------------------
    def add_net(self, name: str, net: nn.Module) -> nn.Module:
        self.nets[name] = net.to(self.ctx.device)
        return self.nets[name]

    def sgd(self, name: str, params) -> None:
        """Register SSL4MIS's SGD over ``params`` as optimiser ``name`` (only when training)."""
        if self.ctx.training:
            t = self.ctx.train
            self.optimizers[name] = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def set_lr(self, step: int, power: float = 0.9) -> None:
        """SSL4MIS's poly decay lr * (1 - t/T)^power for every optimiser, applied before each step."""
        scale = (1.0 - step / self.ctx.iterations) ** power
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * scale

    def train(self) -> None:
        for net in self.nets.values():
            net.train()

    def eval(self) -> None:
        for net in self.nets.values():
            net.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["nets"].items():
            self.nets[k].load_state_dict(v)
        for k, v in state["optimizers"].items():
            self.optimizers[k].load_state_dict(v)

    def eval_state_dict(self) -> dict[str, Any]:
        """Weights needed by ``predict`` (kept as the best-model file)."""
        return {k: v.state_dict() for k, v in self.nets.items()}

    def load_eval_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.nets[k].load_state_dict(v)

    def provenance(self) -> dict[str, Any]:
        """Facts about external weights a result depends on (e.g. SAM checkpoint or random init)."""
        return {}

    @classmethod
    def params_dict(cls, params: Any) -> dict[str, Any]:
        return dataclasses.asdict(params)

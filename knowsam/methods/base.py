"""The interface every training method implements: one small class, one ``train_step``.

The shared loop (``knowsam.train``) owns data, schedules of evaluation/checkpoints,
logging and resume; a method owns its networks, optimisers and losses. This base class owns
what every method does the same way: the optimiser step (``update``), the method's own random
generator, persistence and the default prediction. Everything a method must persist goes
through ``state_dict`` so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from knowsam import step_timing
from knowsam.config import SamParams, TrainParams
from knowsam.data.batch import Batch


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


class Method:
    """Base class. Subclasses set ``name``, ``description``, ``reported_net`` and implement ``train_step``.

    A method's hyperparameters (``self.p``) are its dataclass in ``knowsam.methods.params``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # The network ``predict`` reports at test time (a method with other outputs overrides ``predict``).
    reported_net: ClassVar[str] = ""
    # "labeled": sample labeled images from the labeled subset; "all": from the whole training pool.
    label_pool: ClassVar[str] = "labeled"
    # "unlabeled": sample the unlabeled rows from the unlabeled subset; "all": from the whole training
    # pool, labeled images included (their labels unused), as UCMT's official loader does.
    unlabeled_pool: str = "unlabeled"
    # Training-batch augmentation (``knowsam.data.loader.AUGMENTATIONS``): "shared" gives every row the
    # same weak augmentation; "weak-strong" is KnowSAM's own dataloader (weak labeled, strong unlabeled rows).
    augmentation: ClassVar[str] = "shared"
    uses_unlabeled: ClassVar[bool] = True
    # Plug-in suffixes (e.g. "skd") that may be composed with this method.
    accepts_plugins: ClassVar[tuple[str, ...]] = ()
    # The student whose training-forward logits a plug-in uses as SAM's dense prompt (methods accepting
    # plug-ins); it calls ``student_extra_loss`` before any other student of the iteration.
    main_student: ClassVar[str] = ""
    # Extra test-time outputs scored as separate leaderboard rows, e.g. ("sam",).
    variants: ClassVar[tuple[str, ...]] = ()
    # Networks (names in ``self.nets``) whose own prediction is scored at each validation for the
    # training curves only (``val/dice_<name>``): never a leaderboard row, never used to pick weights.
    # KnowSAM's students: is the fused output carried by them, or by the fusion module alone?
    curve_variants: ClassVar[tuple[str, ...]] = ()
    # Score of an image whose prediction and ground truth are both empty, in validation
    # (model selection). 1 is correct; a method may reproduce a published quirk.
    validation_empty_score: float = 1.0
    # Model selection, the weights ``best.pt`` keeps. None: the best validation Dice (every method by
    # default, so that methods are compared alike). The name of a logged training term: the lowest
    # mean of that term over the iterations since the previous evaluation, the later weights winning
    # ties (UCMT's official rule); it needs no validation data.
    selection_loss: str | None = None
    # Gradient accumulation: updates whose gradients add up before each optimiser step (1: none).
    accumulation_steps: int = 1

    def __init__(self, ctx: MethodContext, params: Any):
        self.ctx = ctx
        self.p = params
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # The method's own draws (input noise, augmented views): a CPU generator saved in the
        # state, so resume is exact, and drawn on CPU then moved, so a seed draws the same on
        # every device.
        self.gen = torch.Generator().manual_seed(ctx.seed * 1000 + 11)
        self._accumulated: dict[tuple[str, ...], int] = {}

    # --- the hook every method implements ------------------------------------------------
    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        """One optimisation step at iteration ``step`` (0-based); returns loss terms for logging."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor, variant: str | None = None, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class probabilities (B, K, H, W) of the network the method reports at test time.

        ``variant`` names one of ``self.variants`` (extra outputs scored separately, e.g. the
        SAM teacher's own prediction); ``None`` is the method's reported prediction: the
        softmax of ``reported_net``. ``embeddings``: a frozen teacher encoder's cached
        embeddings of ``x`` (the embed stage's), used by a teacher variant instead of encoding ``x``.
        """
        if variant in self.curve_variants:
            return self.nets[variant](x).float().softmax(1)
        if variant is not None:
            raise ValueError(f"{self.name}: unknown variant {variant!r}; known: {', '.join(self.variants) or 'none'}")
        return self.nets[self.reported_net](x).softmax(1)

    # --- the optimiser step ---------------------------------------------------------------
    def update(self, loss: torch.Tensor, *optimizers: str, backward_part: str = step_timing.STUDENTS_BACKWARD) -> None:
        """Zero the gradients, backward ``loss``, step: for the named optimisers, every one if none is named.

        Optimisers step in the order named (else registration order). A method that accepts
        plug-ins names its own, so it never steps a plug-in's. Loss scaling, clipping and
        accumulation are the hooks below; their defaults change nothing. ``backward_part``: the
        part of a step's time breakdown (``knowsam.step_timing``) the backward pass counts as.
        """
        names = optimizers or tuple(self.optimizers)
        opts = [self.optimizers[n] for n in names]
        done = self._accumulated.get(names, 0)
        if done == 0:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
        with step_timing.part(backward_part):
            self.scale_loss(loss).backward()
        done += 1
        if done < self.accumulation_steps:
            self._accumulated[names] = done
            return
        self._accumulated[names] = 0
        self.clip_gradients(opts)
        with step_timing.part(step_timing.UPDATES):
            for opt in opts:
                self.step_optimizer(opt)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backward (AMP with float16: the GradScaler's scaled loss). Default: unscaled."""
        return loss

    def clip_gradients(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Clip the gradients ``optimizers`` are about to apply. Default: no clipping."""

    def step_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply one optimiser's gradients (AMP with float16: through the GradScaler)."""
        optimizer.step()

    # --- hooks for plug-ins (e.g. SKD) ---------------------------------------------------------
    def student_extra_loss(self, student: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor | float:
        """A loss a plug-in adds to student ``student``'s loss; ``logits`` cover ``batch.x`` in order.

        Methods call this once per student network per iteration, on that student's first forward
        of the iteration: its training forward (train mode, with its graph) over the whole batch,
        labeled then unlabeled, possibly a photometric, pixel-aligned view of ``batch.x``; the
        main student (``main_student``) first. A plug-in may use the main student's logits
        (detached) as an input of its own, e.g. SKD's dense prompt. The base method adds nothing.
        """
        return 0.0

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

    def speed_modules(self) -> list[nn.Module]:
        """The modules ``train.channels_last`` and ``train.compile`` apply to: every net (a plug-in adds its own)."""
        return list(self.nets.values())

    def train(self) -> None:
        for net in self.nets.values():
            net.train()

    def eval(self) -> None:
        for net in self.nets.values():
            net.eval()

    def state_dict(self) -> dict[str, Any]:
        """What resume needs: the weights, every optimiser and the method's generator."""
        return {
            "weights": self.eval_state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_eval_state_dict(state["weights"])
        for k, v in state["optimizers"].items():
            self.optimizers[k].load_state_dict(v)
        self.gen.set_state(state["rng"])

    def eval_state_dict(self) -> dict[str, Any]:
        """Weights needed by ``predict`` (kept as the best-model file)."""
        return {k: v.state_dict() for k, v in self.nets.items()}

    def load_eval_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            self.nets[k].load_state_dict(v)

    def provenance(self) -> dict[str, Any]:
        """Facts about external weights a result depends on (e.g. SAM checkpoint or random init)."""
        return {}

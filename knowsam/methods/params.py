"""Every method's hyperparameters (``method_params.<name>`` in params.yaml), as frozen dataclasses.

They live here, apart from the method code, because a params file is checked (keys, types and
each method's own value checks in ``__post_init__``) by every pipeline stage, and the method
modules import torch: seconds in the stages that never train. Nothing here imports torch.
A method without hyperparameters needs no entry; ``params_class`` gives it :class:`NoParams`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from knowsam.errors import ConfigError

_BASE: dict[str, type] = {}  # base method name -> its Params
_PLUGIN: dict[str, type] = {}  # plug-in suffix -> the fields it adds to a method's Params


def params_of(name: str) -> Callable[[type], type]:
    """Declare the decorated dataclass as method ``name``'s Params (``"+skd"``: a plug-in's fields)."""

    def register(cls: type) -> type:
        table, key = (_PLUGIN, name[1:]) if name.startswith("+") else (_BASE, name)
        if key in table:
            raise ValueError(f"params of {name!r} declared twice")
        table[key] = cls
        return cls

    return register


@dataclass(frozen=True)
class NoParams:
    pass


@functools.cache  # one class per name: ``X+skd`` composes the same class every time
def params_class(name: str) -> type:
    """The Params dataclass of runnable name ``name``; ``X+suffix`` extends X's with the plug-in's fields."""
    base, _, suffix = name.partition("+")
    cls = _BASE.get(base, NoParams)
    if not suffix:
        return cls
    extra = _PLUGIN[suffix]
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(extra)]

    def check_both(self) -> None:  # the base method's value checks and the plug-in's
        for part in (cls, extra):
            if hasattr(part, "__post_init__"):
                part.__post_init__(self)

    return dataclasses.make_dataclass(
        f"{cls.__name__}With{extra.__name__}",
        fields,
        bases=(cls,),
        frozen=True,
        namespace={"__post_init__": check_both},
    )


@params_of("mt")
@dataclass(frozen=True)
class MeanTeacherParams:
    ema_decay: float = 0.99
    consistency: float = 0.1  # weight of the consistency term once ramped up
    rampup_fraction: float = 1.0  # ramp over this fraction of the run (SSL4MIS: the whole run)
    ramp_stages: int = 200  # the ramp advances in this many stages (SSL4MIS); 0: every iteration
    consistency_start_fraction: float = 1 / 30  # no consistency before this part of the run (SSL4MIS: 1000 of 30k)
    noise_std: float = 0.1  # teacher input noise N(0, std^2) ...
    noise_clip: float = 0.2  # ... clamped to [-clip, clip]

    def __post_init__(self) -> None:
        _check_ramp("mt", self.rampup_fraction, self.ramp_stages)
        if not 0 <= self.consistency_start_fraction <= 1:
            raise ConfigError(
                f"mt: consistency_start_fraction must be in [0, 1], got {self.consistency_start_fraction}"
            )
        _check_unit("mt", ema_decay=self.ema_decay)
        _check_non_negative("mt", consistency=self.consistency, noise_std=self.noise_std, noise_clip=self.noise_clip)


@params_of("cps")
@dataclass(frozen=True)
class CpsParams:
    cps_weight: float = 0.1  # weight of the cross pseudo-label CE once ramped up (SSL4MIS: 0.1)
    rampup_fraction: float = 1.0  # ramp over this fraction of the run (SSL4MIS: the whole run)
    ramp_stages: int = 200  # the ramp advances in this many stages (SSL4MIS); 0: every iteration
    pseudo_supervise_labeled: bool = True  # CPS paper: every image; SSL4MIS: unlabeled images only (False)

    def __post_init__(self) -> None:
        _check_ramp("cps", self.rampup_fraction, self.ramp_stages)
        _check_non_negative("cps", cps_weight=self.cps_weight)


@params_of("ucmt")
@dataclass(frozen=True)
class UcmtParams:
    ema_decay: float = 0.99
    student1_share: float = 0.99  # teacher follows 0.99 * student1 + 0.01 * student2
    # alpha: loss_u = alpha x (mean of the two peer terms + mean of the two teacher terms), i.e.
    # alpha / 2 on each term of each student
    unsup_weight: float = 0.1
    rampup_fraction: float = 0.2  # ramp over this fraction of the run (official: 5 of 25 epochs)
    supervised_ce: bool = False  # False: Dice alone (official); True: the other baselines' (CE + Dice) / 2
    umix_grid: int = 16  # patches per side (fewer on small images, see umix_min_patch)
    umix_min_patch: int = 4  # smallest patch side in pixels
    umix_topk: int = 2  # patches relocated per image and direction
    select: str = "val-dice"  # model selection; "train-loss": the official lowest mean loss of the mixed update
    unlabeled_pool: str = "all"  # official: unlabeled rows drawn from every training image; "unlabeled": the others

    def __post_init__(self) -> None:
        _check_ramp("ucmt", self.rampup_fraction, 0)
        _check_unit("ucmt", ema_decay=self.ema_decay, student1_share=self.student1_share)
        _check_non_negative("ucmt", unsup_weight=self.unsup_weight)
        # the patch count is checked against the image once it is known (knowsam.methods.ucmt)
        _check_positive("ucmt", umix_grid=self.umix_grid, umix_min_patch=self.umix_min_patch, umix_topk=self.umix_topk)
        _check_choice("ucmt", "select", self.select, UCMT_SELECTIONS)
        _check_choice("ucmt", "unlabeled_pool", self.unlabeled_pool, UNLABELED_POOLS)


UCMT_SELECTIONS = ("val-dice", "train-loss")
UNLABELED_POOLS = ("unlabeled", "all")


def _check_choice(method: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{method}: {key} must be one of {', '.join(choices)}, got {value!r}")


def _check_ramp(method: str, fraction: float, stages: int) -> None:
    if not 0 <= fraction <= 1 or stages < 0:
        raise ConfigError(f"{method}: need 0 <= rampup_fraction <= 1 and ramp_stages >= 0, got {fraction}, {stages}")


def _check_unit(method: str, **values: float) -> None:
    """EMA decays and mixing shares: weights of an average, in [0, 1]."""
    for key, value in values.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{method}: {key} must be in [0, 1], got {value}")


def _check_non_negative(method: str, **values: float) -> None:
    """Loss weights and noise scales: a negative one would reverse what the term asks for."""
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{method}: {key} must be >= 0, got {value}")


def _check_positive(method: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{method}: {key} must be > 0, got {value}")


KD_ENTROPY_FORMS = ("k-class", "official-2class")


def iterations_of(value: float, total: int) -> int:
    """An iteration count written as a fraction of the run (up to 1, of ``total``) or absolutely (above 1)."""
    return round(value * total) if value <= 1 else int(value)


@params_of("knowsam")
@dataclass(frozen=True)
class KnowSamParams:
    kd_temperature: float = 10.0
    kd_weight: float = 1.0  # official: the KD term added with weight 1 (trainer.py:185-186)
    entropy_weight: float = 0.9
    consistency_weight: float = 1.0  # official: consistency 0.1 x 10
    self_training_weight: float = 1.0  # official: the mixed stage's fused-argmax term at weight 1 (trainer.py:133-134)
    consistency_rampup: int = 200  # ramp "epochs" (stages) spread over consistency_ramp_iterations
    consistency_ramp_iterations: float = 1.0  # the ramp's span (see iterations_of); official: the whole run
    sam_lr: float = 1e-4
    mixed_iterations: float = 0.24  # mixing after this iteration (see iterations_of); official: 12000
    mix_grid: int = 4
    mix_patches: int = 5
    fusion_official_activation: bool = True
    vnet_consistency_grad: bool = False  # defect 1 (official: False)
    consistency_all_classes: bool = False  # defect 2 (official: False, last class only)
    kd_entropy_form: str = "k-class"  # defect 4: "official-2class" reproduces the 2-class code
    validation_empty_zero: bool = True  # defect 11 (official: both-empty image scores Dice 0)
    sam_full_graph: bool = True  # official: SAM's graph over the whole batch; False: labeled rows only (cheaper)

    def __post_init__(self) -> None:
        _check_choice("knowsam", "kd_entropy_form", self.kd_entropy_form, KD_ENTROPY_FORMS)
        if self.kd_temperature <= 0 or self.sam_lr <= 0 or self.consistency_rampup < 0:
            raise ConfigError("knowsam: kd_temperature and sam_lr must be > 0, consistency_rampup >= 0")
        for key in ("mixed_iterations", "consistency_ramp_iterations"):
            value = getattr(self, key)
            if not (0 <= value <= 1 or value > 1 and float(value).is_integer()):
                raise ConfigError(
                    f"knowsam: {key} must be a fraction of train.iterations in [0, 1] or a whole "
                    f"number of iterations above 1, got {value}"
                )
        if self.mix_grid < 1 or not 0 <= self.mix_patches <= self.mix_grid**2:
            raise ConfigError(
                f"knowsam: need mix_grid >= 1 and 0 <= mix_patches <= mix_grid^2, got "
                f"{self.mix_grid}, {self.mix_patches}"
            )
        _check_non_negative(
            "knowsam",
            kd_weight=self.kd_weight,
            entropy_weight=self.entropy_weight,
            consistency_weight=self.consistency_weight,
            self_training_weight=self.self_training_weight,
        )


@params_of("+skd")
@dataclass(frozen=True)
class SkdParams:
    kd_temperature: float = 10.0  # KnowSAM's T
    kd_weight: float = 1.0  # weight of the KD term in each student's loss
    sam_lr: float = 1e-4  # Adam lr of SAM's adapters and prompt heads, decayed linearly to 0

    def __post_init__(self) -> None:
        _check_positive("skd", kd_temperature=self.kd_temperature, sam_lr=self.sam_lr)
        _check_non_negative("skd", kd_weight=self.kd_weight)

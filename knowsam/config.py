"""Parameters: typed, validated before anything runs, loaded from ``params.yaml``.

``params.yaml`` is what DVC reads (its lists drive the stage matrix) and what every
stage validates first. A profile (``knowsam/profiles/<name>.yaml``) is a complete
``params.yaml``; ``knowsam-bench profile NAME`` switches to one.

This module is the bottom layer: it knows the schema and the checks that need nothing else.
Which datasets and methods exist (and each method's own params) is checked one layer up, in
``knowsam.validation``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowsam.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"
SEED_LIMIT = 2**32  # numpy's seeds are unsigned 32-bit integers


@dataclass(frozen=True)
class DataParams:
    raw_root: str = "data/raw"
    prepared_root: str = "data/prepared"
    splits_root: str = "data/splits"
    mirror: str | None = None  # folder holding datasets offline; env KNOWSAM_MIRROR is the fallback
    image_size: int = 256
    interpolation: str = "bilinear"  # "nearest" reproduces the official code (defect 10)
    val_fraction: float = 0.05  # of the training pool, held out for model selection


@dataclass(frozen=True)
class TrainParams:
    iterations: int = 30000
    batch_size: int = 24
    labeled_batch: int = 12
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_every: int = 200
    checkpoint_every: int = 1000
    threads: int = 0  # 0: torch's default
    device: str = "auto"  # auto | cpu | cuda | mps
    amp_bf16: bool = False  # bfloat16 autocast around each training step (no GradScaler needed)
    channels_last: bool = False  # NHWC memory layout for nets and input batches
    compile: bool = False  # torch.compile every net (off: compile time only pays back on long GPU runs)


@dataclass(frozen=True)
class SamParams:
    arch: str = "vit_b"  # vit_b | vit_l | vit_h | tiny | lite_medsam
    # official | bundled (LiteMedSAM's packaged file) | none (random init, stated in every table) | a file path
    checkpoint: str = "official"
    cache_dir: str = "~/.cache/knowsam-bench"
    normalize_pixels: bool = False  # official code feeds [0,1] pixels without SAM's normalisation
    # adapters: KnowSAM's trainable encoder adapters, the encoder runs every step (the GPU way);
    # cached: frozen encoder, embeddings computed once by the embed stage (the CPU way)
    encoder: str = "adapters"
    embeddings_root: str = "data/embeddings"  # where the embed stage writes <dataset>/ (encoder: cached)
    decoder: str = "adapted"  # adapted: KnowSAM's official decoder (adapters); stock: SAM's own
    load_decoder_mlp: bool = False  # official: the adapted decoder's MLPs never get the checkpoint's weights
    # The grid the learnable prompt heads see: the embedding average-pooled to at most this many tokens a
    # side. 16: the official heads' grid (ViT-B at 256 px); full: the embedding's own (LiteMedSAM: 64).
    prompt_grid: int | str = 16
    amp_bf16: bool = False  # bfloat16 autocast scoped to the SAM teacher (changes its numbers)


@dataclass(frozen=True)
class EvalParams:
    resolution: str = "original"  # original | training
    overlay_images: int = 4


@dataclass(frozen=True)
class Params:
    profile: str
    datasets: list[str]
    methods: list[str]
    ratios: list[float]
    seeds: list[int]
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    sam: SamParams = field(default_factory=SamParams)
    eval: EvalParams = field(default_factory=EvalParams)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def require(self, key: str, *names: str, source: str = "params") -> None:
        """Each of ``names`` is listed under ``key`` ('datasets' or 'methods'), or one error line (exit 2)
        naming the ``source`` of these params."""
        listed = getattr(self, key)
        for name in names:
            if name not in listed:
                raise ConfigError(f"{key[:-1]} {name!r} is not in {source} '{key}' ({', '.join(listed)})")


def check_seed(seed: int, name: str) -> None:
    """Seeds are numpy's, unsigned 32-bit: a larger one would fail only once training starts."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be in [0, 2**32) (numpy's seed range)")


INTERPOLATIONS = ("bilinear", "nearest")
SAM_ENCODERS = ("adapters", "cached")
RESOLUTIONS = ("original", "training")
DEVICES = ("auto", "cpu", "cuda", "mps")
SAM_DECODERS = ("adapted", "stock")
# knowsam.models.sam_teacher.TEACHER_ARCHS, listed here so that params are checked without importing torch
# (tests/test_params_strict.py checks that both lists agree).
SAM_ARCHS = ("vit_b", "vit_l", "vit_h", "tiny", "lite_medsam")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) > 1:  # e.g. int | str: any one of the plain types
            if not any(isinstance(value, o) and isinstance(value, bool) == (o is bool) for o in inner):
                raise ConfigError(f"params: '{key}' must be {' or '.join(map(_type_name, inner))}, got {value!r}")
            return value
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"params: '{key}' must be a mapping, got {type(value).__name__}")
        return build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params: '{key}' must be a list, got {type(value).__name__}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params: '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: refuse `iterations: true` and `normalize_pixels: 1` alike.
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise ConfigError(f"params: '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):  # YAML's .inf and .nan: no parameter means anything by them
        raise ConfigError(f"params: '{key}' must be a finite number, got {value}")
    return value


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Instance of the dataclass ``cls`` from the mapping ``raw``: unknown, missing and mistyped keys
    are one-line errors naming ``prefix + key``; the class's own ``__post_init__`` checks run too."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"params: unknown key '{prefix}{key}' (known: {', '.join(sorted(names)) or 'none'})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params: missing key '{prefix}{f.name}'")
    return cls(**kwargs)


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"params: '{key}' must be one of {', '.join(choices)}, got {value!r}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """A value rule of one parameter: ``params: '<key>' = <value> must be <rule>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"params: '{key}' = {value!r} must be {rule}")


def _check_prompt_grid(grid: int | str) -> None:
    if grid != "full" and not (isinstance(grid, int) and grid >= 1):
        raise ConfigError(f"params: 'sam.prompt_grid' must be a positive integer or 'full', got {grid!r}")


def check(params: Params) -> Params:
    """Semantic checks that types alone cannot express (not the registries). Returns ``params`` unchanged."""
    for key, items in (
        ("datasets", params.datasets),
        ("methods", params.methods),
        ("ratios", params.ratios),
        ("seeds", params.seeds),
    ):
        if not items:
            raise ConfigError(f"params: '{key}' is empty; list at least one")
        if len(set(items)) != len(items):
            raise ConfigError(f"params: '{key}' has duplicates: {items}")
    for i, ratio in enumerate(params.ratios):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"params: 'ratios[{i}]' = {ratio} must be in (0, 1]")
    for i, seed in enumerate(params.seeds):
        check_seed(seed, f"params: 'seeds[{i}]' = {seed}")
    d, t = params.data, params.train
    _check_choice(d.interpolation, INTERPOLATIONS, "data.interpolation")
    _check_choice(params.eval.resolution, RESOLUTIONS, "eval.resolution")
    _check_choice(t.device, DEVICES, "train.device")
    _check_choice(params.sam.arch, SAM_ARCHS, "sam.arch")
    _check_choice(params.sam.encoder, SAM_ENCODERS, "sam.encoder")
    if params.sam.encoder == "cached" and params.sam.checkpoint == "none":
        raise ConfigError(
            "params: 'sam.encoder' cached needs pretrained weights (sam.checkpoint is none); "
            "a random encoder is only trained with adapters"
        )
    _check_choice(params.sam.decoder, SAM_DECODERS, "sam.decoder")
    _check_prompt_grid(params.sam.prompt_grid)
    if d.image_size < 16 or d.image_size % 16:
        raise ConfigError(
            f"params: 'data.image_size' = {d.image_size} must be a positive multiple of 16 "
            "(four 2x poolings in the U-Net and SAM's 16-pixel patches)"
        )
    if not 0.0 <= d.val_fraction < 0.5:
        raise ConfigError(f"params: 'data.val_fraction' = {d.val_fraction} must be in [0, 0.5)")
    for key in ("iterations", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"params: 'train.{key}' must be >= 1, got {getattr(t, key)}")
    if not 1 <= t.labeled_batch <= t.batch_size:
        raise ConfigError(
            f"params: 'train.labeled_batch' = {t.labeled_batch} must be in [1, train.batch_size = {t.batch_size}]"
        )
    if t.lr <= 0:
        raise ConfigError(f"params: 'train.lr' must be > 0, got {t.lr}")
    # torch's SGD refuses a negative momentum or weight decay; momentum 1 never forgets a gradient.
    require(0 <= t.momentum < 1, "train.momentum", t.momentum, "in [0, 1)")
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0")
    require(t.threads >= 0, "train.threads", t.threads, ">= 0 (0: torch's default)")
    require(params.eval.overlay_images >= 0, "eval.overlay_images", params.eval.overlay_images, ">= 0")
    return params


def parse(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    ratios = raw.get("ratios")
    for i, ratio in enumerate(ratios if isinstance(ratios, list) else []):  # a scalar fails the type check
        if isinstance(ratio, int) and not isinstance(ratio, bool) and ratio == 1:  # other ints fail the range check
            raise ConfigError(
                f"params: 'ratios[{i}]' = {ratio}: write it as {ratio}.0 (DVC names each stage's "
                "files by the number as written, the harness by its value as a float)"
            )
    return build(Params, raw)


def ratio_text(ratio: float) -> str:
    """A labeled ratio in file and stage names: the text DVC renders for it from params.yaml (1.0, 0.1, 0.05)."""
    return str(float(ratio))


def load_yaml(path: str | Path) -> Any:
    """A params file's content as DVC reads it: YAML 1.2 (``3e-2`` is a float, ``yes`` a string) through
    ruamel.yaml's safe loader, DVC's own; a duplicate key at any level is refused, as DVC refuses it."""
    from ruamel.yaml import YAML, YAMLError
    from ruamel.yaml.constructor import DuplicateKeyError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return YAML(typ="safe").load(text)
    except DuplicateKeyError:
        key, line, first = _duplicate_key(YAML(typ="safe").compose(text))
        raise ConfigError(
            f"{path}: duplicate key '{key}' at line {line} (first at line {first}); keep one (DVC refuses the file too)"
        ) from None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8: {exc.reason} at byte {exc.start})") from None


def _duplicate_key(node: Any, prefix: str = "") -> tuple[str, int, int] | None:
    """(dotted key, its line, the first occurrence's line) of the first key repeated in one mapping."""
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    if isinstance(node, MappingNode):
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                return f"{prefix}{key_node.value}", line, seen[key_node.value]
            seen[key_node.value] = line
        for key_node, value_node in node.value:
            found = _duplicate_key(value_node, f"{prefix}{key_node.value}.")
            if found:
                return found
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix[:-1]}[{i}].")
            if found:
                return found
    return None


def read(path: str | Path = "params.yaml") -> Params:
    """Read and type-check a params file; ``knowsam.validation.load`` also checks the values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    return parse(load_yaml(path), str(path))


def to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; known: {', '.join(profile_names())}")
    return path

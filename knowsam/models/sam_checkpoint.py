"""Find, verify and load SAM checkpoints into a :class:`SamTeacher`.

A missing or corrupt checkpoint is always an error: the teacher is never silently left at its
random initialisation. ``"none"`` is the only way to ask for random SAM weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from knowsam.download import download_file, sha256_file
from knowsam.errors import ConfigError, KnowsamError
from knowsam.fileio import write_json
from knowsam.models import lite_medsam
from knowsam.models.sam_teacher import SamTeacher


@dataclass(frozen=True)
class SamCheckpoint:
    url: str
    filename: str
    sha256: str


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_b": SamCheckpoint(
        _BASE_URL + "sam_vit_b_01ec64.pth",
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": SamCheckpoint(
        _BASE_URL + "sam_vit_l_0b3195.pth",
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": SamCheckpoint(
        _BASE_URL + "sam_vit_h_4b8939.pth",
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}

_POS_EMBED = "image_encoder.pos_embed"


def resolve_checkpoint(spec: str, arch: str, cache_dir: Path, *, download: bool = True) -> Path | None:
    """Turn a checkpoint spec into a verified local file.

    ``"none"``: random SAM weights (returns None). ``"default"``/``"official"``: the official file
    for ``arch`` in ``cache_dir``, downloaded once if absent (and ``download``). ``"bundled"``: the
    LiteMedSAM file shipped inside its package (size and sha256 checked). Anything else is a
    path to a local file; if it carries an official file name it must have that file's sha256.
    """
    if spec == "none":
        return None
    if spec == "bundled":
        if arch != lite_medsam.ARCH:
            raise ConfigError(
                f"sam.checkpoint 'bundled' is LiteMedSAM's packaged file: it needs sam.arch "
                f"{lite_medsam.ARCH!r}, not {arch!r}"
            )
        return lite_medsam.bundled_checkpoint()
    if spec in ("default", "official"):
        if arch == lite_medsam.ARCH:
            raise ConfigError(f"no official SAM checkpoint for arch {arch!r}: use sam.checkpoint 'bundled'")
        if arch not in SAM_CHECKPOINTS:
            raise ConfigError(f"no official SAM checkpoint for arch {arch!r}; use a local file or 'none'")
        info = SAM_CHECKPOINTS[arch]
        path = Path(cache_dir) / info.filename
        if path.is_file():
            _verify(path, info.sha256)
            return path
        if not download:
            raise KnowsamError(f"SAM checkpoint {path} is missing and downloads are disabled")
        # download_file refuses bytes that do not match the pinned digest.
        _write_marker(path, download_file(info.url, path, sha256=info.sha256, progress=True))
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise KnowsamError(f"SAM checkpoint {path} not found")
    for official_arch, info in SAM_CHECKPOINTS.items():
        if path.name == info.filename:
            if official_arch != arch:
                raise ConfigError(f"SAM checkpoint {path} is the official {official_arch} file but arch is {arch}")
            _verify(path, info.sha256)
    return path


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, sha256: str) -> None:
    """Record a successful verification; a read-only cache only costs a re-hash next time."""
    try:
        write_json(_marker(path), {"sha256": sha256, **_stamp(path)})
    except OSError:
        pass


def _verify(path: Path, sha256: str) -> None:
    """Check ``path`` against ``sha256``, hashing only if the file changed since the last check."""
    marker = _marker(path)
    try:
        if json.loads(marker.read_text()) == {"sha256": sha256, **_stamp(path)}:
            return
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if digest != sha256:
        raise KnowsamError(
            f"SAM checkpoint {path} has sha256 {digest}, expected {sha256} (corrupt or wrong file: delete it)"
        )
    _write_marker(path, digest)


@dataclass
class LoadReport:
    """What :func:`load_sam_weights` did with each tensor."""

    loaded: list[str] = field(default_factory=list)  # copied as is (includes resized keys)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # key -> (from, to)
    # in the checkpoint, deliberately unused (rel-pos tables; decoder MLPs kept at init, see SamTeacher)
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, matching nothing in the teacher
    missing: list[str] = field(default_factory=list)  # in the teacher, absent from the checkpoint

    def summary(self) -> str:
        return (
            f"SAM weights: {len(self.loaded)} loaded ({len(self.resized)} resized), "
            f"{len(self.skipped)} skipped, {len(self.unexpected)} unexpected, "
            f"{len(self.missing)} missing (adapters/prompt heads)"
        )


def load_sam_weights(teacher: SamTeacher, path: Path) -> LoadReport:
    """Load a SAM checkpoint file (official format: a plain state_dict) into ``teacher``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage, truncated or code-carrying files raise many types, with torch's long advice
        raise KnowsamError(
            f"SAM checkpoint {path}: not a torch checkpoint or unreadable ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KnowsamError(f"SAM checkpoint {path} is not a state_dict of tensors")
    return load_sam_state_dict(teacher, state, source=str(path))


def load_sam_state_dict(teacher: SamTeacher, state: dict[str, torch.Tensor], source: str = "state_dict") -> LoadReport:
    """Copy SAM's tensors into the teacher, resizing the positional embedding to its token grid.

    The teacher keeps SAM's module names (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``), so keys map one to one. Every SAM tensor the teacher has must be present:
    only the adapters and prompt heads may be missing, else the file is not a SAM checkpoint for
    this arch.
    """
    target = teacher.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # relative positions are off in the teacher; some SAM tensors it keeps at init on purpose
        if key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) or key in teacher.unloaded_sam_names:
            report.skipped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            if key != _POS_EMBED or value.ndim != 4 or value.shape[-1] != want[-1]:
                raise KnowsamError(
                    f"SAM checkpoint {source}: {key} has shape {tuple(value.shape)}, "
                    f"teacher needs {tuple(want)} (wrong arch?)"
                )
            report.resized[key] = (tuple(value.shape), tuple(want))
            value = resize_pos_embed(value, want[1:3])
        to_load[key] = value
        report.loaded.append(key)
    report.missing = [k for k in target if k not in to_load and k not in teacher.unloaded_sam_names]
    not_sam = [k for k in report.missing if not SamTeacher.is_added_name(k)]
    if not_sam:
        raise KnowsamError(
            f"SAM checkpoint {source} lacks {len(not_sam)} SAM tensors (e.g. {not_sam[0]}): "
            f"not a {teacher.arch} checkpoint"
        )
    teacher.load_state_dict(to_load, strict=False)
    teacher.train(teacher.training)  # lets modules that cache values derived from weights (TinyViT) refresh them
    return report


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of SAM's absolute positional embedding (1, H, W, C) to (1, *grid, C)."""
    resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos.dtype)

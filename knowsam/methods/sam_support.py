"""Building, optimising and persisting the SAM teacher, shared by KnowSAM and the SKD plug-in.

Random SAM weights are only ever used when asked for (``sam.checkpoint: none``); a missing or
corrupt checkpoint raises. The teacher is built from a generator seeded with the run seed, so a
random-init teacher is the same whenever the method is rebuilt (training, resume, evaluation):
that lets checkpoints store only the small trained part (adapters, prompt heads) instead of the
whole frozen SAM (about 360 MB for ViT-B), with a fingerprint to prove the frozen part matches.

``segment_anything`` (and through it torchvision) is imported only when a teacher is built or
inspected: importing it costs seconds, and every pipeline stage of a method without SAM (and
every evaluation of one) would pay for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from knowsam.data.batch import Batch
from knowsam.errors import KnowsamError
from knowsam.methods.base import MethodContext

if TYPE_CHECKING:
    from knowsam.models.sam_teacher import SamTeacher


def build_sam_teacher(ctx: MethodContext) -> tuple[SamTeacher, dict[str, Any]]:
    """SamTeacher for ``ctx``, loaded (or explicitly random), frozen except adapters/prompt heads, on ctx.device.

    Returns the teacher and its provenance: ``sam_arch``, ``sam_weights`` ("random-init" or
    "<file name> sha256 <first 12 hex>"), ``sam_encoder`` (adapters or cached), ``sam_options``
    (the options that change its numbers, in words; "" when none does) and ``sam_load_report``
    (one line).
    """
    from knowsam.models.sam_checkpoint import load_sam_weights, resolve_checkpoint
    from knowsam.models.sam_teacher import SamTeacher

    s = ctx.sam
    path = resolve_checkpoint(s.checkpoint, s.arch, Path(s.cache_dir).expanduser())  # fails before the build
    with torch.random.fork_rng(devices=[]):  # seeded build; the run's global RNG stream is untouched
        torch.manual_seed(ctx.seed)
        teacher = SamTeacher(
            s.arch,
            ctx.image_size,
            ctx.num_classes,
            ctx.in_channels,
            s.normalize_pixels,
            encoder=s.encoder,
            decoder=s.decoder,
            load_decoder_mlp=s.load_decoder_mlp,
            prompt_grid=s.prompt_grid,
            bf16=s.amp_bf16,
        )
    if path is None:
        weights, report = "random-init", f"random init (seed {ctx.seed}); no checkpoint loaded"
    else:
        report = load_sam_weights(teacher, path).summary()
        weights = f"{path.name} sha256 {_checkpoint_sha256(path, s.arch)[:12]}"
    # The constructor froze SAM; loading copies values only, so requires_grad is unchanged.
    teacher.to(ctx.device)
    return teacher, {
        "sam_arch": s.arch,
        "sam_weights": weights,
        "sam_encoder": s.encoder,
        "sam_options": options_note(teacher),
        "sam_load_report": report,
    }


def options_note(teacher: SamTeacher) -> str:
    """The ``sam.`` options that make this teacher compute otherwise than at full precision on its own grid."""
    from knowsam.models.sam_teacher import embedding_shape

    grid = embedding_shape(teacher.arch, teacher.image_size)[-1]
    notes = []
    if teacher.prompt_grid < grid:
        g = teacher.prompt_grid
        notes.append(f"prompt heads on the {grid}x{grid} embedding pooled to {g}x{g}")
    if teacher.bf16:
        notes.append("bf16 autocast")
    return ", ".join(notes)


def _checkpoint_sha256(path: Path, arch: str) -> str:
    """The official or bundled file's known digest (``resolve_checkpoint`` has verified it), else hash the file."""
    from knowsam.download import sha256_file
    from knowsam.models import lite_medsam
    from knowsam.models.sam_checkpoint import SAM_CHECKPOINTS

    if arch == lite_medsam.ARCH and path.name == lite_medsam.BUNDLED_FILE:
        return lite_medsam.BUNDLED_SHA256
    info = SAM_CHECKPOINTS.get(arch)
    return info.sha256 if info is not None and path.name == info.filename else sha256_file(path)


def teacher_forward(
    teacher: SamTeacher,
    batch: Batch,
    dense_logits: torch.Tensor,
    grad_rows: int | None = None,
    encoder_grad_rows: int | None = None,
) -> torch.Tensor:
    """The teacher's per-class logits (float32) for ``batch.x``, in the frame of the augmented view.

    ``adapters``: SAM encodes the augmented images, the first ``encoder_grad_rows`` (None: all) with
    a graph, the rest without. ``cached``: SAM decodes the cached embedding of each un-augmented
    image; the dense prompt (predicted on the view) is first moved back to the image's own frame,
    and the logits moved to the view's frame, by the geometry the augmentation recorded.
    Photometric and cut-out changes of the view are not seen by a cached teacher. ``grad_rows``:
    the mask decoder keeps a graph for the first that many images only (``SamTeacher.decode``).
    """
    if teacher.encoder_mode == "adapters":
        x = batch.x
        n = len(x) if encoder_grad_rows is None else encoder_grad_rows
        embeddings = teacher.encode(x[:n])
        if n < len(x):
            with torch.no_grad():
                rest = teacher.encode(x[n:])
            embeddings = torch.cat([embeddings, rest])  # outside no_grad: the first rows keep their graph
        return teacher.decode(embeddings, dense_logits, grad_rows)
    if batch.teacher_embeddings is None or batch.geometry is None:
        raise KnowsamError(
            "sam.encoder cached: this batch carries no cached embeddings "
            "(the training stream reads them from the embed stage's output)"
        )
    embeddings = batch.teacher_embeddings.to(dense_logits.dtype)
    dense = batch.geometry.invert(dense_logits.detach())
    return batch.geometry.apply(teacher.decode(embeddings, dense, grad_rows))


def sam_optimizer(teacher: SamTeacher, lr: float = 1e-4) -> torch.optim.Adam:
    """Adam over the teacher's trainable tensors (adapters, prompt heads), as in KnowSAM."""
    return torch.optim.Adam(teacher.trainable_parameters(), lr=lr)


def linear_decay(lr: float, step: int, total: int) -> float:
    """KnowSAM's schedule for both optimisers: lr * (1 - t/T)."""
    return lr * (1.0 - step / total)


def teacher_prediction(
    teacher: SamTeacher, x: torch.Tensor, prompt: torch.Tensor, embeddings: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities of SAM on ``x`` prompted by ``prompt`` (a student's logits, as in training);
    ``embeddings``: the cached encoder's output for ``x``, else SAM encodes ``x`` itself."""
    embeddings = teacher.encode(x) if embeddings is None else embeddings.to(prompt.dtype)
    return teacher.decode(embeddings, prompt).float().softmax(1)


class TeacherWeights:
    """The teacher's part of a method's saved weights: its trained tensors (adapters, prompt heads) and a
    fingerprint of the frozen rest, which is rebuilt from the checkpoint and the run seed, never saved."""

    def __init__(self, teacher: SamTeacher, provenance: dict[str, Any], owner: str):
        self.teacher, self.provenance, self.owner = teacher, provenance, owner
        self._frozen_sha256: str | None = None

    def frozen_sha256(self) -> str:
        """Computed once: the frozen weights never change."""
        if self._frozen_sha256 is None:
            self._frozen_sha256 = frozen_fingerprint(self.teacher)
        return self._frozen_sha256

    def state(self) -> dict[str, Any]:
        return {"trained": trained_state(self.teacher), "frozen_sha256": self.frozen_sha256()}

    def load(self, state: dict[str, Any]) -> None:
        if state["frozen_sha256"] != self.frozen_sha256():
            raise KnowsamError(
                f"{self.owner}: the saved weights were trained with other frozen SAM weights than the ones "
                f"built now ({self.provenance['sam_weights']}; checkpoint, arch, image size or seed changed); "
                "retrain or restore that configuration"
            )
        load_trained_state(self.teacher, state["trained"])


def frozen_fingerprint(teacher: SamTeacher) -> str:
    """sha256 over the frozen SAM tensors (names, shapes, bytes): identifies the weights not saved."""
    h = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        if not teacher.is_added_name(name):
            h.update(name.encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trained_state(teacher: SamTeacher) -> dict[str, torch.Tensor]:
    """Only what training changes: adapters and prompt heads (with their BatchNorm buffers)."""
    return {k: v for k, v in teacher.state_dict().items() if teacher.is_added_name(k)}


def load_trained_state(teacher: SamTeacher, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trained_state`; every added tensor must be present and nothing else."""
    expected = set(trained_state(teacher))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KnowsamError(
            f"saved SAM state does not match the teacher (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    teacher.load_state_dict(state, strict=False)

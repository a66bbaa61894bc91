"""Data-parallel training of one run over several processes (``torchrun``), no method changes.

Launch the usual training command under ``torchrun`` (``torchrun --nproc_per_node 4 -m knowsam
train ...``); without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) everything here is a
no-op and a run is exactly a single-process run. Under ``torchrun``:

* the process group uses NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU;
* all ranks build the method from the same seed, then every parameter and buffer is broadcast
  from rank 0, so they start identical;
* each rank draws ``labeled_batch / W`` labeled and ``(batch_size - labeled_batch) / W``
  unlabeled images per step from its own sampling streams, seeded by ``(seed, rank)``
  (:func:`stream_seed`); the global batch is the union of the ranks' slices. Streams are
  independent, not a partition: an image may appear on two ranks in the same step, exactly
  as two draws of a larger single-process batch from two epochs could;
* every optimiser gets a step pre-hook that all-reduces (averages) the gradients of its
  parameters before it steps. Methods own several networks and optimisers and call
  ``opt.step()`` themselves; the hook covers all of them (and plug-in optimisers, such as
  SKD's SAM optimiser) without touching method code. A parameter without a gradient on some
  ranks counts as a zero gradient there (as DDP does); one without a gradient on every rank
  keeps ``None`` so the optimiser skips it, as in a single process;
* after each step all buffers (BatchNorm running statistics, including EMA teachers' own) are
  broadcast from rank 0, the same policy as ``DistributedDataParallel(broadcast_buffers=True)``:
  batch statistics inside a forward pass stay per rank (no SyncBatchNorm, which would change
  the maths of every method and has no CPU implementation), running statistics are rank 0's;
* since gradients, hence parameters, are identical on every rank, EMA teachers stay identical;
* logged losses are averaged over ranks; only rank 0 validates and writes checkpoints, logs
  and ``best.pt``. Checkpoints hold every rank's sampling and RNG state, so a resumed
  data-parallel run continues every rank's streams; resuming needs the same world size.

A W-rank run with global batch B is not bit-identical to a 1-rank run with batch B: per-rank
Dice terms and batch statistics are computed on B / W images, and the streams differ.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn

from knowsam.errors import KnowsamError

RANK_SEED_STRIDE = 100_000  # rank r samples with seed + r * stride: no overlap with any seed below it


@dataclass
class Context:
    """Where this process stands: rank, world size, device, and the objects it synchronises."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ---------------------------------------------------------------------------------
    def shard(self, batch_size: int, labeled_batch: int, uses_unlabeled: bool) -> tuple[int, int]:
        """This rank's (batch_size, labeled_batch); both parts of the global batch must split evenly."""
        if not self.enabled:
            return batch_size, labeled_batch
        w = self.world
        parts = {
            "train.labeled_batch": labeled_batch,
            "unlabeled (batch_size - labeled_batch)": batch_size - labeled_batch,
        }
        if not uses_unlabeled:
            parts = {"train.batch_size": batch_size}
        for name, n in parts.items():
            if n % w:
                raise KnowsamError(f"data-parallel run on {w} processes: {name} = {n} is not divisible by {w}", 2)
        return batch_size // w, labeled_batch // w

    def stream_seed(self, seed: int) -> int:
        """Seed of this rank's sampling streams: ``seed`` on rank 0, ``seed + rank * 100000`` elsewhere."""
        return seed + self.rank * RANK_SEED_STRIDE

    # --- model state ----------------------------------------------------------------------------
    def prepare(self, method: Any) -> None:
        """Broadcast rank 0's weights to every rank; make every optimiser average gradients first."""
        if not self.enabled:
            return
        self._modules = _found(method, nn.Module)
        _broadcast([t for m in self._modules for t in (*m.parameters(), *m.buffers())])
        for opt in _found(method, torch.optim.Optimizer):
            opt.register_step_pre_hook(self._average_gradients)

    def _average_gradients(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        params = _unique(p for group in opt.param_groups for p in group["params"])
        for ps in _by_kind(params).values():
            flags = torch.tensor([p.grad is not None for p in ps], dtype=ps[0].dtype, device=ps[0].device)
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps] + [flags]
            )
            tdist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            has = (flat[-len(ps) :] > 0).tolist()
            for p, present in zip(ps, has):
                chunk = flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
                if not present:
                    continue
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)

    def after_step(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.enabled:
            _broadcast([b for m in self._modules for b in m.buffers()])

    # --- bookkeeping ------------------------------------------------------------------------------
    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each logged value (every rank then sees the same numbers)."""
        if not self.enabled or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (world 1: ``[obj]``)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def own(self, state: dict) -> dict:
        """This rank's part ("stream", "rng") of a checkpoint written by :func:`gather` on rank 0."""
        if not self.enabled:
            return state
        ranks = state.get("ranks")
        if ranks is None or len(ranks) != self.world:
            raise KnowsamError(
                f"checkpoint was written by {len(ranks) if ranks else 1} process(es); "
                f"resume it with the same number, not {self.world}"
            )
        return ranks[self.rank]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


class NullLive:
    """What ranks other than 0 log to: nothing."""

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        pass

    def end(self) -> None:
        pass


def setup(device: torch.device) -> Context:
    """The process group of a ``torchrun`` launch (initialised once per process), else a 1-rank context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not tdist.is_initialized():
        return Context(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, init_method="env://")
        atexit.register(_destroy)
    return Context(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=local_rank, device=device)


def _destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _unique(items: Iterable) -> list:
    seen: dict[int, Any] = {}
    for item in items:
        seen.setdefault(id(item), item)
    return list(seen.values())


def _found(method: Any, kind: type) -> list:
    """Every ``kind`` instance a method holds: in ``nets``/``optimizers`` or as attributes (plug-ins)."""
    values = [
        *getattr(method, "nets", {}).values(),
        *getattr(method, "optimizers", {}).values(),
        *vars(method).values(),
    ]
    flat = [
        v
        for value in values
        for v in (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value])
    ]
    return _unique(v for v in flat if isinstance(v, kind))


def _by_kind(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


@torch.no_grad()
def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank: one flattened broadcast per dtype/device."""
    for ts in _by_kind(_unique(tensors)).values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        tdist.broadcast(flat, src=0)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()

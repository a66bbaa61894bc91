"""Training batches straight from the memory-mapped prepared arrays.

No DataLoader workers: a batch is a fancy-index into a memory map plus batched tensor
augmentation, which costs far less than a training step. Sampling state (one numpy
generator per stream plus the current epoch order) is part of the checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from knowsam.data.augment import WeakStrongAugment, weak_augment_with_geometry
from knowsam.data.batch import Batch
from knowsam.data.dataset import PreparedDataset, to_float
from knowsam.errors import KnowsamError


class EpochSampler:
    """Endless stream of indices: a fresh permutation each epoch, drawn from its own generator."""

    def __init__(self, indices: np.ndarray, seed: int):
        if len(indices) == 0:
            raise ValueError("cannot sample from an empty index set")
        self.indices = np.asarray(indices)
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.indices)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(self.indices), 0
            chunk = self.order[self.pos : self.pos + n]
            self.pos += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = np.asarray(state["order"])
        self.pos = int(state["pos"])


@dataclass
class BatchComposition:
    labeled: int
    unlabeled: int


AUGMENTATIONS = ("shared", "weak-strong")


class TrainStream:
    """Produces ``Batch`` objects for a method from a prepared dataset and a split.

    ``augmentation``: ``shared`` gives every row the shared weak augmentation (batched tensor
    ops); ``weak-strong`` is the official KnowSAM dataloader's, weak for labeled rows and strong
    for unlabeled rows (:class:`knowsam.data.augment.WeakStrongAugment`).

    ``teacher_embeddings`` (an (N, C, E, E) array over the training images, memory-mapped: the
    embed stage's cache) makes every batch carry its rows' embeddings and view geometry.

    ``label_pool`` and ``unlabeled_pool`` (``Method``'s attributes of those names) say which cases
    the labeled and the unlabeled rows are drawn from; "all" is every training case of the split.
    """

    def __init__(
        self,
        data: PreparedDataset,
        split: dict,
        *,
        label_pool: str,
        uses_unlabeled: bool,
        batch_size: int,
        labeled_batch: int,
        seed: int,
        device: torch.device,
        augmentation: str = "shared",
        teacher_embeddings: np.ndarray | None = None,
        unlabeled_pool: str = "unlabeled",
    ):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augmentation!r}; known: {', '.join(AUGMENTATIONS)}")
        index = data.index("train")
        rows = {case: np.flatnonzero(index["case"].to_numpy() == case) for case in index["case"].unique()}

        def rows_of(cases):
            return np.concatenate([rows[c] for c in cases]) if cases else np.zeros(0, dtype=np.int64)

        labeled = split["labeled"] + (split["unlabeled"] if label_pool == "all" else [])
        unlabeled = (split["labeled"] if unlabeled_pool == "all" else []) + split["unlabeled"]
        self.images, self.masks = data.images("train"), data.masks()
        self.device = device
        if uses_unlabeled:
            self.composition = BatchComposition(labeled_batch, batch_size - labeled_batch)
        else:
            self.composition = BatchComposition(batch_size, 0)
        if self.composition.unlabeled and not split["unlabeled"]:
            raise KnowsamError(
                f"the split at labeled ratio {split['ratio']:g} leaves no unlabeled image for a "
                "semi-supervised method; fully-supervised is the all-labels reference"
            )
        self.labeled = EpochSampler(rows_of(labeled), seed=seed * 1000 + 1)
        self.unlabeled = EpochSampler(rows_of(unlabeled), seed=seed * 1000 + 2) if self.composition.unlabeled else None
        self.aug_gen = torch.Generator().manual_seed(seed * 1000 + 3)
        self.weak_strong = (
            WeakStrongAugment(self.images.shape[-1], record_geometry=teacher_embeddings is not None)
            if augmentation == "weak-strong"
            else None
        )
        if teacher_embeddings is not None and len(teacher_embeddings) != len(self.images):
            raise KnowsamError(
                f"the teacher's embedding cache has {len(teacher_embeddings)} rows for "
                f"{len(self.images)} training images: re-run the embed stage"
            )
        self.teacher_embeddings = teacher_embeddings

    def _load(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(idx)  # memory maps read faster in file order; keep the sampled order below
        inverse = np.argsort(np.argsort(idx))
        x = torch.from_numpy(to_float(self.images[order])[inverse])
        y = torch.from_numpy(self.masks[order][inverse].astype(np.int64))
        return x, y

    def next_batch(self) -> Batch:
        rows_l = self.labeled.take(self.composition.labeled)
        x_l, y_l = self._load(rows_l)
        rows_u = self.unlabeled.take(self.composition.unlabeled) if self.unlabeled is not None else rows_l[:0]
        x_u = self._load(rows_u)[0] if len(rows_u) else x_l[:0]
        dev = self.device
        if self.weak_strong is not None:
            x_l, y_l, x_u = self.weak_strong(x_l, y_l, x_u, self.aug_gen)
            batch = Batch(x_l=x_l.to(dev), y_l=y_l.to(dev), x_u=x_u.to(dev))
            geometry = self.weak_strong.geometry
        else:
            n_l = len(x_l)
            x, y, geometry = weak_augment_with_geometry(
                torch.cat([x_l, x_u]), torch.cat([y_l, y_l[:0].new_zeros((len(x_u),) + y_l.shape[1:])]), self.aug_gen
            )
            batch = Batch(x_l=x[:n_l].to(dev), y_l=y[:n_l].to(dev), x_u=x[n_l:].to(dev))
        if self.teacher_embeddings is not None:
            rows = np.concatenate([rows_l, rows_u])
            order = np.argsort(rows, kind="stable")  # file order reads faster; rows may repeat
            emb = np.empty((len(rows), *self.teacher_embeddings.shape[1:]), self.teacher_embeddings.dtype)
            emb[order] = self.teacher_embeddings[rows[order]]
            batch.teacher_embeddings = torch.from_numpy(emb).to(dev)
            batch.geometry = geometry
        return batch

    def state_dict(self) -> dict:
        return {
            "labeled": self.labeled.state_dict(),
            "unlabeled": self.unlabeled.state_dict() if self.unlabeled else None,
            "aug": self.aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        if self.unlabeled is not None:
            self.unlabeled.load_state_dict(state["unlabeled"])
        self.aug_gen.set_state(state["aug"])

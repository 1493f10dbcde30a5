"""Batches sliced straight from in-memory uint8 tensors: no per-image Python, no worker processes; and the
one base of the LightningModules that train on them."""

from __future__ import annotations

from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from torch import Tensor


class TensorBatches:
    """An iterable of ``(images, labels, is_poison)`` batches over tensors held in memory.

    ``is_poison`` flags the samples an attack poisons (all False for a clean set), so training
    hooks can treat them apart (per-batch stamping, extra loss terms).

    Shuffles with its own seeded generator (re-seeded per epoch, so runs are reproducible),
    and shards by rank for multi-process training, as a DistributedSampler would.

    ``pairs`` (batch- and loss-level mixing, TrojanZoo §6.2 RQ6): the last ``len(pairs)`` samples
    are copies, the i-th made from sample ``pairs[i]``; only the others are shuffled into batches of
    ``batch_size``, and each batch then carries the copies of its samples after them, so every copy
    shares its batch with its source.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, is_poison: Tensor | None = None,
                 pairs: Tensor | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.is_poison = torch.zeros(len(labels), dtype=torch.bool) if is_poison is None else is_poison
        self.sources = len(labels) - (0 if pairs is None else len(pairs))  # samples batched by the order
        # copy_of[j]: the index of sample j's copy, -1 without one
        self.copy_of = torch.full((self.sources,), -1, dtype=torch.long)
        if pairs is not None:
            self.copy_of[pairs] = torch.arange(self.sources, len(labels))
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> Tensor:
        n = self.sources
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        per_rank = n // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        per_rank = self.sources // self.world_size
        return (per_rank + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._indices()
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            if self.sources < len(self.labels):
                copies = self.copy_of[index]
                index = torch.cat([index, copies[copies >= 0]])
            yield self.images[index], self.labels[index], self.is_poison[index]


class BatchedModule(pl.LightningModule):
    """The base of every LightningModule bdlab trains on in-memory :class:`TensorBatches` (the victim
    module, an attack's encoder or trigger network, a defense's helper): owns ``train_batches`` and
    hands each rank its shard under DDP."""

    def __init__(self, train_batches: TensorBatches) -> None:
        super().__init__()
        self.train_batches = train_batches

    def train_dataloader(self) -> TensorBatches:
        # called after the strategy is set up, so the rank is known here
        self.train_batches.shard(self.global_rank, self.trainer.world_size)
        return self.train_batches

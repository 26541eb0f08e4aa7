"""Which dataset items each process reads at each step: a pure function of position.

The data is an endless stream of epochs, each a seeded permutation of the dataset.
A run's data position is how many items all processes together have consumed, so
resuming at a position reproduces the very same batches (no sampler state to save), and
every item of an epoch is seen once before any is seen twice (no drop_last waste).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class StreamBatchSampler:
    """Yields lists of stream positions for one process, from ``position`` onwards
    (``PositionedDataset`` turns a position into its epoch and dataset index).

    Global batch g covers stream positions [g * B * W, (g + 1) * B * W) where B is the
    per-process batch size and W the number of processes; process r takes the r-th slice.
    """

    def __init__(self, num_items: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, position: int = 0) -> None:
        if num_items < 1:
            raise ValueError(f"the dataset is empty (num_items={num_items}); there is nothing to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if position % (batch_size * world_size):
            raise ValueError(
                f"position {position} is not a multiple of the global batch {batch_size} x {world_size}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=g), epoch
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        start = self.position
        while True:
            first = start + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))
            start += global_batch

    def indices(self, positions: list[int]) -> list[int]:
        return [self.index_at(p) for p in positions]


class PositionedDataset(torch.utils.data.Dataset):
    """Reads the dataset item at a stream position, telling the dataset its epoch first.

    Datasets with ``set_epoch`` (CaptionedImageDataset, and LatentCache through its
    ``dataset``) then draw their augmentations from (seed, epoch, index) alone, which is
    what makes a resumed run see the very same crops and flips.
    """

    def __init__(self, dataset: Any, *, num_items: int, seed: int) -> None:
        self.dataset = dataset
        self.order = StreamBatchSampler(num_items, batch_size=1, seed=seed)
        base = getattr(dataset, "dataset", dataset)
        self._epoch_holder = base if hasattr(base, "set_epoch") else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> Any:
        epoch = position // self.order.num_items
        if self._epoch_holder is not None and self._epoch_holder.epoch != epoch:
            self._epoch_holder.set_epoch(epoch)
        return self.dataset[self.order.index_at(position)]

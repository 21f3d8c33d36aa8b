"""A distributed sampler whose position inside an epoch can be saved and restored exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that starts part-way into an epoch's permutation without reading skipped data.

    The epoch's order is a seeded permutation of the whole dataset (the same for every world size).
    Position ``p`` counts sequences already consumed by *all* ranks; rank ``r`` takes permutation entries
    ``p + r, p + r + W, ...``, so a run resumed with another world size continues with exactly the
    sequences not yet seen. Only whole optimizer steps are yielded (the tail that cannot fill
    ``global_batch_size`` is left for the next epoch's permutation).

    Args:
        dataset: map-style dataset.
        num_replicas: world size.
        rank: this rank.
        global_batch_size: sequences per optimizer step over all ranks.
        shuffle: permute each epoch (seeded) or keep dataset order.
        seed: permutation seed (plus the epoch number).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        global_batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.global_batch_size = global_batch_size
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Select the epoch and how many of its sequences all ranks together already consumed."""
        self.set_epoch(epoch)
        self.start = start

    def _usable(self) -> int:
        return len(self.dataset) // self.global_batch_size * self.global_batch_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()  # type: ignore[arg-type]
        else:
            order = list(range(len(self.dataset)))  # type: ignore[arg-type]
        return iter(order[self.start + self.rank : self._usable() : self.num_replicas])

    def __len__(self) -> int:
        return max(0, self._usable() - self.start) // self.num_replicas

"""Deterministic sampling: the order of an epoch and the augmentation of each sample are pure
functions of (seed, epoch, index). A run resumed at any epoch, with any number of (persistent)
workers, sees exactly the images and augmentations an uninterrupted run sees.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value + 0x9E3779B97F4A7C15 + (state << 6) + (state >> 2))) & 0xFFFFFFFFFFFFFFFF
        state = (state * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a seeded permutation per epoch, optionally one shard of it.

    Args:
        length: dataset size.
        seed: base seed.
        shuffle: permute each epoch (training) or keep the order (evaluation).
        drop_last: round the epoch down to whole batches of `batch_size` (per shard).
        rank, world_size: this process's shard for distributed training (every world_size-th key).
    """

    def __init__(self, length: int, seed: int, *, shuffle: bool = True, batch_size: int = 1,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.batch_size, self.drop_last = batch_size, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        return torch.randperm(self.length, generator=generator).tolist()

    def __len__(self) -> int:
        per_rank = self.length // self.world_size
        if self.drop_last and per_rank >= self.batch_size:
            return per_rank - per_rank % self.batch_size
        return per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self._indices()[self.rank::self.world_size][: len(self)]
        return iter((self.epoch, index) for index in indices)


class SeededDataset(Dataset):
    """Wraps a dataset so that sample (epoch, index) is transformed under its own RNG seed."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # fork_rng restores the caller's RNG afterwards: the main process (num_workers=0) keeps its stream.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_mix(self.seed, epoch, index))  # CPU only: no CUDA init
            return self.dataset[index]

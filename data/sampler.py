"""Deterministic, resumable sampling: the same (seed, epoch) gives the same samples and augmentations.

Exact resume needs two things that torch's samplers do not give together: an order that depends only on
(seed, epoch) and can start part-way through an epoch, and augmentation randomness that does not depend
on which worker process happens to load a sample. `ResumableSampler` yields `(index, sample_seed)` pairs
and `SeededSamples` re-seeds the albumentations pipeline from `sample_seed` before each sample, so a run
stopped after k steps and resumed sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _derive_seed(*entropy: int) -> int:
    """A 63-bit seed from non-negative integers, well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> np.uint64(1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch`, independent of worker count and batch layout."""
    return _derive_seed(seed, epoch, index + 1)


def order_seed(seed: int, epoch: int) -> int:
    """The seed of the sample order of `epoch` (entropy slot 0 is never used by a sample)."""
    return _derive_seed(seed, epoch, 0)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled (or ordered) indices for one rank of `world_size`, like DistributedSampler, but resumable.

    `set_epoch(epoch, skip_batches)` must be called before each epoch; `skip_batches` drops the first
    batches of this rank's share, for resuming part-way through an epoch.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.skip_batches = 0
        # Every rank gets the same number of samples so DDP steps stay in lockstep: without drop_last the
        # order is padded by repetition; with it, the remainder is left out like any incomplete batch, so
        # no sample is on two ranks at once.
        self.samples_per_rank = (dataset_size // world_size if drop_last
                                 else math.ceil(dataset_size / world_size))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.samples_per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        indices = order[self.rank : total : self.world_size]
        if self.drop_last:
            indices = indices[: self.batches_per_epoch() * self.batch_size]
        return indices[self.skip_batches * self.batch_size :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._rank_indices():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(self._rank_indices())


class SeededSamples(Dataset):
    """Wraps a dataset whose `transform` is an albumentations Compose; items are `(index, sample_seed)`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            # One shared stream for the whole pipeline: per-transform seeds would correlate their draws.
            transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.dataset[index]

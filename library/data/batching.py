"""The order of training batches: one bucket per batch, seeded by (seed, epoch), resumable.

A *sample* is one appearance of an image in an epoch (an image with ``num_repeats`` 10 gives ten
samples). :func:`plan_epoch` groups samples by bucket, shuffles each group, cuts it into batches
(the last one of a bucket may be short, as sd-scripts keeps it) and shuffles the batch order.
The plan depends only on (seed, epoch) and the inputs, so a resumed run rebuilds the same plan and
continues at the batch index stored in its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np


@dataclass(frozen=True)
class Batch:
    bucket: Hashable  # e.g. (width, height)
    samples: tuple[int, ...]  # sample indices


def expand_repeats(repeats: Sequence[int]) -> list[int]:
    """Sample -> record index: record i appears ``repeats[i]`` times."""
    return [i for i, n in enumerate(repeats) for _ in range(n)]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF])


def plan_epoch(buckets: Sequence[Hashable], batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """Batches of sample indices for one epoch; ``buckets[i]`` is sample i's bucket key."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = _rng(seed, epoch)
    groups: dict[Hashable, list[int]] = {}
    for sample, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(sample)
    batches: list[Batch] = []
    for bucket in sorted(groups, key=repr):  # a fixed order before shuffling keeps plans reproducible
        members = [groups[bucket][i] for i in rng.permutation(len(groups[bucket]))]
        batches.extend(Batch(bucket, tuple(members[s:s + batch_size])) for s in range(0, len(members), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def shard(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """This rank's batches (``rank::world_size``), cut to the same count on every rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = len(batches) // world_size
    return list(batches[rank::world_size][:per_rank])


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in the data: the epoch and the number of batches of it already consumed."""

    epoch: int = 0
    batch_index: int = 0

    def advance(self, batches_in_epoch: int) -> "DataPosition":
        if self.batch_index + 1 >= batches_in_epoch:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, self.batch_index + 1)

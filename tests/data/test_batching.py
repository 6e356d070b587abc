"""Batch planning: one bucket per batch, every sample once per epoch, seeded, resumable, sharded."""

from __future__ import annotations

from collections import Counter

import pytest

from library.data.batching import DataPosition, expand_repeats, plan_epoch, shard


def _buckets(n: int = 103):
    keys = [(512, 512), (640, 384), (384, 640)]
    return [keys[i % 3] if i % 7 else (768, 256) for i in range(n)]


def test_every_sample_once_and_one_bucket_per_batch():
    buckets = _buckets()
    plan = plan_epoch(buckets, batch_size=4, seed=1, epoch=0)
    seen = [s for b in plan for s in b.samples]
    assert sorted(seen) == list(range(len(buckets)))
    for batch in plan:
        assert {buckets[s] for s in batch.samples} == {batch.bucket}
        assert 1 <= len(batch.samples) <= 4
    per_bucket = Counter(buckets)
    shorts = Counter(b.bucket for b in plan if len(b.samples) < 4)
    assert all(shorts[k] == (1 if per_bucket[k] % 4 else 0) for k in per_bucket)


def test_seeded_by_seed_and_epoch():
    buckets = _buckets()
    a = plan_epoch(buckets, 4, seed=1, epoch=0)
    assert a == plan_epoch(buckets, 4, seed=1, epoch=0)
    assert a != plan_epoch(buckets, 4, seed=1, epoch=1)
    assert a != plan_epoch(buckets, 4, seed=2, epoch=0)


def test_repeats_and_resume_position():
    assert expand_repeats([2, 0, 3]) == [0, 0, 2, 2, 2]
    pos = DataPosition()
    for _ in range(5):
        pos = pos.advance(batches_in_epoch=3)
    assert pos == DataPosition(epoch=1, batch_index=2)
    assert pos.advance(3) == DataPosition(2, 0)


def test_shards_are_disjoint_and_equal_length():
    plan = plan_epoch(_buckets(), 2, seed=0, epoch=0)
    parts = [shard(plan, r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(plan) // 2
    s0 = {s for b in parts[0] for s in b.samples}
    s1 = {s for b in parts[1] for s in b.samples}
    assert not s0 & s1
    with pytest.raises(ValueError):
        shard(plan, 2, 2)
    with pytest.raises(ValueError):
        plan_epoch([(1, 1)], 0, 0, 0)

"""Buckets: sd-scripts' generation rule (literal tables), least-aspect-error selection, no_upscale."""

from __future__ import annotations

import random

import pytest

from library.data.buckets import (
    BucketError,
    adjust_min_max_bucket_reso,
    aspect_error,
    assign_buckets,
    make_bucket_resolutions,
    no_upscale_bucket,
    select_bucket,
)
from library.data.spec import BucketOptions
from library.errors import UserError

# Base 512x512, min 256, max 1280, steps 64: max_area = 262144, square (512, 512).
# Hand checks of h = min(1280, (262144 // w) // 64 * 64):
#   w=256: 262144 // 256 = 1024 -> 1024            w=320: 819 -> 12*64 = 768
#   w=384: 682 -> 640    w=448: 585 -> 576         w=704: 372 -> 320 (so (320, 704) too)
#   w=832: 315 -> 256    w=960: 273 -> 256         w=1088: 240 -> 192 < 256, dropped (and beyond)
TABLE_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024),
    (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320),
    (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip

# Base 1024x1024, min 256, max 1280, steps 64: max_area = 1048576, square (1024, 1024).
#   w=256..768: (1048576 // w) // 64 * 64 >= 1344 -> capped at max_size 1280
#   w=768: 1365 -> 1344 -> 1280     w=832: 1260 -> 1216     w=896: 1170 -> 1152
#   w=960: 1092 -> 1088             w=1088: 963 -> 960      w=1280: 819 -> 768
TABLE_1024 = [
    (256, 1280), (320, 1280), (384, 1280), (448, 1280), (512, 1280),
    (576, 1280), (640, 1280), (704, 1280), (768, 1280),
    (832, 1216), (896, 1152), (960, 1088),
    (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832),
    (1280, 256), (1280, 320), (1280, 384), (1280, 448), (1280, 512),
    (1280, 576), (1280, 640), (1280, 704), (1280, 768),
]  # fmt: skip


@pytest.mark.parametrize("base, table", [(512, TABLE_512), (1024, TABLE_1024)], ids=["512", "1024"])
def test_generated_lists_equal_sd_scripts_rule(base, table):
    assert make_bucket_resolutions((base, base), 256, 1280, 64) == table


@pytest.mark.parametrize(
    "reso, lo, hi, steps",
    [
        ((512, 512), 256, 1280, 64),
        ((1024, 1024), 256, 1280, 64),
        ((1024, 768), 256, 2048, 32),
        ((768, 1344), 320, 1536, 16),
    ],
)
def test_buckets_are_multiples_within_area_and_sorted(reso, lo, hi, steps):
    buckets = make_bucket_resolutions(reso, lo, hi, steps)
    max_area = reso[0] * reso[1]
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % steps == 0 and h % steps == 0 and w % 16 == 0 and h % 16 == 0
        assert w * h <= max_area
        assert (h, w) in buckets  # symmetric
    square = [b for b in buckets if b[0] == b[1]]
    assert len(square) == 1


@pytest.mark.parametrize("steps", [0, 8, 24, 40, 65, -64])
def test_steps_not_multiple_of_16_rejected(steps):
    with pytest.raises(ValueError, match="multiple of 16"):
        make_bucket_resolutions((512, 512), 256, 1024, steps)
    with pytest.raises(UserError):
        no_upscale_bucket(600, 400, 512 * 512, steps)


@pytest.mark.parametrize("steps", [16, 32, 48])
def test_steps_multiple_of_16_accepted(steps):
    assert make_bucket_resolutions((512, 512), 256, 1024, steps)


def test_every_image_maps_to_least_aspect_error():
    rng = random.Random(0)
    buckets = TABLE_1024
    for _ in range(2000):
        w, h = rng.randint(16, 5000), rng.randint(16, 5000)
        chosen = select_bucket(w, h, buckets)
        best = min(aspect_error(b, w, h) for b in buckets)
        assert aspect_error(chosen, w, h) == best
        assert chosen == next(b for b in buckets if aspect_error(b, w, h) == best)  # first on ties


def test_select_examples_and_rules():
    assert select_bucket(1000, 1000, TABLE_1024) == (1024, 1024)
    assert select_bucket(2000, 1000, TABLE_1024) == (1280, 640)  # exact 2:1
    assert select_bucket(5000, 100, TABLE_1024) == (1280, 256)  # most extreme
    assert select_bucket(832, 1216, TABLE_1024) == (832, 1216)  # exact size match
    # tie: |0.5 - 1| == |1.5 - 1| -> the first bucket in list order wins
    assert select_bucket(100, 100, [(64, 128), (96, 64)]) == (64, 128)
    assert select_bucket(100, 100, [(96, 64), (64, 128)]) == (96, 64)


def test_no_upscale_never_enlarges_and_fits_area():
    rng = random.Random(1)
    for max_area, steps in ((512 * 512, 64), (1024 * 1024, 64), (1024 * 768, 16)):
        for _ in range(3000):
            w, h = rng.randint(64, 6000), rng.randint(64, 6000)
            try:
                bw, bh = no_upscale_bucket(w, h, max_area, steps)
            except BucketError:  # too thin: the short side scaled to the area is under one step
                assert min(w, h) * min(1.0, (max_area / (w * h)) ** 0.5) < 1.5 * steps
                continue
            assert 0 < bw <= w and 0 < bh <= h
            assert bw % steps == 0 and bh % steps == 0
            assert bw * bh <= max_area


def test_no_upscale_examples():
    # fits the area: own size rounded down, 500x300 -> 448x256
    assert no_upscale_bucket(500, 300, 512 * 512, 64) == (448, 256)
    assert no_upscale_bucket(512, 512, 512 * 512, 64) == (512, 512)
    # too big: 2000x1000 at area 1024^2 -> scaled 1448.2x724.1, rounded: (1408, 704) both ways,
    # equal aspect errors -> the height variant: (int(704*2 + .5), 704) = (1408, 704)
    assert no_upscale_bucket(2000, 1000, 1024 * 1024, 64) == (1408, 704)
    # sd-scripts' rounding would give 928x848 = 786944 > 786432 here; one step comes off
    bw, bh = no_upscale_bucket(1930, 1763, 1024 * 768, 16)
    assert bw * bh <= 1024 * 768 and (bw, bh) in ((912, 848), (928, 832))
    with pytest.raises(UserError, match="too small"):
        no_upscale_bucket(40, 300, 512 * 512, 64)


def test_assign_without_bucketing_uses_base_resolution():
    sizes = [(300, 200), (1000, 3000), (512, 512)]
    chosen, buckets = assign_buckets(sizes, BucketOptions(enable_bucket=False), (512, 768))
    assert chosen == [(512, 768)] * 3 and buckets == [(512, 768)]
    with pytest.raises(UserError, match="multiple of 16"):
        assign_buckets(sizes, BucketOptions(enable_bucket=False), (500, 512))


def test_assign_with_buckets():
    sizes = [(2000, 1000), (1000, 2000), (1024, 1024), (3000, 1000), (900, 1000)]
    options = BucketOptions(enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1280, bucket_reso_steps=64)
    chosen, buckets = assign_buckets(sizes, options, (1024, 1024))
    assert chosen == [select_bucket(w, h, TABLE_1024) for w, h in sizes]
    assert buckets == sorted(set(chosen))


def test_assign_no_upscale():
    sizes = [(500, 300), (2000, 1000), (64, 64)]
    options = BucketOptions(enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=64)
    chosen, buckets = assign_buckets(sizes, options, (1024, 1024))
    assert chosen == [(448, 256), (1408, 704), (64, 64)]
    assert buckets == [(64, 64), (448, 256), (1408, 704)]


def test_min_max_are_adjusted_and_checked():
    assert adjust_min_max_bucket_reso((512, 512), 250, 1000, 64) == (192, 1024)
    assert adjust_min_max_bucket_reso((512, 512), 256, 1024, 64) == (256, 1024)
    with pytest.raises(UserError, match="min_bucket_reso"):
        adjust_min_max_bucket_reso((512, 512), 640, 1024, 64)
    with pytest.raises(UserError, match="max_bucket_reso"):
        adjust_min_max_bucket_reso((1024, 1024), 256, 768, 64)

"""TrainingData: records + buckets + caches -> seeded batches; caches feed batches correctly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults
from library.data.dataset import CacheOptions, TrainingData
from library.data.latent_cache import encode_missing_latents
from library.data.te_cache import encode_missing_te

SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (64, 64)]


def _draw(path: Path, size, seed: int, alpha: bool = False) -> None:
    mode = "RGBA" if alpha else "RGB"
    image = Image.new(mode, size, (255, 255, 255, 255) if alpha else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=((seed * 40) % 255, 80, 200, 255 if alpha else None)[: 4 if alpha else 3])
    image.save(path)


@pytest.fixture()
def folder(tmp_path):
    train = tmp_path / "train" / "2_shapes"
    train.mkdir(parents=True)
    for i, size in enumerate(SIZES):
        _draw(train / f"img{i}.png", size, i)
        (train / f"img{i}.caption").write_text(f"shape, circle, color{i}, big, round ||| tag{i}")
    reg = tmp_path / "reg" / "1_shapes"
    reg.mkdir(parents=True)
    for i in range(3):
        _draw(reg / f"reg{i}.png", (64, 64), 10 + i)
    return tmp_path


def _defaults(folder: Path, **changes) -> DatasetDefaults:
    base = DatasetDefaults(train_data_dir=folder / "train", reg_data_dir=folder / "reg", resolution=(64, 64),
                           train_batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                           bucket_reso_steps=16, prior_loss_weight=0.5)
    return replace(base, **changes)


def fake_encode(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the VAE: 8x average pool, 3 -> 16 channels."""
    pooled = F.avg_pool2d(images, 8)  # (B, 3, H/8, W/8)
    return torch.cat([pooled * (k + 1) for k in range(6)], dim=1)[:, :16]


def test_batches_cover_samples_with_repeats_and_reg(folder):
    data = TrainingData(blueprint_from_defaults(_defaults(folder)), seed=3)
    assert len(data.samples) == 2 * len(SIZES) + 12  # repeats 2, reg balanced to the train count
    batches = data.epoch_batches(0)
    assert sorted(s for b in batches for s in b.samples) == list(range(len(data.samples)))
    assert data.epoch_batches(0) == batches and data.epoch_batches(1) != batches
    batch = batches[0]
    loaded = data.load_batch(batch, epoch=0)
    w, h = batch.bucket[1]
    assert loaded.images.shape == (len(batch.samples), 3, h, w) and loaded.latents is None
    assert loaded.images.min() >= -1 and loaded.images.max() <= 1
    reg = [data.records[data.samples[s].record].is_reg for s in batch.samples]
    assert loaded.loss_weights.tolist() == [0.5 if r else 1.0 for r in reg]


def test_load_batch_is_deterministic_per_epoch(folder):
    defaults = _defaults(folder, shuffle_caption=True, keep_tokens_separator="|||", flip_aug=True)
    data = TrainingData(blueprint_from_defaults(defaults), seed=1)
    batch = data.epoch_batches(2)[1]
    a, b = data.load_batch(batch, 2), data.load_batch(batch, 2)
    assert a.captions == b.captions and torch.equal(a.images, b.images)
    assert all(c.startswith("shape, ") or c.startswith("circle") or c for c in a.captions)


def test_latent_cache_feeds_batches(folder):
    defaults = _defaults(folder, flip_aug=True)
    cache = CacheOptions(cache_latents=True, vae_identity="fake-vae")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    summary = encode_missing_latents(data.latent_cache_items(), fake_encode, data.load_for_cache, batch_size=4, progress=False)
    assert summary.encoded == len(data.records) and not summary.failed
    again = encode_missing_latents(data.latent_cache_items(), fake_encode, data.load_for_cache, batch_size=4, progress=False)
    assert again.encoded == 0 and again.reused == len(data.records)
    batch = data.epoch_batches(0)[0]
    loaded = data.load_batch(batch, 0)
    w, h = batch.bucket[1]
    assert loaded.images is None and loaded.latents.shape == (len(batch.samples), 16, h // 8, w // 8)
    uncached = TrainingData(blueprint_from_defaults(defaults), CacheOptions(), seed=0).load_batch(batch, 0)
    assert torch.allclose(loaded.latents, fake_encode(uncached.images), atol=1e-5)  # same flips, same pixels


def _fake_text(captions):
    out = []
    for c in captions:
        v = float(sum(map(ord, c)) % 97)
        out.append({"clip_l": torch.full((77, 4), v), "clip_l_pooled": torch.full((4,), v),
                    "clip_g": torch.full((77, 6), v), "clip_g_pooled": torch.full((6,), v), "t5": torch.full((8, 12), v),
                    "clip_l_mask": torch.ones(77, dtype=torch.int64), "clip_g_mask": torch.ones(77, dtype=torch.int64),
                    "t5_mask": torch.ones(8, dtype=torch.int64)})
    return out


def test_cached_text_variants_vary_across_epochs(folder):
    defaults = _defaults(folder, shuffle_caption=True, caption_tag_dropout_rate=0.15, keep_tokens_separator="|||",
                         reg_data_dir=None)
    cache = CacheOptions(cache_text_encoder_outputs=True, t5_max_length=8, encoder_identity="fake")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    summary = encode_missing_te(data.te_cache_items(), _fake_text, batch_size=16, progress=False)
    assert summary.encoded == len(data.records)
    seen: dict[str, set[str]] = {}
    for epoch in range(4):
        for batch in data.epoch_batches(epoch):
            loaded = data.load_batch(batch, epoch)
            assert loaded.text["clip_l"].shape == (len(batch.samples), 77, 4)
            for path, caption in zip(loaded.paths, loaded.captions):
                seen.setdefault(path, set()).add(caption)
    assert all(len(v) > 1 for v in seen.values())
    assert all(c.startswith("shape") for v in seen.values() for c in v)


def test_caption_edit_invalidates_only_that_te_cache(folder):
    defaults = _defaults(folder, reg_data_dir=None)
    cache = CacheOptions(cache_text_encoder_outputs=True, t5_max_length=8, encoder_identity="fake")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    encode_missing_te(data.te_cache_items(), _fake_text, batch_size=16, progress=False)
    (folder / "train" / "2_shapes" / "img3.caption").write_text("a square")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    summary = encode_missing_te(data.te_cache_items(), _fake_text, batch_size=16, progress=False)
    assert summary.encoded == 1 and summary.reused == len(data.records) - 1


def test_keep_in_memory_reads_each_cache_once(folder):
    cache = CacheOptions(cache_latents=True, vae_identity="fake-vae", keep_in_memory=True)
    data = TrainingData(blueprint_from_defaults(_defaults(folder)), cache, seed=0)
    encode_missing_latents(data.latent_cache_items(), fake_encode, data.load_for_cache, batch_size=4, progress=False)
    first = [data.load_batch(b, 0).latents for b in data.epoch_batches(0)]
    for npz in folder.rglob("*_sd3.npz"):
        npz.unlink()  # from now on only memory can answer
    again = [data.load_batch(b, 0).latents for b in data.epoch_batches(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))

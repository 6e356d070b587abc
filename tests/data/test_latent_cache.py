"""Latent caches: sd-scripts layout, provenance records, atomic writes, and the encode orchestration."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from library.data import cache_io
from library.data.latent_cache import (
    LatentCacheItem,
    encode_missing_latents,
    is_latent_cache_valid,
    latent_cache_path,
    latent_cache_record,
    read_latent_cache,
    write_latent_cache,
)
from library.errors import UserError

BUCKET = (64, 48)  # (W, H) pixels -> latents (16, 6, 8), key suffix "_6x8"
VAE = "vae-sha256:abc/fp32"


def fake_load(source: Path) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor | None]:
    """A deterministic image per file name; files named 'broken*' fail like unreadable images."""
    if source.name.startswith("broken"):
        raise UserError(f"cannot open {source.name}")
    seed = sum(source.read_bytes()) + len(source.name)
    gen = torch.Generator().manual_seed(seed)
    width, height = BUCKET
    image = torch.rand(3, height, width, generator=gen) * 2 - 1
    alpha = torch.rand(height, width, generator=gen)
    return image, [width * 2, height * 2], [0, 0, width, height], alpha


class FakeVae:
    """encode(images (B, 3, H, W)) -> (B, 16, H/8, W/8): 8x8 mean pool and a fixed channel map."""

    def __init__(self) -> None:
        self.weight = torch.linspace(-1, 1, 16 * 3).reshape(16, 3)
        self.encoded = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, H/8, W/8)
        return torch.einsum("oc,bchw->bohw", self.weight, pooled)


def make_images(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for index, name in enumerate(names):
        path = folder / name
        path.write_bytes(bytes([index + 1]) * (10 + index))
        paths.append(path)
    return paths


def make_items(paths: list[Path], *, flip: bool = False, vae: str = VAE, check: str = "mtime", alpha: bool = False):
    return [
        LatentCacheItem(
            latent_cache_path(path, BUCKET),
            BUCKET,
            latent_cache_record(path, BUCKET, vae_identity=vae, flip=flip, alpha_mask=alpha, check=check),
            path,
        )
        for path in paths
    ]


def test_path_and_round_trip(tmp_path):
    image = make_images(tmp_path, ["cat.png"])[0]
    path = latent_cache_path(image, BUCKET)
    assert path.name == "cat_0064x0048_sd3.npz"
    record = latent_cache_record(image, BUCKET, vae_identity=VAE, flip=True, alpha_mask=True)
    latents, flipped = torch.randn(16, 6, 8), torch.randn(16, 6, 8)
    alpha = torch.rand(48, 64)
    write_latent_cache(path, BUCKET, latents, (128, 96), (1, 2, 3, 4), record, flipped=flipped, alpha_mask=alpha)
    assert is_latent_cache_valid(path, record, deep=True) == (True, "")
    with np.load(path) as npz:
        assert npz["latents_6x8"].dtype == np.float32 and npz["latents_6x8"].shape == (16, 6, 8)
        assert npz["alpha_mask_6x8"].shape == (48, 64)
        assert npz["original_size_6x8"].tolist() == [128, 96]
    out = read_latent_cache(path, BUCKET)
    assert torch.equal(out["latents"], latents) and torch.equal(out["alpha_mask"], alpha)
    assert out["original_size"].tolist() == [128, 96] and out["crop_ltrb"].tolist() == [1, 2, 3, 4]
    out = read_latent_cache(path, BUCKET, flipped=True)
    assert torch.equal(out["latents"], flipped) and torch.equal(out["alpha_mask"], alpha.flip(-1))


def test_encode_once_then_reuse(tmp_path):
    paths = make_images(tmp_path, ["a.png", "b.png", "c.png"])
    vae = FakeVae()
    summary = encode_missing_latents(make_items(paths), vae, fake_load, batch_size=2)
    assert (summary.encoded, summary.reused, summary.failed) == (3, 0, {})
    for path in paths:
        image = fake_load(path)[0]
        cached = read_latent_cache(latent_cache_path(path, BUCKET), BUCKET)["latents"]
        assert torch.equal(cached, vae(image[None])[0])
    vae.encoded = 0
    summary = encode_missing_latents(make_items(paths), vae, fake_load, batch_size=2)
    assert (summary.encoded, summary.reused, vae.encoded) == (0, 3, 0)


def test_touched_image_reencodes_only_that_item(tmp_path):
    paths = make_images(tmp_path, ["a.png", "b.png", "c.png"])
    encode_missing_latents(make_items(paths), FakeVae(), fake_load, batch_size=4)
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    vae = FakeVae()
    summary = encode_missing_latents(make_items(paths), vae, fake_load, batch_size=4)
    assert (summary.encoded, summary.reused, vae.encoded) == (1, 2, 1)
    assert list(summary.rebuilt_reasons) == [str(latent_cache_path(paths[1], BUCKET))]
    assert "image" in summary.rebuilt_reasons[str(latent_cache_path(paths[1], BUCKET))]


def test_hash_check_survives_touch_but_not_an_edit(tmp_path):
    paths = make_images(tmp_path, ["a.png", "b.png"])
    encode_missing_latents(make_items(paths, check="hash"), FakeVae(), fake_load, batch_size=4)
    os.utime(paths[0], ns=(1, 1))
    paths[1].write_bytes(b"edited!!!!!!")
    summary = encode_missing_latents(make_items(paths, check="hash"), FakeVae(), fake_load, batch_size=4)
    assert (summary.encoded, summary.reused) == (1, 1)
    assert list(summary.rebuilt_reasons) == [str(latent_cache_path(paths[1], BUCKET))]


def test_flip_aug_or_vae_change_reencodes_just_that_item(tmp_path):
    paths = make_images(tmp_path, ["a.png", "b.png", "c.png"])
    encode_missing_latents(make_items(paths), FakeVae(), fake_load, batch_size=4)
    items = make_items(paths[:1], flip=True) + make_items(paths[1:2], vae="other-vae") + make_items(paths[2:])
    vae = FakeVae()
    summary = encode_missing_latents(items, vae, fake_load, batch_size=4)
    assert (summary.encoded, summary.reused) == (2, 1)
    assert vae.encoded == 3  # a.png twice (plain + flipped), b.png once
    reasons = summary.rebuilt_reasons
    assert "flip" in reasons[str(items[0].npz_path)] and "vae" in reasons[str(items[1].npz_path)]
    flipped = read_latent_cache(items[0].npz_path, BUCKET, flipped=True)["latents"]
    assert torch.equal(flipped, FakeVae()(fake_load(paths[0])[0].flip(-1)[None])[0])


def sd_scripts_file(path: Path, latents: np.ndarray) -> None:
    """The layout sd-scripts' Sd3LatentsCachingStrategy writes (multi-resolution key suffix, no record)."""
    np.savez(
        path,
        latents_6x8=latents,
        original_size_6x8=np.array([640, 480]),
        crop_ltrb_6x8=np.array([0, 0, 64, 48]),
        latents_flipped_6x8=latents[..., ::-1].copy(),
    )


def test_sd_scripts_file_is_read_and_trusted_only_on_request(tmp_path):
    image = make_images(tmp_path, ["a.png"])[0]
    path = latent_cache_path(image, BUCKET)
    latents = np.random.default_rng(0).standard_normal((16, 6, 8)).astype(np.float32)
    sd_scripts_file(path, latents)
    out = read_latent_cache(path, BUCKET, flipped=False)
    assert torch.equal(out["latents"], torch.from_numpy(latents))
    assert out["original_size"].tolist() == [640, 480] and "alpha_mask" not in out
    item = make_items([image], flip=True)[0]
    assert is_latent_cache_valid(path, item.record, trust_foreign=True) == (True, "")
    valid, reason = is_latent_cache_valid(path, item.record)
    assert not valid and "provenance" in reason
    alpha_record = latent_cache_record(image, BUCKET, vae_identity=VAE, alpha_mask=True)
    assert not is_latent_cache_valid(path, alpha_record, trust_foreign=True)[0]  # sd-scripts' key check
    summary = encode_missing_latents([item], FakeVae(), fake_load, batch_size=1, trust_foreign=True)
    assert (summary.encoded, summary.reused) == (0, 1)
    summary = encode_missing_latents([item], FakeVae(), fake_load, batch_size=1)
    assert summary.encoded == 1 and is_latent_cache_valid(path, item.record) == (True, "")


def test_truncated_npz_is_detected_and_rebuilt_with_a_warning(tmp_path, caplog):
    paths = make_images(tmp_path, ["a.png", "b.png"])
    items = make_items(paths)
    encode_missing_latents(items, FakeVae(), fake_load, batch_size=2)
    data = items[0].npz_path.read_bytes()
    items[0].npz_path.write_bytes(data[: len(data) // 2])
    valid, reason = is_latent_cache_valid(items[0].npz_path, items[0].record)
    assert not valid and reason.startswith("unreadable")
    with caplog.at_level(logging.WARNING, logger="library.data.latent_cache"):
        summary = encode_missing_latents(items, FakeVae(), fake_load, batch_size=2)
    assert (summary.encoded, summary.reused) == (1, 1)
    assert any("rebuilding" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert is_latent_cache_valid(items[0].npz_path, items[0].record, deep=True) == (True, "")
    with pytest.raises(UserError):
        items[1].npz_path.write_bytes(b"not a zip")
        read_latent_cache(items[1].npz_path, BUCKET)


def test_multi_resolution_keys_are_preserved(tmp_path):
    image = make_images(tmp_path, ["a.png"])[0]
    path = tmp_path / "shared.npz"
    other = (32, 32)
    record_a = latent_cache_record(image, BUCKET, vae_identity=VAE)
    record_b = latent_cache_record(image, other, vae_identity=VAE, flip=True)
    lat_a, lat_b = torch.randn(16, 6, 8), torch.randn(16, 4, 4)
    write_latent_cache(path, BUCKET, lat_a, (64, 48), (0, 0, 64, 48), record_a, flipped=torch.randn(16, 6, 8))
    write_latent_cache(path, other, lat_b, (64, 48), (0, 0, 32, 32), record_b, flipped=lat_b.flip(-1))
    new_a = torch.randn(16, 6, 8)
    write_latent_cache(path, BUCKET, new_a, (64, 48), (0, 0, 64, 48), record_a)  # no flip: old flipped key goes
    with np.load(path) as npz:
        keys = set(npz.files)
    assert "latents_flipped_6x8" not in keys and {"latents_4x4", "latents_flipped_4x4", "latents_6x8"} <= keys
    assert torch.equal(read_latent_cache(path, BUCKET)["latents"], new_a)
    assert torch.equal(read_latent_cache(path, other, flipped=True)["latents"], lat_b.flip(-1))
    assert is_latent_cache_valid(path, record_a)[0] and is_latent_cache_valid(path, record_b)[0]


class FailingArray:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("disk went away")


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    image = make_images(tmp_path, ["a.png"])[0]
    path = latent_cache_path(image, BUCKET)
    record = latent_cache_record(image, BUCKET, vae_identity=VAE)
    latents = torch.randn(16, 6, 8)
    write_latent_cache(path, BUCKET, latents, (64, 48), (0, 0, 64, 48), record)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):  # fails after the first member was written
        cache_io.atomic_savez(path, {"a": np.zeros(3), "b": FailingArray()})
    calls = []

    def failing_write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device")
        return real_write_array(*args, **kwargs)

    real_write_array = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(OSError):
        write_latent_cache(path, BUCKET, torch.randn(16, 6, 8), (64, 48), (0, 0, 64, 48), record)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", path.name]


def test_failed_image_load_is_skipped_and_reported(tmp_path):
    paths = make_images(tmp_path, ["a.png", "broken.png", "c.png", "gone.png"])
    items = make_items(paths)
    paths[3].unlink()  # vanished after the records were made
    summary = encode_missing_latents(items, FakeVae(), fake_load, batch_size=2, num_workers=3)
    assert summary.encoded == 2 and set(summary.failed) == {str(items[1].npz_path), str(items[3].npz_path)}
    assert "cannot open broken.png" in summary.failed[str(items[1].npz_path)]
    assert "FileNotFoundError" in summary.failed[str(items[3].npz_path)]
    assert not items[1].npz_path.exists() and items[2].npz_path.exists()


def test_alpha_mask_defaults_to_ones_and_bad_shapes_raise(tmp_path):
    paths = make_images(tmp_path, ["a.png"])
    item = make_items(paths, alpha=True)[0]

    def load_without_alpha(source):
        image, size, crop, _ = fake_load(source)
        return image, size, crop, None

    encode_missing_latents([item], FakeVae(), load_without_alpha, batch_size=1, progress=False)
    assert torch.equal(read_latent_cache(item.npz_path, BUCKET)["alpha_mask"], torch.ones(48, 64))
    with pytest.raises(ValueError):
        write_latent_cache(item.npz_path, BUCKET, torch.randn(16, 8, 6), (1, 1), (0, 0, 1, 1), item.record)
    with pytest.raises(ValueError):
        encode_missing_latents(make_items(paths, vae="x"), lambda x: x[:, :, ::4, ::4], fake_load, batch_size=1)

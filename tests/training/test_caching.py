"""Real photographs through bucketing, latent caching (miniature VAE), text caching and batches."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults
from library.data.dataset import CacheOptions, TrainingData
from library.models.text_encoders import load_text_encoders
from library.models.tokenizers import load_tokenizers
from library.models.vae import load_vae
from library.training.caching import (
    cache_latents,
    cache_text_outputs,
    encoder_outputs_from_cache,
    file_identity,
    training_latents,
    vae_encode_fn,
)

PHOTOS = {"astronaut.png": "astronaut, portrait", "chelsea.png": "cat, tabby", "coffee.png": "coffee cup, saucer",
          "rocket.jpg": "rocket, launch pad"}


def _photo_folder(tmp_path: Path) -> Path:
    spec = importlib.util.find_spec("skimage")  # located, never imported: only its data files are used
    data_dir = Path(spec.submodule_search_locations[0]) / "data"
    folder = tmp_path / "photos" / "1_photo"
    folder.mkdir(parents=True)
    for name, caption in PHOTOS.items():
        shutil.copy(data_dir / name, folder / name)
        (folder / name).with_suffix(".caption").write_text(caption)
    return tmp_path / "photos"


def test_real_photos_bucketed_cached_and_loaded(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    defaults = DatasetDefaults(train_data_dir=_photo_folder(tmp_path), resolution=(64, 64), train_batch_size=2,
                               enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                               flip_aug=True)
    cache = CacheOptions(cache_latents=True, cache_text_encoder_outputs=True, t5_max_length=16,
                         vae_identity=file_identity(files.checkpoint, "fp32"), encoder_identity="tiny")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    buckets = {Path(r.image_path).name: b for r, b in zip(data.records, data.buckets)}
    assert buckets["astronaut.png"] == (64, 64)  # square photo, square bucket
    assert buckets["rocket.jpg"][0] > buckets["rocket.jpg"][1]  # 640x427 photo, wide bucket
    assert buckets["coffee.png"][0] > buckets["coffee.png"][1]  # landscape photo, wide bucket
    vae = load_vae(files.checkpoint)
    summary = cache_latents(data, vae, batch_size=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert summary.encoded == 4 and not summary.failed
    encoders = load_text_encoders(files.checkpoint)
    tokenizers = load_tokenizers(str(files.tokenizer_dir), t5_max_length=16)
    assert cache_text_outputs(data, encoders, tokenizers, batch_size=4, progress=False).encoded == 4
    for batch in data.epoch_batches(0):
        loaded = data.load_batch(batch, 0)
        w, h = batch.bucket[1]
        assert loaded.latents.shape == (len(batch.samples), 16, h // 8, w // 8)
        assert torch.isfinite(training_latents(loaded.latents)).all()
        outputs = encoder_outputs_from_cache(loaded.text)
        assert outputs.clip_l.shape[:2] == (len(batch.samples), 77) and outputs.t5.shape[1] == 16
    # the cached latent of an unflipped sample is the VAE's posterior of the prepared image
    index = next(i for i, r in enumerate(data.records) if Path(r.image_path).name == "astronaut.png")
    image, _, _, _ = data.load_for_cache(index)
    from library.data.latent_cache import latent_cache_path, read_latent_cache

    mean, _ = vae.encode_moments(image[None])
    cached = read_latent_cache(latent_cache_path(data.records[index].image_path, (64, 64)), (64, 64))["latents"]
    assert (cached - mean[0]).abs().mean() < (mean.abs().mean() + 1.0)  # a sample around the mean, same layout
    assert torch.equal(vae_encode_fn(vae, torch.Generator().manual_seed(5))(image[None]),
                       vae_encode_fn(vae, torch.Generator().manual_seed(5))(image[None]))


def test_dropped_captions_take_the_empty_prompt_outputs(tiny_models):
    from library.training.caching import empty_prompt_text, substitute_dropped, text_encode_fn

    files = tiny_models("sd3-medium")
    encode = text_encode_fn(load_text_encoders(files.checkpoint), load_tokenizers(str(files.tokenizer_dir), t5_max_length=8),
                            t5_max_length=8)
    empty = empty_prompt_text(encode)
    rows = encode(["a red square", "a blue circle"])
    stacked = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    mixed = substitute_dropped(stacked, ["a red square", ""], empty)
    for name in stacked:
        assert torch.equal(mixed[name][0], stacked[name][0]) and torch.equal(mixed[name][1], empty[name])
    assert not torch.equal(stacked["clip_l"][1], empty["clip_l"])  # the substitution really changed something

"""A miniature model learns two concepts: loss falls and samples land near their concept's latents.

Exercises the whole data -> cache -> step path (no trainer script yet): project-drawn images with
captions, bucketed and cached through the miniature VAE and text encoders, flow-matching steps with
AdamW, then sampling through the inference pipeline.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults
from library.data.dataset import CacheOptions, TrainingData
from library.flow.loss import LossSpec
from library.inference.sampling import SamplingParams, sample_latents
from library.models.loading import load_mmdit
from library.models.prompt_encoding import encode_prompts, layout_from_encoders
from library.models.text_encoders import load_text_encoders
from library.models.tokenizers import load_tokenizers
from library.models.vae import load_vae
from library.training.caching import cache_latents, cache_text_outputs, text_encode_fn
from library.training.step import StepSettings, batch_encoder_outputs, batch_latents, conditioning, flow_step

STEPS = 800
CONCEPTS = {"red circle": ((220, 30, 30), "ellipse"), "blue square": ((30, 60, 220), "rectangle")}


def _draw_concepts(folder: Path, per_concept: int = 6) -> None:
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for name, (color, shape) in CONCEPTS.items():
        for i in range(per_concept):
            image = Image.new("RGB", (64, 64), (245, 245, 240))
            x, y = rng.randint(8, 20), rng.randint(8, 20)
            getattr(ImageDraw.Draw(image), shape)((x, y, x + 34, y + 34), fill=color)
            stem = f"{name.replace(' ', '_')}_{i}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.caption").write_text(name)


def _validation_loss(model, data, layout, settings) -> float:
    """Raw velocity loss at fixed σ (0.2 … 0.8) with fixed noise over every image (DESIGN §4.8)."""
    from library.flow.loss import flow_matching_loss
    from library.flow.timesteps import sigma_to_timesteps, validation_sigmas

    gen, total, count, device = torch.Generator().manual_seed(123), 0.0, 0, torch.device("cpu")
    with torch.no_grad():
        for batch in data.epoch_batches(0):
            loaded = data.load_batch(batch, 0)
            x0 = batch_latents(loaded, None, device)
            cond = conditioning(batch_encoder_outputs(loaded, None, None), layout, settings, device)
            for sigma in validation_sigmas(4):
                sigmas = torch.full((x0.shape[0],), float(sigma))
                noise = torch.randn(x0.shape, generator=gen)
                x_sigma = (1 - sigma) * x0 + sigma * noise
                pred = model(x_sigma, sigma_to_timesteps(sigmas), cond.context, cond.pooled)
                total += flow_matching_loss(pred, x0, noise, sigmas, settings.loss).item()
                count += 1
    return total / count


@pytest.mark.slow
def test_two_concepts_are_learned(tiny_models, tmp_path):
    torch.manual_seed(0)
    files = tiny_models("sd3-medium")
    _draw_concepts(tmp_path / "data" / "1_concepts")
    cache = CacheOptions(cache_latents=True, cache_text_encoder_outputs=True, t5_max_length=16,
                         vae_identity="tiny", encoder_identity="tiny", keep_in_memory=True)
    data = TrainingData(blueprint_from_defaults(DatasetDefaults(train_data_dir=tmp_path / "data", resolution=(64, 64),
                                                                train_batch_size=4)), cache, seed=0)
    vae, encoders = load_vae(files.checkpoint), load_text_encoders(files.checkpoint)
    tokenizers = load_tokenizers(str(files.tokenizer_dir), t5_max_length=16)
    cache_latents(data, vae, batch_size=4, generator=torch.Generator().manual_seed(0), progress=False)
    cache_text_outputs(data, encoders, tokenizers, batch_size=8, progress=False)
    model = load_mmdit(files.checkpoint).train()
    layout = replace(layout_from_encoders(encoders), context_dim=model.config.context_dim)
    settings = StepSettings(loss=LossSpec(objective="raw"), t5_max_length=16)
    before = _validation_loss(model, data, layout, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen, losses, device = torch.Generator().manual_seed(1), [], torch.device("cpu")
    for step in range(STEPS):
        epoch, index = divmod(step, len(data.epoch_batches(0)))
        batch = data.load_batch(data.epoch_batches(epoch)[index], epoch)
        cond = conditioning(batch_encoder_outputs(batch, None, None), layout, settings, device, gen)
        result = flow_step(model, batch_latents(batch, None, device), cond, settings, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.85 * first, (first, last)  # noisy per-step losses (random σ)
    after = _validation_loss(model, data, layout, settings)
    print(f"validation loss {before:.2f} -> {after:.2f}, step loss {first:.2f} -> {last:.2f}")
    assert after < 0.75 * before, (before, after)  # fixed σ and noise

    model.eval()
    targets = {}
    for name in CONCEPTS:
        rows = [data.load_batch(b, 0) for b in data.epoch_batches(0)]
        lat = [batch_latents(b, None, device)[i] for b in rows for i, c in enumerate(b.captions) if c == name]
        targets[name] = torch.stack(lat).mean(0)
    for name in CONCEPTS:
        cond = encode_prompts(encoders, tokenizers, [name] * 4, t5_max_length=16, layout=layout)
        samples = sample_latents(model, cond, None, SamplingParams(width=64, height=64, steps=20, cfg_scale=1.0,
                                                                   shift=1.0, seed=3))
        mean = samples.mean(0)
        own, other = (mean - targets[name]).norm(), (mean - targets[[n for n in CONCEPTS if n != name][0]]).norm()
        print(f"{name}: own {own.item():.1f} other {other.item():.1f}")
        assert own < other, (name, own.item(), other.item())

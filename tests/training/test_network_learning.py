"""A miniature SD3.5-M network (LoRA, LoKr, LoRA on an fp8 base) learns one concept with sd3_train_network.py.

The trained file is loaded the way inference loads it (``networks.apply``). At multiplier 1 the
validation loss at fixed σ and noise falls and the samples of the concept's prompt land nearer the
concept's latents; at multiplier 0 the model is exactly the base. The base is a random miniature, whose
multi-step trajectories drift however it is trained, so samples are one Euler step from pure noise
(the model's own estimate of the image).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sd3_train_network
from library.flow.timesteps import sigma_to_timesteps
from library.inference.sampling import SamplingParams, sample_latents
from library.models.loading import load_mmdit
from library.models.prompt_encoding import encode_prompts, layout_from_encoders
from library.models.text_encoders import load_text_encoders
from library.models.tokenizers import load_tokenizers
from library.models.vae import load_vae
from networks.apply import load_network

PROMPT = "red circle"


def _draw(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    rng, paths = random.Random(0), []
    for i in range(6):
        image = Image.new("RGB", (64, 64), (245, 245, 240))
        x, y = rng.randint(8, 20), rng.randint(8, 20)
        ImageDraw.Draw(image).ellipse((x, y, x + 34, y + 34), fill=(220, 30, 30))
        image.save(folder / f"c{i}.png")
        (folder / f"c{i}.caption").write_text(PROMPT)
        paths.append(folder / f"c{i}.png")
    return paths


def _val_loss(mmdit, cond, x0) -> float:
    gen, total = torch.Generator().manual_seed(5), 0.0
    with torch.no_grad():
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(x0.shape, generator=gen)
            pred = mmdit((1 - sigma) * x0 + sigma * noise, sigma_to_timesteps(torch.full((len(x0),), sigma)),
                         cond.context, cond.pooled)
            total += float(((pred - (noise - x0)) ** 2).mean())
    return total / 3


@pytest.mark.slow
@pytest.mark.parametrize("module, extra", [
    ("networks.lora_sd3", []),
    ("networks.lokr_sd3", ["--network_args", "factor=4"]),
    ("networks.lora_sd3", ["--fp8_base"]),
], ids=["lora", "lokr", "lora-fp8-base"])
def test_network_learns_one_concept(tiny_models, tmp_path, capsys, module, extra):
    files = tiny_models("sd35-medium")
    paths = _draw(tmp_path / "data" / "4_circle")
    argv = ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
            "--output_name", "net", "--network_module", module, "--network_dim", "8", "--network_alpha", "8",
            "--learning_rate", "1e-2", "--max_train_steps", "250", "--t5xxl_max_token_length", "16",
            "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only", "--seed", "1",
            "--train_batch_size", "4", "--model_prediction_type", "raw", *extra]
    assert sd3_train_network.main(argv) == 0, capsys.readouterr().err

    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])
    x0 = load_vae(files.checkpoint).encode(images.float() / 127.5 - 1, sample=False)
    encoders, mmdit = load_text_encoders(files.checkpoint), load_mmdit(files.checkpoint)
    tokenizers = load_tokenizers(str(files.tokenizer_dir), t5_max_length=16)
    layout = replace(layout_from_encoders(encoders), context_dim=mmdit.config.context_dim)
    cond = encode_prompts(encoders, tokenizers, [PROMPT] * len(x0), t5_max_length=16, layout=layout)
    params = SamplingParams(width=64, height=64, steps=1, cfg_scale=1.0, shift=1.0, seed=3)
    base_samples, base_loss = sample_latents(mmdit, cond, None, params), _val_loss(mmdit, cond, x0)

    network = load_network(str(tmp_path / "out" / "net.safetensors"), 1.0, encoders, mmdit)
    network.apply_to()
    results = {}
    for multiplier in (1.0, 0.0):
        network.set_multiplier(multiplier)
        samples = sample_latents(mmdit, cond, None, params)
        distance = float((samples - x0.mean(0)).flatten(1).norm(dim=1).mean())
        results[multiplier] = (samples, distance, _val_loss(mmdit, cond, x0))
    print({m: (round(d, 2), round(v, 3)) for m, (_, d, v) in results.items()})
    assert torch.equal(results[0.0][0], base_samples) and results[0.0][2] == base_loss  # multiplier 0 is the base
    assert results[1.0][2] < 0.9 * base_loss  # the network fits the concept
    assert results[1.0][1] < 0.88 * results[0.0][1]  # and its samples move toward it

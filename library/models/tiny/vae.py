"""A tiny SD3-shaped VAE for tests: 16 latent channels, x8 downsampling, random weights in LDM naming.

Every parameter is random (same seed -> same tensors): convolutions ~ N(0, 1/fan_in), GroupNorm
weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2). The key list comes from
:func:`library.models.vae.ldm_vae_shapes`, the same layout the loader checks files against.
Files written with :func:`tiny_vae_metadata` load without hints (the metadata carries the config,
whose 8 norm groups cannot be inferred from shapes).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from library.models.vae import LATENT_CHANNELS, SCALING_FACTOR, SHIFT_FACTOR, VAE_CONFIG_METADATA_KEY, ldm_vae_shapes

_NORM_STD = 0.1
_BIAS_STD = 0.02


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` config of the tiny VAE (4 levels, so 64 px images give 8x8 latents)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": SCALING_FACTOR,
        "shift_factor": SHIFT_FACTOR,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def tiny_vae_config_json() -> str:
    """The tiny config as the JSON string stored under :data:`VAE_CONFIG_METADATA_KEY`."""
    return json.dumps(tiny_vae_config(), sort_keys=True)


def tiny_vae_metadata() -> dict[str, str]:
    """Safetensors metadata for a tiny VAE file (or an all-in-one file holding it)."""
    return {VAE_CONFIG_METADATA_KEY: tiny_vae_config_json()}


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if key.endswith(".bias"):
        return noise * _BIAS_STD
    if len(shape) == 1:  # GroupNorm weight (norm1, norm2, norm_out, attention norm)
        return 1.0 + noise * _NORM_STD
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return noise / fan_in**0.5


def tiny_vae_ldm_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights of the tiny VAE in LDM naming, without the ``first_stage_model.`` prefix."""
    generator = torch.Generator().manual_seed(seed)
    return {key: _random_tensor(key, shape, generator) for key, shape in ldm_vae_shapes(tiny_vae_config()).items()}

"""Euler + CFG (+ skip-layer guidance) against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch

from library.inference.sampling import SamplingParams, initial_noise, sample_latents, slg_active
from library.models.loading import load_mmdit
from library.models.mmdit_config import MMDIT_PREFIX, to_diffusers_config
from library.models.prompt_encoding import Conditioning
from library.models.tiny.mmdit import tiny_mmdit_config, tiny_mmdit_state_dict


def _pair(variant: str):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg = tiny_mmdit_config(variant)
    sd = tiny_mmdit_state_dict(cfg, seed=4)
    theirs = SD3Transformer2DModel(**{k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")})
    theirs.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers({MMDIT_PREFIX + k: v.clone() for k, v in sd.items()}))
    return cfg, load_mmdit(sd, config=cfg), theirs.eval()


def _conds(cfg, batch=2, n_ctx=20):
    g = torch.Generator().manual_seed(3)
    make = lambda: Conditioning(torch.randn(batch, n_ctx, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))  # noqa: E731
    return make(), make()


@pytest.mark.parametrize("variant,slg", [("sd3-medium", ()), ("sd35-medium", ()), ("sd35-medium", (1,)), ("sd35-large", (0,))])
def test_euler_cfg_matches_diffusers_pipeline(variant, slg):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg, ours, theirs = _pair(variant)
    cond, uncond = _conds(cfg)
    params = SamplingParams(width=128, height=96, steps=10, cfg_scale=4.5, shift=3.0, seed=5,
                            slg_layers=slg, slg_scale=2.5, slg_start=0.01, slg_stop=0.5)
    latents = sample_latents(ours, cond, uncond, params)
    pipe = StableDiffusion3Pipeline(transformer=theirs, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    slg_kwargs = dict(skip_guidance_layers=list(slg), skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.01,
                      skip_layer_guidance_stop=0.5) if slg else {}
    ref = pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
               negative_pooled_prompt_embeds=uncond.pooled, height=96, width=128, num_inference_steps=10,
               guidance_scale=4.5, generator=torch.Generator("cpu").manual_seed(5), output_type="latent", **slg_kwargs).images
    assert latents.shape == (2, 16, 12, 16)
    assert (latents - ref).abs().max().item() <= 1e-4
    if slg:  # guidance really active: without it the result differs
        plain = sample_latents(ours, cond, uncond, SamplingParams(**{**params.__dict__, "slg_layers": ()}))
        assert (plain - latents).abs().max().item() > 1e-3


def test_initial_noise_is_diffusers_noise():
    from diffusers.utils.torch_utils import randn_tensor

    ref = randn_tensor((2, 16, 12, 16), generator=torch.Generator("cpu").manual_seed(11), dtype=torch.float32)
    assert torch.equal(initial_noise(2, 96, 128, 11), ref)
    with pytest.raises(ValueError, match="multiples of 16"):
        initial_noise(1, 100, 128, 0)


def test_slg_window_is_strict():
    assert [i for i in range(28) if slg_active(i, 28, 0.01, 0.2)] == [1, 2, 3, 4, 5]

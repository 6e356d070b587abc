"""Sampling speed: seconds per step, ours ÷ diffusers' StableDiffusion3Pipeline, same miniature model.

Run: python bench/bench_inference.py [--variant sd35-medium] [--steps 20] [--repeats 5] [--no-record]

Both sides get the same prompt embeddings, the same seed and Euler + CFG on the same weights
(ours loaded from the SAI file, theirs through diffusers' converter); runs are interleaved in one
process so machine noise hits both. A row goes to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_section, header  # noqa: E402

from library.inference.sampling import SamplingParams, sample_latents  # noqa: E402
from library.models.loading import load_mmdit  # noqa: E402
from library.models.mmdit_config import MMDIT_PREFIX, to_diffusers_config  # noqa: E402
from library.models.prompt_encoding import Conditioning  # noqa: E402
from library.models.tiny.mmdit import tiny_mmdit_config, tiny_mmdit_state_dict  # noqa: E402


def _pipeline(cfg, state_dict, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = SD3Transformer2DModel(**{k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")})
    converted = convert_sd3_transformer_checkpoint_to_diffusers({MMDIT_PREFIX + k: v.clone() for k, v in state_dict.items()})
    transformer.load_state_dict(converted, strict=True)
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(variant: str, steps: int, repeats: int, size: int) -> tuple[float, float, float]:
    """(ours s/step, diffusers s/step, max |Δ latents|)."""
    cfg = tiny_mmdit_config(variant, heads_equal_depth=True)
    state_dict = tiny_mmdit_state_dict(cfg, seed=0)
    ours = load_mmdit(state_dict, config=cfg)
    pipe = _pipeline(cfg, state_dict, shift=3.0)
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 333, cfg.context_dim, generator=gen), torch.randn(1, cfg.pooled_dim, generator=gen))
    uncond = Conditioning(torch.randn(1, 333, cfg.context_dim, generator=gen), torch.randn(1, cfg.pooled_dim, generator=gen))
    params = SamplingParams(width=size, height=size, steps=steps, cfg_scale=5.0, shift=3.0, seed=1)

    def run_ours() -> torch.Tensor:
        return sample_latents(ours, cond, uncond, params)

    def run_theirs() -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
                        negative_pooled_prompt_embeds=uncond.pooled, height=size, width=size, num_inference_steps=steps,
                        guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1), output_type="latent").images

    diff = (run_ours() - run_theirs()).abs().max().item()
    a, b = [], []
    for _ in range(repeats):
        for fn, sink in ((run_ours, a), (run_theirs, b)):
            start = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - start) / steps)
    return statistics.median(a), statistics.median(b), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sd35-medium", choices=["sd3-medium", "sd35-medium", "sd35-large"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="image side in px (latent side / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    ours, theirs, diff = measure(args.variant, args.steps, args.repeats, args.size)
    line = (f"- {args.variant} miniature (heads = depth, 64 wide), {args.size} px, Euler + CFG, {args.steps} steps: "
            f"ours {ours*1e3:.1f} ms/step, diffusers {theirs*1e3:.1f} ms/step, ratio **{ours / theirs:.3f}** "
            f"(max |Δ latents| {diff:.1e})")
    print(line)
    if not args.no_record:
        append_section(header("bench_inference") + [line])


if __name__ == "__main__":
    main()

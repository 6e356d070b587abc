"""Flags of sd3_minimal_inference.py and their conversion to typed configs.

Flag names follow sd-scripts so that command lines copied from model cards keep working.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.cli import ArgumentParser
from library.cli import models
from library.errors import UserError
from library.inference.pipeline import LoadOptions, ModelSources
from library.inference.prompts import PromptSpec, parse_prompt_line, read_prompt_file
from library.inference.run import GenerationJob
from library.inference.sampling import SamplingParams

DEFAULT_PROMPT = "a photo of a cat sitting on a wooden table"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 7,8,9, got {text!r}") from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--ckpt_path", help="SD3 / SD3.5 single-file checkpoint (.safetensors)")
    add_model_file_flags(g)
    g.add_argument("--lora_weights", nargs="*", default=[], help="networks as 'path;multiplier' (LoRA or LoKr)")
    g.add_argument("--merge_lora_weights", action="store_true", help="fold --lora_weights into the weights")


def add_model_file_flags(g) -> None:
    """Separate component files, precision, device, offload and block swap: the model flags every
    rendering tool shares (sd3_minimal_inference.py, tools/compare_checkpoints.py)."""
    g.add_argument("--clip_l", help="separate CLIP-L file (else taken from the checkpoint)")
    g.add_argument("--clip_g", help="separate CLIP-G file (else taken from the checkpoint)")
    g.add_argument("--t5xxl", help="separate T5-XXL file (else taken from the checkpoint)")
    g.add_argument("--vae", help="separate VAE file (else taken from the checkpoint)")
    g.add_argument("--tokenizer_cache_dir", help="folder with tokenizer/, tokenizer_2/, tokenizer_3/ (save_pretrained layout)")
    g.add_argument("--t5xxl_token_length", type=int, default=256, help="T5 tokens (default 256)")
    g.add_argument("--apply_lg_attn_mask", action="store_true", help="zero CLIP-L/G padding embeddings")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding (in T5 and its embeddings)")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true", help="read files in one go instead of mmap")
    g.add_argument("--fp16", action="store_true", help="fp16 weights (GPU only)")
    g.add_argument("--bf16", action="store_true", help="bf16 weights")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda if available)")
    g.add_argument("--offload", action="store_true", help="keep idle models on the CPU")
    g.add_argument("--blocks_to_swap", type=int, default=0,
                   help="keep the last N MMDiT blocks on the CPU, streamed to the GPU around use (max depth - 2)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=None, help=f"prompt (default {DEFAULT_PROMPT!r}); inline --w --h --s --d --n --l allowed")
    g.add_argument("--prompt_file", help="text file, one prompt per line with the same inline options")
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--cfg_scale", type=float, default=None, help="default: the model's (5.0 SD3/SD3.5-M, 4.5 SD3.5-L)")
    g.add_argument("--shift", type=float, default=None, help="flow shift (default: the model's, 3.0)")
    g.add_argument("--sampler", default="euler", help="euler, euler_a or dpmpp_2m")
    g.add_argument("--scheduler", default="normal", help="normal, simple or beta")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=None, help="default: random")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--images_per_prompt", type=int, default=1)
    g.add_argument("--skip_layer_guidance_scale", type=float, default=0.0, help="SLG strength (SD3.5-M: 2.5-2.8); 0 = off")
    g.add_argument("--skip_layer_guidance_layers", type=_int_list, default=(7, 8, 9), help="layers to skip, e.g. 7,8,9")
    g.add_argument("--skip_layer_guidance_start", type=float, default=0.01, help="fraction of steps where SLG starts")
    g.add_argument("--skip_layer_guidance_stop", type=float, default=0.2, help="fraction of steps where SLG stops")


def inference_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Generate images with an SD3 / SD3.5 checkpoint.")
    _add_model_flags(p)
    _add_sampling_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs", help="where PNGs go (default ./outputs)")
    g.add_argument("--output_latents", help="also write the final latents (before decoding) to this .safetensors")
    g.add_argument("--interactive", action="store_true", help="read prompts from the keyboard")
    g.add_argument("--demo", action="store_true", help="build a miniature model in OUTPUT_DIR/tiny_model and render with it")
    return p


def load_options(ns: argparse.Namespace) -> LoadOptions:
    if ns.fp16 and ns.bf16:
        raise UserError("--fp16 and --bf16 exclude each other; pick one")
    dtype = torch.float16 if ns.fp16 else torch.bfloat16 if ns.bf16 else torch.float32
    return LoadOptions(device=models.device(ns), dtype=dtype, mmap=not ns.disable_mmap_load_safetensors,
                       t5_max_length=ns.t5xxl_token_length, apply_lg_attn_mask=ns.apply_lg_attn_mask,
                       apply_t5_attn_mask=ns.apply_t5_attn_mask, offload=ns.offload,
                       blocks_to_swap=ns.blocks_to_swap)


def model_sources(ns: argparse.Namespace) -> ModelSources:
    if not ns.ckpt_path:
        raise UserError("--ckpt_path is required (an SD3 / SD3.5 .safetensors file), or use --demo")
    for flag in ("ckpt_path", "clip_l", "clip_g", "t5xxl", "vae"):
        value = getattr(ns, flag)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value}: file not found")
    return ModelSources(ns.ckpt_path, ns.clip_l, ns.clip_g, ns.t5xxl, ns.vae, ns.tokenizer_cache_dir)


def prompt_specs(ns: argparse.Namespace) -> tuple[PromptSpec, ...]:
    if ns.prompt_file:
        return tuple(read_prompt_file(ns.prompt_file))
    return (parse_prompt_line(ns.prompt or DEFAULT_PROMPT, "--prompt"),)


def sampling_defaults(ns: argparse.Namespace) -> SamplingParams:
    """Job defaults; shift / cfg_scale stay unset (None -> model defaults, filled after loading)."""
    if ns.batch_size < 1 or ns.images_per_prompt < 1:
        raise UserError("--batch_size and --images_per_prompt must be at least 1")
    return SamplingParams(width=ns.width, height=ns.height, steps=ns.steps, cfg_scale=ns.cfg_scale,
                          shift=ns.shift, sampler=ns.sampler, scheduler=ns.scheduler,
                          seed=-1 if ns.seed is None else ns.seed,
                          slg_layers=tuple(ns.skip_layer_guidance_layers), slg_scale=ns.skip_layer_guidance_scale,
                          slg_start=ns.skip_layer_guidance_start, slg_stop=ns.skip_layer_guidance_stop)


def generation_job(ns: argparse.Namespace, prompts: tuple[PromptSpec, ...], defaults: SamplingParams) -> GenerationJob:
    return GenerationJob(prompts=prompts, defaults=defaults, output_dir=Path(ns.output_dir),
                         negative_prompt=ns.negative_prompt, batch_size=ns.batch_size,
                         images_per_prompt=ns.images_per_prompt,
                         output_latents=Path(ns.output_latents) if ns.output_latents else None,
                         model_name=Path(ns.ckpt_path).stem if ns.ckpt_path else "")

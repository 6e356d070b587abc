"""Flags of tools/compare_checkpoints.py and their conversion to typed configs.

Model, precision and sampling flags have the names and meanings of sd3_minimal_inference.py (and are
converted by the same functions), so a command line can move between the two tools.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.cli import ArgumentParser
from library.cli import inference
from library.errors import UserError
from library.inference.compare import CompareJob
from library.inference.pipeline import ModelSources
from library.inference.sampling import SamplingParams

DEFAULT_OUTPUT = "compare_grid.png"


def _add_file_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to compare")
    g.add_argument("--checkpoint_dir", required=True,
                   help="folder of saved checkpoints or LoRA/LoKr files (one training run's saves)")
    g.add_argument("--pattern", default="*.safetensors", help="which files of the folder (glob, default *.safetensors)")
    g.add_argument("--ckpt_path", help="base model the network files apply to (LoRA/LoKr folders; unused for checkpoints)")
    g.add_argument("--network_multiplier", type=float, default=1.0, help="strength of each network (default 1.0)")
    g.add_argument("--include_base", action="store_true", help="networks: add a first column without any network")
    g.add_argument("--output", help=f"grid PNG to write (default CHECKPOINT_DIR/{DEFAULT_OUTPUT})")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    inference.add_model_file_flags(p.add_argument_group("models"))


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (the same for every column)")
    g.add_argument("--prompt", default=None, help="prompt; inline --w --h --s --d --n --l --ss --fs allowed")
    g.add_argument("--prompt_file", help="text file, one prompt (one grid row) per line with the same inline options")
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--cfg_scale", type=float, default=None, help="default: the model's (5.0 SD3/SD3.5-M, 4.5 SD3.5-L)")
    g.add_argument("--shift", type=float, default=None, help="flow shift (default: the model's, 3.0)")
    g.add_argument("--sampler", default="euler", help="euler, euler_a or dpmpp_2m")
    g.add_argument("--scheduler", default="normal", help="normal, simple or beta")
    g.add_argument("--steps", type=int, default=28)
    g.add_argument("--seed", type=int, default=None, help="default: one random seed per prompt, shared by all columns")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--skip_layer_guidance_scale", type=float, default=0.0, help="SLG strength (SD3.5-M: 2.5-2.8); 0 = off")
    g.add_argument("--skip_layer_guidance_layers", type=inference._int_list, default=(7, 8, 9), help="e.g. 7,8,9")
    g.add_argument("--skip_layer_guidance_start", type=float, default=0.01)
    g.add_argument("--skip_layer_guidance_stop", type=float, default=0.2)


def compare_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Render the same prompts and seeds with every checkpoint or network file "
                                   "of a folder into one labelled grid (rows: prompts, columns: files by step).")
    _add_file_flags(p)
    _add_model_flags(p)
    _add_sampling_flags(p)
    return p


def model_sources(ns: argparse.Namespace) -> ModelSources:
    for flag in ("ckpt_path", "clip_l", "clip_g", "t5xxl", "vae"):
        value = getattr(ns, flag)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value}: file not found")
    return ModelSources(ns.ckpt_path or "", ns.clip_l, ns.clip_g, ns.t5xxl, ns.vae, ns.tokenizer_cache_dir)


def compare_job(ns: argparse.Namespace) -> CompareJob:
    """The prompts and shared sampling settings; shift / cfg_scale stay None until the model is known."""
    defaults = SamplingParams(width=ns.width, height=ns.height, steps=ns.steps, cfg_scale=ns.cfg_scale,
                              shift=ns.shift, sampler=ns.sampler, scheduler=ns.scheduler,
                              seed=-1 if ns.seed is None else ns.seed,
                              slg_layers=tuple(ns.skip_layer_guidance_layers), slg_scale=ns.skip_layer_guidance_scale,
                              slg_start=ns.skip_layer_guidance_start, slg_stop=ns.skip_layer_guidance_stop)
    output = Path(ns.output) if ns.output else Path(ns.checkpoint_dir) / DEFAULT_OUTPUT
    if output.suffix.lower() != ".png":
        raise UserError(f"--output {output}: the grid is a PNG; give a .png file name")
    return CompareJob(prompts=inference.prompt_specs(ns), defaults=defaults, output=output,
                      negative_prompt=ns.negative_prompt, include_base=ns.include_base)

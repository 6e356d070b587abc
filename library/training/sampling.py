"""Sample images during training (``--sample_prompts`` with ``--sample_every_n_steps/epochs``).

Prompts come from a .txt file with sd-scripts' inline options (``--w --h --s --d --l --n --ss --fs``),
a .toml (``[[prompt]]`` tables) or a .json list, with sd-scripts' key names (``prompt``,
``negative_prompt``, ``width``, ``height``, ``sample_steps``, ``scale``, ``seed``, ``sample_sampler``)
plus ``shift``. They are encoded once at the start (before cached text encoders are freed), so a
round needs only the MMDiT (with any network hooked into it) and the VAE. The shift is the prompt's
``--fs``, else ``--sample_shift``, else the model's inference default (3.0), not the training shift.
Every image has a fixed seed (the prompt's ``--d``, else 1000 + its index); the global RNG state is
saved and restored around a round, so sampling never changes training. Files follow sd-scripts:
``<output_dir>/sample/<output_name>_<e000005|000100>_<idx:02d>_<timestamp>_<seed>.png``, plus
``<name>_<...>_grid.png`` per round and ``<name>_progress.png`` (rounds × prompts) at the end.
"""

from __future__ import annotations

import contextlib

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from library.errors import UserError
from library.inference.images import format_parameters, save_png, tensor_to_images
from library.inference.prompts import PromptSpec, read_prompt_file
from library.inference.run import params_for
from library.inference.sampling import SamplingParams, sample_latents
from library.training.loop import LoopHooks, LoopState

logger = logging.getLogger(__name__)
DEFAULT_SEED = 1000
_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
         "sample_steps": "steps", "steps": "steps", "scale": "cfg_scale", "cfg_scale": "cfg_scale", "seed": "seed",
         "sample_sampler": "sampler", "sampler": "sampler", "shift": "shift"}


def _spec_from_table(table: dict, source: str) -> PromptSpec:
    unknown = [k for k in table if k not in _KEYS]
    if unknown or "prompt" not in table:
        raise UserError(f"{source}: each prompt needs 'prompt' and may have {', '.join(sorted(_KEYS))}; "
                        f"got {sorted(table)}")
    return PromptSpec(**{_KEYS[k]: v for k, v in table.items()})


def read_sample_prompts(path: str) -> list[PromptSpec]:
    """Prompts of a .txt, .toml (``[[prompt]]``) or .json (list of objects) file."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json"):
        return read_prompt_file(path)
    if not Path(path).is_file():
        raise UserError(f"--sample_prompts file not found: {path}")
    try:
        if suffix == ".toml":
            import toml

            tables = toml.loads(Path(path).read_text(encoding="utf-8")).get("prompt", [])
        else:
            tables = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # toml's and json's decode errors are ValueErrors
        raise UserError(f"--sample_prompts {path} could not be read: {exc}") from None
    if isinstance(tables, dict):
        tables = [tables]
    specs = [_spec_from_table(t, f"{path} prompt {i}") for i, t in enumerate(tables)]
    if not specs:
        raise UserError(f"--sample_prompts {path} has no prompts")
    return specs


@dataclass(frozen=True)
class SamplePlan:
    prompts: tuple[PromptSpec, ...]
    defaults: SamplingParams
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False

    def params(self, index: int) -> SamplingParams:
        spec = self.prompts[index]
        seed = DEFAULT_SEED + index if spec.seed is None else spec.seed
        return params_for(replace(spec, seed=seed), self.defaults)


@dataclass
class SampleContext:
    """What a round needs: the denoiser (MMDiT, network hooked), a VAE getter, the encoded prompts."""

    model: Callable[[], torch.nn.Module]
    vae: Callable[[], Any]
    conditions: Callable[[list[str]], dict[str, Any]]  # texts -> {text: Conditioning (batch 1)}
    device: torch.device
    compute_dtype: torch.dtype | None
    out_dir: Path
    output_name: str
    is_main: bool = True
    weights: Callable[[], Any] | None = None  # a context manager the round runs in (e.g. the EMA weights)
    report: Callable[[str, int, list], None] | None = None  # (label, step, images) of each round, e.g. to a tracker


class SampleHooks(LoopHooks):
    """Renders the plan at the configured steps/epochs; keeps the rounds for the final progress grid."""

    def __init__(self, plan: SamplePlan, ctx: SampleContext) -> None:
        self.plan, self.ctx = plan, ctx
        self.rounds: list[tuple[str, list[Image.Image]]] = []

    def on_train_start(self, state: LoopState) -> None:
        if self.plan.at_first:
            self.sample_round(f"{state.global_step:06d}", state.global_step)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        every = self.plan.every_n_steps
        if every and state.global_step % every == 0:
            self.sample_round(f"{state.global_step:06d}", state.global_step)

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        every = self.plan.every_n_epochs
        if every and epoch % every == 0:
            self.sample_round(f"e{epoch:06d}", state.global_step)

    def on_train_end(self, state: LoopState) -> None:
        if self.ctx.is_main and len(self.rounds) > 1:
            rows = [images for _, images in self.rounds]
            path = self.ctx.out_dir / f"{self.ctx.output_name}_progress.png"
            save_png(image_grid(rows), path, "rows: " + ", ".join(label for label, _ in self.rounds))

    def sample_round(self, label: str, step: int = 0) -> list[Path]:
        if not self.ctx.is_main:
            return []
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        model = self.ctx.model()
        was_training = model.training
        model.eval()
        try:
            with self.ctx.weights() if self.ctx.weights is not None else contextlib.nullcontext():
                paths, images = self._render_all(model, label)
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        self.rounds.append((label, images))
        save_png(image_grid([images]), self.ctx.out_dir / f"{self.ctx.output_name}_{label}_grid.png", label)
        if self.ctx.report is not None:
            self.ctx.report(label, step, images)
        return paths

    @torch.no_grad()
    def _render_all(self, model: torch.nn.Module, label: str) -> tuple[list[Path], list[Image.Image]]:
        ctx, stamp = self.ctx, time.strftime("%Y%m%d%H%M%S")
        table = ctx.conditions([t for spec in self.plan.prompts for t in (spec.prompt, spec.negative_prompt)])
        paths, images = [], []
        for index, spec in enumerate(self.plan.prompts):
            params = self.plan.params(index)
            cond = _on(table[spec.prompt], ctx.device)
            uncond = _on(table[spec.negative_prompt], ctx.device) if params.cfg_scale != 1.0 else None
            latents = sample_latents(model, cond, uncond, params, compute_dtype=ctx.compute_dtype)
            vae = ctx.vae()
            image = tensor_to_images(vae.decode(latents.to(ctx.device, next(vae.parameters()).dtype)))[0]
            settings = {"Steps": params.steps, "Sampler": params.sampler, "CFG scale": params.cfg_scale,
                        "Shift": params.shift, "Seed": params.seed, "Size": f"{params.width}x{params.height}"}
            name = f"{ctx.output_name}_{label}_{index:02d}_{stamp}_{params.seed}.png"
            paths.append(save_png(image, ctx.out_dir / name, format_parameters(spec.prompt, spec.negative_prompt, settings)))
            images.append(image)
        logger.info("sampled %d images at %s into %s", len(paths), label, ctx.out_dir)
        return paths, images


def _on(cond: Any, device: torch.device) -> Any:
    """A Conditioning with every tensor on ``device``."""
    return type(cond)(*(None if t is None else t.to(device) for t in
                        (cond.context, cond.pooled, cond.clip_l_mask, cond.clip_g_mask, cond.t5_mask)))


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of images on one canvas (cells as large as the largest image, top-left aligned)."""
    width = max(im.width for row in rows for im in row)
    height = max(im.height for row in rows for im in row)
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (width * columns, height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * width, r * height))
    return canvas


def sample_plan(prompts_path: str | None, *, every_n_steps: int | None, every_n_epochs: int | None, at_first: bool,
                sampler: str, shift: float | None, variant: str) -> SamplePlan | None:
    """The plan of ``--sample_*`` flags (None without a prompt file); defaults: 512x512, 30 steps, the
    model's CFG scale and shift (sd-scripts' size and steps)."""
    if not prompts_path:
        return None
    from library.inference.pipeline import MODEL_DEFAULTS

    model = MODEL_DEFAULTS.get(variant, MODEL_DEFAULTS["sd3-medium"])
    defaults = SamplingParams(width=512, height=512, steps=30, cfg_scale=model["cfg_scale"],
                              shift=model["shift"] if shift is None else shift, sampler=sampler)
    plan = SamplePlan(tuple(read_sample_prompts(prompts_path)), defaults, every_n_steps, every_n_epochs, at_first)
    for index in range(len(plan.prompts)):
        plan.params(index)  # a bad size or sampler fails now, not hours into the run
    return plan


def prompt_encoder(encoders: Callable[[], Any], tokenizers: Any, layout: Any, *, t5_max_length: int,
                   apply_lg_attn_mask: bool, apply_t5_attn_mask: bool,
                   device: torch.device) -> Callable[[list[str]], dict[str, Any]]:
    """texts -> {text: Conditioning (batch 1, CPU)} with the encoders ``encoders()`` returns when called
    (a getter, so that freeing them during the run is not prevented)."""
    from library.models.prompt_encoding import encode_prompts

    @torch.no_grad()
    def encode(texts: list[str]) -> dict[str, Any]:
        unique = list(dict.fromkeys(texts))
        cond = encode_prompts(encoders(), tokenizers, unique, t5_max_length=t5_max_length,
                              apply_lg_attn_mask=apply_lg_attn_mask, apply_t5_attn_mask=apply_t5_attn_mask,
                              layout=layout, device=device, dtype=torch.float32)
        parts = (cond.context, cond.pooled, cond.clip_l_mask, cond.clip_g_mask, cond.t5_mask)
        return {text: type(cond)(*(None if t is None else t[i:i + 1].cpu() for t in parts))
                for i, text in enumerate(unique)}

    return encode

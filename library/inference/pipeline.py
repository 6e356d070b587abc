"""Prompt -> latents -> image: the one generation pipeline (inference script and training samples).

:class:`ModelSet` loads the MMDiT, VAE, text encoders and tokenizers once; :func:`encode` turns
prompts into conditioning (text encoders run on the compute device only while encoding, and
can be freed or parked on the CPU afterwards); :func:`render` samples and decodes one request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from library.errors import UserError
from library.inference.images import tensor_to_images
from library.inference.sampling import SamplingParams, sample_latents
from library.models.loading import load_mmdit, read_mmdit_config
from library.models.mmdit import MMDiT
from library.models.prompt_encoding import Conditioning, TextLayout, encode_prompts, layout_from_encoders
from library.models.text_encoders import TextEncoders, load_text_encoders
from library.models.tokenizers import Tokenizers, load_tokenizers
from library.models.vae import SD3VAE, load_vae
from library.runtime.block_swap import BlockSwap, align_cpu_tensors, check_blocks_to_swap, place_model

logger = logging.getLogger(__name__)

# Inference defaults of the released models (shift, CFG); SLG is opt-in.
MODEL_DEFAULTS: dict[str, dict[str, float]] = {
    "sd3-medium": {"shift": 3.0, "cfg_scale": 5.0},
    "sd35-medium": {"shift": 3.0, "cfg_scale": 5.0},
    "sd35-large": {"shift": 3.0, "cfg_scale": 4.5},
}


@dataclass(frozen=True)
class ModelSources:
    ckpt_path: str
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    vae: str | None = None
    tokenizer_cache_dir: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # MMDiT and CLIP weights
    mmap: bool = True
    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    offload: bool = False  # park idle models on the CPU
    blocks_to_swap: int = 0  # the MMDiT's last N joint blocks stay on the CPU and stream in around use


@dataclass
class ModelSet:
    mmdit: MMDiT
    vae: SD3VAE
    encoders: TextEncoders | None
    tokenizers: Tokenizers
    layout: TextLayout
    options: LoadOptions
    swap: BlockSwap | None = None  # the MMDiT's block swap (--blocks_to_swap)

    @property
    def variant(self) -> str:
        return self.mmdit.config.variant

    def free_text_encoders(self) -> None:
        """Drop the text encoders (prompts must then be encoded before this call)."""
        self.encoders = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _t5_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.float16 else dtype  # T5 overflows in fp16


def load_models(sources: ModelSources, options: LoadOptions) -> ModelSet:
    """Load every component; the text-encoder layout is aligned with the MMDiT's widths."""
    if options.dtype == torch.float16 and not options.device.startswith(("cuda", "mps")):
        raise UserError("fp16 needs a GPU (fp16 matmuls on a CPU are ~1000x slower); use --bf16 or no precision flag")
    park = "cpu" if options.offload else options.device
    mmdit, swap = load_placed_mmdit(sources.ckpt_path, options)
    vae_dtype = torch.float32 if options.dtype == torch.float16 else options.dtype
    vae = load_vae(sources.vae or sources.ckpt_path, dtype=vae_dtype, device=park, mmap=options.mmap)
    encoders = load_text_encoders(sources.ckpt_path, sources.clip_l, sources.clip_g, sources.t5xxl,
                                  dtype=options.dtype, t5_dtype=_t5_dtype(options.dtype), device="cpu", mmap=options.mmap)
    tokenizers = load_tokenizers(sources.tokenizer_cache_dir, t5_max_length=options.t5_max_length)
    cfg = mmdit.config
    layout = replace(layout_from_encoders(encoders), context_dim=cfg.context_dim)
    if layout.pooled_dim != cfg.pooled_dim:
        raise UserError(f"text encoders give pooled width {layout.pooled_dim} but the MMDiT in {sources.ckpt_path} "
                        f"expects {cfg.pooled_dim}; pass the CLIP-L/CLIP-G files that belong to this model")
    return ModelSet(mmdit, vae, encoders, tokenizers, layout, options, swap)


def load_placed_mmdit(path: str | Path, options: LoadOptions):
    """The MMDiT of ``path`` where ``options`` want it: on the device, parked on the CPU (--offload), or
    with its last --blocks_to_swap blocks on the CPU behind a :class:`BlockSwap` (returned, else None)."""
    park = "cpu" if options.offload else options.device
    if options.blocks_to_swap:
        check_blocks_to_swap(options.blocks_to_swap, read_mmdit_config(path).depth)
    mmdit = load_mmdit(path, dtype=options.dtype, device="cpu" if options.blocks_to_swap else park, mmap=options.mmap)
    align_cpu_tensors(mmdit)
    swap = None
    if options.blocks_to_swap:
        swap = BlockSwap(mmdit.joint_blocks, options.blocks_to_swap, options.device)
        place_model(mmdit, swap, park)
    return mmdit, swap


def place_mmdit(models: ModelSet, device: str) -> None:
    """The MMDiT on ``device``, its swapped blocks (if any) staying on their CPU copies."""
    swap = models.swap if models.swap is not None and models.swap.blocks is models.mmdit.joint_blocks else None
    if swap is not None:
        swap.invalidate()  # weights may have changed since the last render (e.g. a merged network)
    place_model(models.mmdit, swap, device)


@torch.no_grad()
def encode(models: ModelSet, prompts: Sequence[str]) -> Conditioning:
    """Encode ``prompts`` on the compute device (encoders go back to the CPU afterwards)."""
    if models.encoders is None:
        raise RuntimeError("text encoders were freed before all prompts were encoded")
    opts = models.options
    for module in models.encoders.present().values():
        module.to(opts.device)
    try:
        return encode_prompts(models.encoders, models.tokenizers, list(prompts), t5_max_length=opts.t5_max_length,
                              apply_lg_attn_mask=opts.apply_lg_attn_mask, apply_t5_attn_mask=opts.apply_t5_attn_mask,
                              layout=models.layout, device=opts.device, dtype=torch.float32)
    finally:
        for module in models.encoders.present().values():
            module.to("cpu")


@torch.no_grad()
def render(
    models: ModelSet,
    cond: Conditioning,
    uncond: Conditioning | None,
    params: SamplingParams,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Image.Image]]:
    """Sample latents for ``cond`` (batch of B) and decode them: (latents float32 CPU, B images).

    ``noise`` (B, 16, H/8, W/8) replaces the seeded draw of ``params.seed``.
    """
    device = models.options.device
    place_mmdit(models, device)
    latents = sample_latents(models.mmdit, cond, uncond, params, noise=noise)
    if models.options.offload:
        place_mmdit(models, "cpu")
    models.vae.to(device)
    images = tensor_to_images(models.vae.decode(latents))
    if models.options.offload:
        models.vae.to("cpu")
    return latents.cpu(), images

"""Model flags of the trainers and cache tools (sd-scripts' SD3 names)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from library.errors import UserError

if TYPE_CHECKING:
    import torch

MIXED_PRECISIONS = ("no", "fp16", "bf16")  # torch is imported when a dtype is needed, so --help stays instant


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--pretrained_model_name_or_path", help="SD3 / SD3.5 single-file checkpoint (.safetensors)")
    g.add_argument("--clip_l", help="separate CLIP-L file (else from the checkpoint)")
    g.add_argument("--clip_g", help="separate CLIP-G file (else from the checkpoint)")
    g.add_argument("--t5xxl", help="separate T5-XXL file (else from the checkpoint)")
    g.add_argument("--vae", help="separate VAE file (else from the checkpoint)")
    g.add_argument("--tokenizer_cache_dir", help="folder with tokenizer/, tokenizer_2/, tokenizer_3/")
    g.add_argument("--t5xxl_max_token_length", type=int, default=256)
    g.add_argument("--apply_lg_attn_mask", action="store_true")
    g.add_argument("--apply_t5_attn_mask", action="store_true")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISIONS, default="no")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda if available)")


def checkpoint_path(ns: argparse.Namespace) -> Path:
    if not ns.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (an SD3 / SD3.5 .safetensors file)")
    path = Path(ns.pretrained_model_name_or_path)
    if not path.is_file():
        raise UserError(f"--pretrained_model_name_or_path {path}: file not found")
    return path


def device(ns: argparse.Namespace) -> str:
    import torch

    if ns.device:
        return ns.device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def weight_dtype(ns: argparse.Namespace, dev: str) -> torch.dtype:
    import torch

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[ns.mixed_precision]
    if dtype == torch.float16 and not dev.startswith(("cuda", "mps")):
        raise UserError("--mixed_precision fp16 needs a GPU (fp16 matmuls on a CPU are ~1000x slower); use bf16 or no")
    return dtype

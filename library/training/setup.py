"""From the typed run config to the objects a run needs: math specs, models, data, optimizer, scheduler."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from library.config import RunConfig
from library.errors import UserError
from library.flow.loss import LossSpec
from library.flow.timesteps import TimestepSpec
from library.flow.weighting import resolve_weighting_scheme
from library.models.loading import load_mmdit
from library.models.mmdit import MMDiT
from library.models.prompt_encoding import TextLayout, layout_from_encoders
from library.models.text_encoders import TextEncoders, load_text_encoders
from library.models.tokenizers import Tokenizers, load_tokenizers
from library.models.vae import SD3VAE, load_vae
from library.runtime.block_swap import align_cpu_tensors, check_blocks_to_swap
from library.training.caching import file_identity, identity_of
from library.training.optimizers import build_optimizer, parse_optimizer_args
from library.training.schedulers import SchedulerConfig, build_scheduler, parse_scheduler_args
from library.training.step import StepSettings

logger = logging.getLogger(__name__)

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_settings(cfg: RunConfig) -> StepSettings:
    """The flow-matching math of a run (DESIGN §4), from --weighting_scheme and friends."""
    flow = cfg.flow
    try:
        sampling, weighting = resolve_weighting_scheme(flow.weighting_scheme, flow.timestep_sampling, flow.loss_weighting)
        timesteps = TimestepSpec(sampling=sampling, shift=flow.training_shift, logit_mean=flow.logit_mean,
                                 logit_std=flow.logit_std, mode_scale=flow.mode_scale,
                                 min_timestep=flow.min_timestep, max_timestep=flow.max_timestep)
        loss = LossSpec(objective=flow.model_prediction_type, loss_type=flow.loss_type, weighting=weighting,
                        huber_c=flow.huber_c, huber_scale=flow.huber_scale, huber_schedule=flow.huber_schedule)
    except ValueError as exc:
        raise UserError(f"training math flags: {exc}") from None
    return StepSettings(timesteps=timesteps, loss=loss, masked_loss=flow.masked_loss,
                        clip_l_dropout_rate=cfg.train.clip_l_dropout_rate,
                        clip_g_dropout_rate=cfg.train.clip_g_dropout_rate, t5_dropout_rate=cfg.train.t5_dropout_rate,
                        t5_max_length=cfg.model.t5xxl_max_token_length,
                        apply_lg_attn_mask=cfg.model.apply_lg_attn_mask, apply_t5_attn_mask=cfg.model.apply_t5_attn_mask)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_seed(cfg: RunConfig) -> int:
    return cfg.train.seed if cfg.train.seed is not None else random.randint(0, 2**31 - 1)


def weight_dtypes(cfg: RunConfig, device: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype of trained modules, autocast dtype or None).

    --full_bf16 / --full_fp16 store the trained weights (and so their gradients) in the half dtype of
    --mixed_precision; fp16 of either kind needs a GPU (DESIGN §6: never compute fp16 on a CPU).
    """
    t = cfg.train
    precision = PRECISIONS.get(t.mixed_precision)
    if precision is None:
        raise UserError(f"--mixed_precision {t.mixed_precision!r}: choose no, fp16 or bf16")
    if t.full_bf16 and t.full_fp16:
        raise UserError("--full_bf16 and --full_fp16 exclude each other; pick one")
    gpu = device.startswith(("cuda", "mps"))
    if t.full_fp16 and not gpu:
        raise UserError("--full_fp16 needs a GPU (fp16 matmuls on a CPU are ~1000x slower); use --full_bf16 "
                        "--mixed_precision bf16")
    if precision == torch.float16 and not gpu:
        raise UserError("--mixed_precision fp16 needs a GPU (fp16 matmuls on a CPU are ~1000x slower); use bf16 or no")
    for flag, wanted in (("full_bf16", torch.bfloat16), ("full_fp16", torch.float16)):
        if getattr(t, flag) and precision != wanted:
            raise UserError(f"--{flag} needs --mixed_precision {'bf16' if wanted == torch.bfloat16 else 'fp16'}")
    weights = precision if (t.full_bf16 or t.full_fp16) else torch.float32
    return weights, (None if precision == torch.float32 else precision)


@dataclass
class Models:
    mmdit: MMDiT
    vae: SD3VAE | None
    encoders: TextEncoders | None
    tokenizers: Tokenizers
    layout: TextLayout
    checkpoint: Path


def load_models(cfg: RunConfig, device: str, weights: torch.dtype) -> Models:
    """Every model of the run on ``device``; with --blocks_to_swap the MMDiT stays on the CPU until the swap is
    attached (only its resident part then moves), with --lowram it is read tensor by tensor onto its device."""
    m = cfg.model
    if not m.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (an SD3 / SD3.5 .safetensors file)")
    ckpt = Path(m.pretrained_model_name_or_path)
    mmap = not m.disable_mmap_load_safetensors
    swap = m.blocks_to_swap or 0
    if swap:
        from library.models.loading import read_mmdit_config

        check_blocks_to_swap(swap, read_mmdit_config(ckpt).depth)
    if m.lowram:
        mmdit = stream_mmdit(ckpt, weights, device, swap)
    else:
        mmdit = load_mmdit(ckpt, dtype=weights, device="cpu" if swap else device, mmap=mmap)
    align_cpu_tensors(mmdit)
    mmdit.pos_emb_random_crop_rate = m.pos_emb_random_crop_rate
    encoders = load_text_encoders(ckpt, m.clip_l, m.clip_g, m.t5xxl, dtype=weights, device=device, mmap=mmap)
    tokenizers = load_tokenizers(m.tokenizer_cache_dir, t5_max_length=m.t5xxl_max_token_length)
    vae = load_vae(m.vae or ckpt, dtype=torch.float32, device=device, mmap=mmap)
    layout = replace(layout_from_encoders(encoders), context_dim=mmdit.config.context_dim)
    return Models(mmdit, vae, encoders, tokenizers, layout, ckpt)


def stream_mmdit(ckpt: Path, dtype: torch.dtype, device: str, swapped: int = 0) -> MMDiT:
    """--lowram: the MMDiT read tensor by tensor straight onto the device it will live on (the CPU for the
    last ``swapped`` joint blocks) and cast there, so the whole model is never held in CPU RAM."""
    from safetensors import safe_open

    from library.models.loading import build_mmdit, read_mmdit_config
    from library.models.mmdit_config import split_mmdit_keys

    cfg = read_mmdit_config(ckpt)
    first_swapped = cfg.depth - swapped

    def home(key: str) -> str:
        parts = key.split(".")
        return "cpu" if parts[0] == "joint_blocks" and int(parts[1]) >= first_swapped else device

    tensors = {}
    try:
        with safe_open(str(ckpt), framework="pt", device="cpu") as f:
            prefix, keys = split_mmdit_keys(list(f.keys()))
            for key in keys:
                tensor = f.get_tensor(prefix + key).to(home(key))
                tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise UserError(f"checkpoint {ckpt} could not be read ({exc}); re-download or re-save it") from None
    model = build_mmdit(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    logger.info("--lowram: loaded the MMDiT tensor by tensor onto %s%s", device,
                f" (joint blocks {first_swapped}+ onto the CPU)" if swapped else "")
    return model.eval()


def identities(cfg: RunConfig, ckpt: Path) -> tuple[str, str]:
    """(VAE identity, text-encoder identity) recorded in the caches."""
    m = cfg.model
    vae = file_identity(m.vae or ckpt, "fp32")
    parts = dict(clip_l=file_identity(m.clip_l or ckpt), clip_g=file_identity(m.clip_g or ckpt),
                 t5=file_identity(m.t5xxl or ckpt), dtype=cfg.train.mixed_precision)
    net = cfg.network
    if net is not None and net.base_weights:  # networks merged into the encoders change their outputs
        mults = net.base_weights_multiplier or (1.0,) * len(net.base_weights)
        parts["base_weights"] = [(file_identity(p), m) for p, m in zip(net.base_weights, mults)]
    return vae, identity_of(**parts)


def optimizer_and_scheduler(cfg: RunConfig, groups: list[dict], total_steps: int):
    o = cfg.optimizer
    optimizer = build_optimizer(o.optimizer_type, groups, cfg.train.learning_rate, parse_optimizer_args(o.optimizer_args),
                                max_grad_norm=cfg.train.max_grad_norm)
    sched_cfg = SchedulerConfig(name=o.lr_scheduler, warmup_steps=o.lr_warmup_steps, decay_steps=o.lr_decay_steps,
                                num_cycles=o.lr_scheduler_num_cycles, power=o.lr_scheduler_power,
                                min_lr_ratio=o.lr_scheduler_min_lr_ratio, timescale=o.lr_scheduler_timescale,
                                options=parse_scheduler_args(o.lr_scheduler_args), scheduler_type=o.lr_scheduler_type)
    return optimizer, build_scheduler(optimizer, sched_cfg, total_steps)


def make_work_dir(output_dir: str) -> Path:
    """The folder for caches not kept beside the images: one per output folder, shared by every process
    of a run on this machine (so each rank can cache its share), reused by a resumed run."""
    import hashlib
    import tempfile

    tag = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"sd3_trainer_cache_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder

"""Flags of the trainers (sd3_train.py, sd3_train_network.py) -> a frozen :class:`RunConfig`.

The training flags are generated from the config dataclasses (name, type, default, choices), so the
parser and the config cannot drift apart; model, dataset and cache flags come from
``library.cli.models`` / ``library.cli.data``. :func:`parse_train_args` parses once (config file
first, then the command line over it) and returns the config plus the namespace, which the entry
script uses only to build the dataset blueprint and cache options. Typical entry script::

    cfg, ns = parse_train_args(argv)
    if ns.output_config:
        write_output_config(cfg, ns)
        return

Importing this module loads no torch: ``--help`` and config checks are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from library.cli import ArgumentParser
from library.cli import config_file
from library.cli.compat import IGNORED_FLAGS, SAVE_MODEL_AS, add_ignored_flags, ignored_flag_notices
from library.cli.data import add_cache_flags, add_dataset_flags
from library.cli.models import add_model_flags
from library.config import CHOICES, NETWORK_ONLY, SECTIONS, RunConfig
from library.errors import UserError

logger = logging.getLogger(__name__)

GROUP_TITLES = {"model": "models (training options)", "train": "training",
                "flow": "flow matching (timesteps, objective, loss)",
                "optimizer": "optimizer and lr schedule", "save": "saving, resuming and metadata",
                "sample": "sample images during training", "log": "logging",
                "validation": "validation loss (held-out images: --validation_split)",
                "ema": "EMA of the trained weights",
                "network": "network (LoRA / LoKr)"}
ALIASES = {"learning_rate_te1": ("text_encoder_lr1",), "learning_rate_te2": ("text_encoder_lr2",),
           "learning_rate_te3": ("text_encoder_lr3",)}
HELP = {
    "max_train_steps": "optimizer steps to train (default 1600; --max_train_epochs wins)",
    "learning_rate_te1": "CLIP-L learning rate with --train_text_encoder (default --learning_rate)",
    "learning_rate_te2": "CLIP-G learning rate with --train_text_encoder (default --learning_rate)",
    "learning_rate_te3": "T5-XXL learning rate with --train_t5xxl (default --learning_rate)",
    "train_text_encoder": "also train CLIP-L and CLIP-G", "train_t5xxl": "also train T5-XXL",
    "num_last_block_to_freeze": "freeze the last N MMDiT blocks",
    "full_bf16": "bf16 weights and gradients (with --mixed_precision bf16)",
    "full_fp16": "fp16 weights and gradients (with --mixed_precision fp16; GPU only)",
    "blocks_to_swap": "keep the last N MMDiT blocks on the CPU, streamed to the GPU around use (max depth - 2)",
    "blocks_to_swap_while_sampling": "block swap while rendering samples (default --blocks_to_swap)",
    "fused_backward_pass": "optimizer step inside backward, per parameter (Adafactor, AdamW, Adam, SGD; full fine-tune)",
    "blockwise_fused_optimizers": "one optimizer per block group, stepped during backward (full fine-tune)",
    "cpu_offload_checkpointing": "keep checkpointed activations in CPU memory (with --gradient_checkpointing)",
    "mem_eff_save": "write saved tensors one by one, without a second copy of the model in RAM",
    "highvram": "keep the VAE and text encoders on the GPU between uses",
    "lowram": "load weights straight to the GPU (less CPU RAM)",
    "max_bad_steps": "stop after this many consecutive steps with a NaN/inf loss (default 10)",
    "fp8_base": "keep the frozen base weights in float8_e4m3fn (network training)",
    "pos_emb_random_crop_rate": "probability of a random position-embedding crop (SD3.5-M)",
    "enable_scaled_pos_embed": "per-resolution scaled position embeddings (SD3.5-M, experimental)",
    "weighting_scheme": "sigma density and loss weighting in one (sd-scripts' flag)",
    "timestep_sampling": "sigma density only, overriding --weighting_scheme's",
    "loss_weighting": "loss weighting only, overriding --weighting_scheme's",
    "training_shift": "shift of the training sigma distribution (1 = none; > 1 toward noise)",
    "min_timestep": "lowest sigma*1000 trained", "max_timestep": "highest sigma*1000 trained",
    "model_prediction_type": "sd3: compare the denoised estimate with x0 (sd-scripts); raw: plain velocity loss",
    "masked_loss": "weight the loss by the image's mask (alpha_mask / conditioning images)",
    "optimizer_type": "sd-scripts name (AdamW, AdamW8bit, Prodigy, ...) or package.module.Class",
    "optimizer_args": "optimizer keyword arguments as key=value items",
    "lr_scheduler": "constant, constant_with_warmup, cosine, linear, ... (sd-scripts names)",
    "lr_warmup_steps": "warmup steps: a count, a ratio < 1 or N%% of the total",
    "lr_decay_steps": "decay steps (warmup_stable_decay): a count, a ratio < 1 or N%% of the total",
    "lr_scheduler_args": "scheduler keyword arguments as key=value items",
    "lr_scheduler_type": "a scheduler class (module.Class; bare names from torch.optim.lr_scheduler)",
    "save_precision": "dtype of saved weights (default: as trained)",
    "save_model_as": "safetensors (other sd-scripts values are accepted and saved as safetensors)",
    "resume": "training-state folder to resume from", "save_clip": "include CLIP-L/G in saved checkpoints",
    "save_t5xxl": "include T5-XXL in saved checkpoints", "sample_prompts": "prompt file (.txt, .toml or .json)",
    "sample_shift": "flow shift of the sample images (default: the model's)",
    "sample_ema": "render samples with the EMA weights (needs --ema)",
    "log_with": "tensorboard, wandb or all (needs --logging_dir for tensorboard)",
    "logging_dir": "folder of the tracker logs (one subfolder per run)",
    "log_prefix": "prefix of the run's log subfolder", "log_tracker_name": "tracker project name",
    "log_tracker_config": "TOML file of tracker init options", "log_config": "record the run's settings in the tracker (secrets redacted)",
    "wandb_api_key": "W&B API key (never logged)", "wandb_run_name": "W&B run name",
    "validate_every_n_steps": "validation loss every N steps", "validate_every_n_epochs": "validation loss every N epochs",
    "max_validation_steps": "validation batches per evaluation (default: all)",
    "ema": "keep an exponential moving average of the trained weights; saved as <name>_ema",
    "ema_decay": "EMA decay per update (0 = the raw weights)", "ema_update_every": "update the EMA every N steps",
    "ema_device": "where the EMA lives: cpu (saves GPU memory) or gpu",
    "fp8_base_unet": "keep only the frozen MMDiT in float8_e4m3fn (network training)",
    "network_module": "networks.lora_sd3 or networks.lokr_sd3 (lycoris.kohya with algo=lokr|lora is mapped)",
    "network_dim": "rank of the network (default 4; LoKr: a huge value or full_matrix=True for full factors)",
    "network_alpha": "alpha: scale = alpha / rank (default 1)",
    "network_dropout": "neuron dropout on the down projection's output (training only)",
    "network_args": "key=value network options (see networks/lora_sd3.py and lokr_sd3.py)",
    "network_weights": "start from this network file", "dim_from_weights": "take ranks from --network_weights",
    "network_multiplier": "strength of the network while training (default 1)",
    "network_train_unet_only": "no modules on the text encoders",
    "network_train_text_encoder_only": "no modules on the MMDiT",
    "unet_lr": "MMDiT learning rate (default --learning_rate)",
    "text_encoder_lr": "1-3 learning rates: CLIP-L [CLIP-G [T5]] (default --learning_rate; 0 freezes)",
    "base_weights": "network files merged into the base model before training",
    "base_weights_multiplier": "one multiplier per --base_weights file (default 1)",
    "scale_weight_norms": "max-norm regularisation of each module's delta weight (e.g. 1.0)",
    "no_metadata": "write no ss_* metadata into the network file",
    "training_comment": "free text stored as ss_training_comment",
}


def steps_value(text: str) -> int | float | str:
    """``--lr_warmup_steps`` forms: ``100``, ``0.05`` or ``"5%"`` (kept raw until the total is known)."""
    value = text.strip()
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    try:
        float(value[:-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count, a ratio < 1 or 'N%', got {text!r}") from None
    if not value.endswith("%"):
        raise argparse.ArgumentTypeError(f"expected a step count, a ratio < 1 or 'N%', got {text!r}")
    return value


def _argument_options(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a config field of type ``hint``."""
    if hint is bool:
        return {"action": "store_true"}
    if typing.get_origin(hint) is tuple:
        return {"nargs": "*", "default": default, "type": typing.get_args(hint)[0]}
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if len(kinds) > 1:
        return {"type": steps_value, "default": default}
    return {"type": kinds[0], "default": default}


def _sections(network: bool) -> dict[str, type]:
    return {name: cls for name, cls in SECTIONS.items() if network or name not in NETWORK_ONLY}


def add_config_flags(p: argparse.ArgumentParser, network: bool = False) -> None:
    """One flag per config field not defined yet (model/data/cache flags come first); the network
    section's flags only with ``network``."""
    known = {option[2:] for option in p._option_string_actions}
    for section, cls in _sections(network).items():
        hints = typing.get_type_hints(cls)
        group = None
        for f in dataclasses.fields(cls):
            if f.name in known:
                continue
            group = group or p.add_argument_group(GROUP_TITLES[section])
            options = _argument_options(hints[f.name], f.default)
            if f.name in CHOICES:
                options["choices"] = SAVE_MODEL_AS if f.name == "save_model_as" else CHOICES[f.name]
            help_text = HELP.get(f.name, "")
            if not options.get("action") and f.default not in (None, ()) and "default" not in help_text:
                help_text += f" (default {f.default})"
            names = [f"--{f.name}", *(f"--{alias}" for alias in ALIASES.get(f.name, ()))]
            group.add_argument(*names, help=help_text.strip() or None, **options)


def train_parser(network: bool = False) -> argparse.ArgumentParser:
    what = "LoRA / LoKr networks for" if network else ""
    p = ArgumentParser(description=f"Train {what} SD3 / SD3.5 (flags as in kohya-ss/sd-scripts).".replace("  ", " "))
    p.add_argument("--config_file", help="TOML of flag names (flat or in [sections]); command-line flags override it")
    p.add_argument("--stages", help="TOML of [[stage]] tables: a curriculum run in one invocation, each stage "
                   "overriding flags and starting from the previous stage's weights (see library/cli/stages.py)")
    p.add_argument("--output_config", action="store_true",
                   help="write the resolved flags to --config_file and stop (an existing file is not overwritten)")
    add_model_flags(p)
    add_dataset_flags(p)
    add_cache_flags(p)
    add_config_flags(p, network)
    add_ignored_flags(p)
    return p


def _parse_known(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """parse_args, but an unknown flag's error (exit 2) names the nearest valid flag."""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o for o in parser._option_string_actions if o.startswith("--")]
        hints = []
        for arg in unknown:
            near = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.6)
            hints.append(f"{arg} (did you mean {near[0]}?)" if near and arg.startswith("--") else arg)
        parser.error(f"unrecognized arguments: {' '.join(hints)}")
    return ns


def run_config(ns: argparse.Namespace, network: bool = False) -> RunConfig:
    """The frozen config of parsed flags (each section's fields by flag name)."""
    parts = {}
    for section, cls in _sections(network).items():
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(ns, f.name)
            if isinstance(value, (list, tuple)):
                value = tuple(value)
            elif isinstance(value, Path):
                value = str(value)
            values[f.name] = value
        if section == "save":
            values["save_model_as"] = "safetensors"  # other sd-scripts formats get a notice
        parts[section] = cls(**values)
    return RunConfig(**parts)


def parse_train_args(argv: Sequence[str] | None = None,
                     network: bool = False) -> tuple[RunConfig, argparse.Namespace]:
    """Parse the trainer's flags once: ``--config_file`` values first, the command line over them.

    Logs one warning per sd-scripts flag that has no effect here. With ``--output_config`` the file is
    not read (it is the output: see :func:`write_output_config`). Unknown flags exit 2 (argparse);
    problems in the config file or in values raise :class:`UserError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = train_parser(network)
    ns = _parse_known(parser, argv)
    if ns.output_config and not ns.config_file:
        raise UserError("--output_config needs --config_file PATH (the file to write)")
    if ns.config_file and not ns.output_config:
        file_argv = config_file.read_config_file(config_file.config_path(ns.config_file), train_parser(network))
        ns = _parse_known(parser, [*file_argv, *argv])
    for notice in ignored_flag_notices(ns):
        logger.warning(notice)
    return run_config(ns, network), ns


def data_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """The dataset/cache flags that were set (not part of :class:`RunConfig`), for a config file."""
    skip = {*RunConfig.flag_names(), *IGNORED_FLAGS, *config_file.NOT_IN_FILES}
    values = {}
    for name, value in vars(ns).items():
        if name in skip or value is None:
            continue
        values[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return values


def write_output_config(cfg: RunConfig, ns: argparse.Namespace) -> Path:
    """``--output_config``: the resolved flags as a sectioned TOML at the ``--config_file`` path."""
    path = config_file.config_path(ns.config_file)
    tables = {**cfg.to_toml_dict(sections=True), "data": data_flags(ns)}
    written = config_file.write_config_file(path, tables)
    logger.info("wrote %s", written)
    return written


@dataclasses.dataclass
class TrainingRun:
    """What an entry script hands to its trainer: the config, the dataset blueprint and cache options."""

    cfg: RunConfig
    blueprint: Any
    cache: Any
    vae_batch_size: int
    text_batch_size: int


def start_training(argv: Sequence[str] | None, run_one, *, network: bool) -> TrainingRun | Path | None:
    """The part of sd3_train.py / sd3_train_network.py before their trainer: parse the flags, then either
    run the --stages curriculum with ``run_one`` (its final file is returned), write --output_config or the
    --debug_dataset view (None is returned), or return the :class:`TrainingRun` to train."""
    from library.cli import data as data_flags

    cfg, ns = parse_train_args(argv, network=network)
    if ns.stages:
        from library.cli.stages import run_stages

        return run_stages(argv, run_one, network=network)
    if ns.output_config:
        print(f"wrote {write_output_config(cfg, ns)}")
        return None
    blueprint = data_flags.dataset_blueprint(ns)
    if ns.debug_dataset:
        from library.data.dataset import TrainingData
        from library.data.debug_view import write_debug_view

        report, png = write_debug_view(TrainingData(blueprint, seed=cfg.train.seed or 0), cfg.save.output_dir)
        print(report, f"contact sheet: {png}", sep="\n")
        return None
    from library.training.setup import make_work_dir

    m = cfg.model
    cache = data_flags.cache_options(ns, t5_max_length=m.t5xxl_max_token_length, apply_lg_attn_mask=m.apply_lg_attn_mask,
                                     apply_t5_attn_mask=m.apply_t5_attn_mask, temp_dir=make_work_dir(cfg.save.output_dir))
    return TrainingRun(cfg, blueprint, cache, ns.vae_batch_size,
                       ns.text_encoder_batch_size or max(1, ns.train_batch_size or 1))

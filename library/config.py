"""The typed, frozen run configuration of the trainers (DESIGN §2).

Field names are sd-scripts' flag names, so one flat table of flag names (sd-scripts' ``--config_file``
format) maps onto the tree one to one: :meth:`RunConfig.to_toml_dict` / :meth:`RunConfig.from_toml_dict`.
Values are checked on construction (a :class:`UserError` names the flag); nothing mutates a config later.
The dataset and cache flags are not here: the entry script builds the dataset blueprint and cache
options from the parsed flags (``library.cli.data``). This module imports nothing else from the project
but ``library.errors``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Union

from library.config_values import (  # noqa: F401 (flatten_toml, unknown_name_error: re-exported)
    check, check_choices, check_positive, check_rate, coerce, flatten_toml, unknown_name_error,
)

StepCount = Union[int, float, str, None]  # a count, a ratio < 1 or "N%" of the total, kept raw

# Flags with a fixed set of values (the command line offers exactly these; tests pin them to the registries).
CHOICES: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "mixed_precision": ("no", "fp16", "bf16"),
    "weighting_scheme": ("uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap", "none"),
    "timestep_sampling": ("uniform", "logit_normal", "mode"),
    "loss_weighting": ("none", "sigma_sqrt", "cosmap"),
    "model_prediction_type": ("sd3", "raw"),
    "loss_type": ("l2", "l1", "huber", "smooth_l1"),
    "huber_schedule": ("constant", "exponential", "snr"),
    "save_precision": ("fp32", "float", "fp16", "bf16"),
    "save_model_as": ("safetensors",),
    "log_with": ("tensorboard", "wandb", "all"),
    "ema_device": ("cpu", "gpu"),
})


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    vae: str | None = None
    tokenizer_cache_dir: str | None = None
    t5xxl_max_token_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    disable_mmap_load_safetensors: bool = False
    pos_emb_random_crop_rate: float = 0.0
    enable_scaled_pos_embed: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    device: str | None = None
    blocks_to_swap: int | None = None  # the last N joint blocks live on the CPU and stream in around use
    highvram: bool = False
    lowram: bool = False

    def __post_init__(self) -> None:
        check_positive("t5xxl_max_token_length", self.t5xxl_max_token_length)
        check_rate("pos_emb_random_crop_rate", self.pos_emb_random_crop_rate)


@dataclass(frozen=True)
class TrainConfig:
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    learning_rate: float = 1e-6
    learning_rate_te1: float | None = None
    learning_rate_te2: float | None = None
    learning_rate_te3: float | None = None
    train_text_encoder: bool = False
    train_t5xxl: bool = False
    use_t5xxl_cache_only: bool = False
    num_last_block_to_freeze: int | None = None
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    fused_backward_pass: bool = False
    blockwise_fused_optimizers: bool = False
    cpu_offload_checkpointing: bool = False
    seed: int | None = None
    max_bad_steps: int = 10  # NaN/inf guard: stop after this many consecutive non-finite steps
    clip_l_dropout_rate: float = 0.0
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0
    max_data_loader_n_workers: int = 0  # sd-scripts: 8; workers cost more than they save on cached data
    persistent_data_loader_workers: bool = False
    ddp_timeout: int | None = None  # minutes (sd-scripts' --ddp_timeout); None: torch's default

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        check_positive("max_train_steps", self.max_train_steps)
        check_positive("max_train_epochs", self.max_train_epochs)
        check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        check_positive("max_bad_steps", self.max_bad_steps)
        check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_positive("max_data_loader_n_workers", self.max_data_loader_n_workers, allow_zero=True)
        check_positive("num_last_block_to_freeze", self.num_last_block_to_freeze, allow_zero=True)
        for name in ("learning_rate", "learning_rate_te1", "learning_rate_te2", "learning_rate_te3"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate"):
            check_rate(name, getattr(self, name))


@dataclass(frozen=True)
class FlowConfig:
    weighting_scheme: str = "uniform"
    timestep_sampling: str | None = None  # overrides the density part of weighting_scheme
    loss_weighting: str | None = None  # overrides the weighting part of weighting_scheme
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: float | None = None
    max_timestep: float | None = None
    model_prediction_type: str = "sd3"
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    huber_schedule: str = "snr"
    masked_loss: bool = False

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        check_positive("training_shift", self.training_shift)
        check_positive("logit_std", self.logit_std)
        for name in ("min_timestep", "max_timestep"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= 1000, f"--{name} must be in [0, 1000], got {value}")
        if self.min_timestep is not None and self.max_timestep is not None:
            check(self.min_timestep <= self.max_timestep,
                   f"--min_timestep {self.min_timestep} is above --max_timestep {self.max_timestep}")


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()  # "key=value" items, parsed against the optimizer's signature later
    lr_scheduler: str = "constant"
    lr_warmup_steps: StepCount = None
    lr_decay_steps: StepCount = None
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_timescale: int | None = None
    lr_scheduler_args: tuple[str, ...] = ()
    lr_scheduler_type: str | None = None


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str = "output"
    output_name: str = "last"
    save_precision: str | None = None
    save_model_as: str = "safetensors"
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    save_clip: bool = False
    save_t5xxl: bool = False
    mem_eff_save: bool = False
    initial_step: int | None = None
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                     "save_last_n_epochs_state", "save_last_n_steps_state", "initial_epoch"):
            check_positive(name, getattr(self, name))
        check_positive("initial_step", self.initial_step, allow_zero=True)


@dataclass(frozen=True)
class SampleConfig:
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = "euler"
    sample_shift: float | None = None  # default: the model's
    sample_ema: bool = False  # render samples with the EMA weights (with --ema)
    blocks_to_swap_while_sampling: int | None = None  # default: --blocks_to_swap

    def __post_init__(self) -> None:
        check_positive("sample_every_n_steps", self.sample_every_n_steps)
        check_positive("sample_every_n_epochs", self.sample_every_n_epochs)


@dataclass(frozen=True)
class LogConfig:
    log_with: str | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None  # TOML of tracker init kwargs (sd-scripts)
    log_config: bool = False  # record the run's settings in the tracker (secrets redacted)
    wandb_api_key: str | None = None
    wandb_run_name: str | None = None

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)


@dataclass(frozen=True)
class ValidationConfig:
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None  # validation batches per evaluation (default: all)

    def __post_init__(self) -> None:
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class EmaConfig:
    ema: bool = False
    ema_decay: float = 0.999
    ema_update_every: int = 1
    ema_device: str = "cpu"

    def __post_init__(self) -> None:
        check_choices(self, CHOICES)
        check_rate("ema_decay", self.ema_decay)
        check_positive("ema_update_every", self.ema_update_every)


@dataclass(frozen=True)
class NetworkConfig:
    """sd3_train_network.py only: the LoRA/LoKr and how it is trained (sd-scripts' train_network flags)."""

    network_module: str | None = None
    network_dim: int | None = None
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: tuple[str, ...] = ()
    network_weights: str | None = None
    dim_from_weights: bool = False
    network_multiplier: float = 1.0
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = None
    text_encoder_lr: tuple[float, ...] = ()
    base_weights: tuple[str, ...] = ()
    base_weights_multiplier: tuple[float, ...] = ()
    scale_weight_norms: float | None = None
    no_metadata: bool = False
    training_comment: str | None = None

    def __post_init__(self) -> None:
        check_positive("network_dim", self.network_dim)
        check_positive("unet_lr", self.unet_lr, allow_zero=True)
        check_positive("scale_weight_norms", self.scale_weight_norms)
        if self.network_dropout is not None:
            check_rate("network_dropout", self.network_dropout)
        check(len(self.text_encoder_lr) <= 3, f"--text_encoder_lr takes 1 to 3 values (CLIP-L, CLIP-G, T5), "
               f"got {len(self.text_encoder_lr)}")
        check(all(v >= 0 for v in self.text_encoder_lr), "--text_encoder_lr values must be >= 0")
        check(not (self.network_train_unet_only and self.network_train_text_encoder_only),
               "--network_train_unet_only and --network_train_text_encoder_only exclude each other: pick one")
        check(len(self.base_weights_multiplier) in (0, len(self.base_weights)),
               f"--base_weights_multiplier needs one value per --base_weights file ({len(self.base_weights)})")


SECTIONS: Mapping[str, type] = types.MappingProxyType({
    "model": ModelConfig, "train": TrainConfig, "flow": FlowConfig, "optimizer": OptimizerConfig,
    "save": SaveConfig, "sample": SampleConfig, "log": LogConfig, "validation": ValidationConfig,
    "ema": EmaConfig, "network": NetworkConfig,
})
NETWORK_ONLY = ("network",)  # sections whose flags only sd3_train_network.py offers


@dataclass(frozen=True)
class RunConfig:
    """Everything the training engine reads, as one frozen tree (sections of flag-named fields)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    network: NetworkConfig | None = None  # set for network training only

    def __post_init__(self) -> None:
        check(not (self.sample.sample_ema and not self.ema.ema), "--sample_ema renders with the EMA weights: add --ema")

    @staticmethod
    def flag_names() -> tuple[str, ...]:
        """Every flat key (= flag name), section by section."""
        return tuple(f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls))

    def to_toml_dict(self, sections: bool = False) -> dict[str, Any]:
        """Flag name -> value (None left out, tuples as lists); ``sections=True`` nests them per section."""
        nested = {name: _section_dict(getattr(self, name)) for name in SECTIONS if getattr(self, name) is not None}
        return nested if sections else {k: v for part in nested.values() for k, v in part.items()}

    @classmethod
    def from_toml_dict(cls, data: Mapping[str, Any], extra_keys: Collection[str] = ()) -> RunConfig:
        """The config of a flat (or sectioned, sd-scripts flattens tables) table of flag names.

        Keys in ``extra_keys`` (e.g. dataset flags) are skipped; any other unknown key is a UserError
        naming the nearest valid key. Values are type-checked against the fields."""
        flat = flatten_toml(data)
        valid = cls.flag_names()
        for key in flat:
            if key not in valid and key not in extra_keys:
                raise unknown_name_error("key", key, (*valid, *extra_keys))
        parts = {}
        for name, section in SECTIONS.items():
            hints = typing.get_type_hints(section)
            values = {f.name: coerce(f.name, hints[f.name], flat[f.name])
                      for f in dataclasses.fields(section) if f.name in flat}
            if name not in NETWORK_ONLY or values:
                parts[name] = section(**values)
        return cls(**parts)


def _section_dict(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is not None:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out



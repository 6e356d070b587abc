"""Network training (the body of sd3_train_network.py): a LoRA/LoKr over a frozen base.

The base (MMDiT and text encoders) is frozen and stored in the training precision (bf16 with
``--mixed_precision bf16``), or with ``--fp8_base`` / ``--fp8_base_unet`` its Linears in fp8, upcast
per call; the network's parameters stay float32 and compute runs in the autocast dtype. The network
itself is built by the entry script (``library`` never imports ``networks``): it hands in a
:class:`NetworkBuilder` that merges ``--base_weights`` into the loaded models (before anything is
cached) and builds the network (an :class:`AdapterNetwork`) on the parts that are trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from library.config import NetworkConfig, RunConfig
from library.data.dataset import CacheOptions
from library.data.spec import DatasetBlueprint
from library.errors import UserError
from library.models.mmdit import MMDiT
from library.models.text_encoders import TextEncoders
from library.runtime.fp8 import fp8_storage_bytes, store_linears_in_fp8
from library.training import engine, setup
from library.training.checkpoints import save_dtype, save_error
from library.training.loop import LoopHooks, LoopState
from library.training.network_files import network_metadata, parse_network_args, with_hashes

logger = logging.getLogger(__name__)


class AdapterNetwork(Protocol):
    """What the trainer needs of a network (networks.lora_sd3 / lokr_sd3 build one)."""

    kind: str
    groups: dict[str, str]  # module name -> "unet" / "te1" / "te2" / "te3"

    def apply_to(self) -> None: ...

    def param_groups(self, unet_lr: float, text_encoder_lrs: Sequence[float] | None) -> list[dict]: ...

    def state_dict_for_save(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]: ...

    def apply_max_norm_regularization(self, max_norm: float, device: Any = None) -> tuple[int, float, float]: ...


class NetworkBuilder(Protocol):
    def merge_base_weights(self, mmdit: MMDiT, text_encoders: TextEncoders | None) -> None: ...

    def build(self, mmdit: MMDiT | None, text_encoders: TextEncoders | None) -> AdapterNetwork:
        """The network on the given models (None: that part gets no modules), not applied yet."""


class NetworkModel(nn.Module):
    """The network as the prepared module; the frozen MMDiT is held, not registered, so accelerate
    (and DDP) see only the network's parameters. Its forward is the MMDiT's forward."""

    def __init__(self, network: nn.Module, mmdit: MMDiT) -> None:
        super().__init__()
        self.network = network
        self._mmdit = (mmdit,)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._mmdit[0](*args, **kwargs)


class MaxNormHook(LoopHooks):
    """sd-scripts' --scale_weight_norms: rescale modules whose ΔW norm exceeds the limit after each step."""

    def __init__(self, network: AdapterNetwork, max_norm: float, device: torch.device) -> None:
        self.network, self.max_norm, self.device = network, max_norm, device
        self.last: tuple[int, float, float] = (0, 0.0, 0.0)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        self.last = self.network.apply_max_norm_regularization(self.max_norm, self.device)
        if self.last[0]:
            logger.debug("step %d: %d modules scaled to max norm %.3g (mean norm %.3g)", state.global_step,
                         self.last[0], self.max_norm, self.last[1])


@dataclass
class NetworkTrainee:
    cfg: RunConfig
    module: NetworkModel
    network: AdapterNetwork
    mmdit: MMDiT
    device: torch.device

    @property
    def kind(self) -> str:
        return self.network.kind

    def param_groups(self) -> list[dict]:
        net, lr = self.cfg.network, self.cfg.train.learning_rate
        unet_lr = lr if net.unet_lr is None else net.unet_lr
        groups = self.network.param_groups(unet_lr, list(net.text_encoder_lr) or None)
        if not groups:
            raise UserError("the network has nothing to train: every part's learning rate is 0 or it has no "
                            "modules; check --unet_lr/--text_encoder_lr and the per-type dims in --network_args")
        trained = {id(p) for group in groups for p in group["params"]}
        for param in self.module.parameters():
            param.requires_grad_(id(param) in trained)
        return groups

    def state_tensors(self, module: NetworkModel) -> dict[str, torch.Tensor]:
        return dict(module.state_dict())

    def write_model(self, path: Path, module: NetworkModel, settings: dict) -> None:
        net, save = self.cfg.network, self.cfg.save
        tensors = module.network.state_dict_for_save(save_dtype(save.save_precision))
        meta = network_metadata(settings, self.mmdit.config, kind=self.kind, title=save.metadata_title or save.output_name,
                                network_args=parse_network_args(net.network_args), minimal=net.no_metadata)
        try:
            from library.models.safetensors_io import save_safetensors

            save_safetensors(tensors, path, with_hashes(tensors, meta))
        except OSError as exc:
            raise save_error(path, exc) from None
        logger.info("saved %s (%d tensors)", path, len(tensors))

    def step_hooks(self) -> list[LoopHooks]:
        max_norm = self.cfg.network.scale_weight_norms
        return [MaxNormHook(self.network, max_norm, self.device)] if max_norm else []


def trains_text_encoders(net: NetworkConfig) -> bool:
    """Whether the network gets text-encoder modules (not --network_train_unet_only, some te lr > 0)."""
    return not net.network_train_unet_only and (not net.text_encoder_lr or any(net.text_encoder_lr))


def _check(cfg: RunConfig, cache: CacheOptions) -> None:
    if cfg.network is None or not cfg.network.network_module:
        raise UserError("--network_module is required (networks.lora_sd3 or networks.lokr_sd3)")
    if cache.cache_text_encoder_outputs and trains_text_encoders(cfg.network) and "lg" in cache.te_parts:
        raise UserError("--cache_text_encoder_outputs cannot be used while the network trains the text encoders; "
                        "add --network_train_unet_only (or --text_encoder_lr 0), or drop the caching flag")
    if cfg.train.full_bf16:
        logger.warning("--full_bf16: network parameters stay float32; the frozen base is bf16 already")
    if cfg.train.fused_backward_pass or cfg.train.blockwise_fused_optimizers:
        raise UserError("--fused_backward_pass / --blockwise_fused_optimizers save gradient memory of a full "
                        "fine-tune; a network's gradients are small: drop the flag")
    if cfg.train.cpu_offload_checkpointing and not cfg.train.gradient_checkpointing:
        raise UserError("--cpu_offload_checkpointing moves checkpointed activations to the CPU: add "
                        "--gradient_checkpointing")


def _store_fp8(cfg: RunConfig, mmdit: MMDiT, encoders: TextEncoders | None) -> None:
    if not (cfg.model.fp8_base or cfg.model.fp8_base_unet):
        return
    before = fp8_storage_bytes(mmdit)
    count = store_linears_in_fp8(mmdit.joint_blocks)  # the embedders cast their inputs to their weights' dtype
    logger.info("fp8 base: %d MMDiT Linears in float8_e4m3fn (%.1f -> %.1f MiB)", count, before / 2**20,
                fp8_storage_bytes(mmdit) / 2**20)
    if cfg.model.fp8_base and encoders is not None:
        for module in encoders.present().values():  # T5's wo stays: T5 casts its input to wo's dtype
            store_linears_in_fp8(module, skip=lambda name: name.endswith(".wo"))


def _freeze(mmdit: MMDiT, encoders: TextEncoders | None) -> None:
    mmdit.requires_grad_(False).eval()
    for module in (encoders.present().values() if encoders is not None else ()):
        module.requires_grad_(False).eval()


def train_network(cfg: RunConfig, blueprint: DatasetBlueprint, cache: CacheOptions, builder: NetworkBuilder, *,
                  vae_batch_size: int = 1, text_batch_size: int = 8) -> Path:
    """Train a network over the frozen base; returns the final network file's path."""
    _check(cfg, cache)
    trains_text = trains_text_encoders(cfg.network)
    base = setup.PRECISIONS.get(cfg.train.mixed_precision, torch.float32)  # frozen: stored as computed
    prep = engine.prepare_run(cfg, blueprint, cache, weights=base, trains_text=trains_text,
                              batch_sizes=(vae_batch_size, text_batch_size),
                              on_loaded=lambda m: builder.merge_base_weights(m.mmdit, m.encoders))
    models, net = prep.models, prep.cfg.network
    _freeze(models.mmdit, models.encoders)
    network = builder.build(None if net.network_train_text_encoder_only else models.mmdit,
                            models.encoders if trains_text else None)
    _store_fp8(prep.cfg, models.mmdit, models.encoders)
    network.to(prep.accelerator.device, torch.float32)
    network.apply_to()
    models.mmdit.gradient_checkpointing = prep.cfg.train.gradient_checkpointing
    models.mmdit.cpu_offload_checkpointing = prep.cfg.train.cpu_offload_checkpointing
    trainee = NetworkTrainee(prep.cfg, NetworkModel(network, models.mmdit), network, models.mmdit,
                             prep.accelerator.device)
    return engine.train(prep, trainee, _settings(prep))


def _settings(prep: engine.Prepared) -> dict:
    """The run's metadata settings with the learning rates actually used per part."""
    net, lr = prep.cfg.network, prep.cfg.train.learning_rate
    te_lrs = list(net.text_encoder_lr) or [lr]
    return {**engine.settings_meta(prep),
            "unet_lr": lr if net.unet_lr is None else net.unet_lr,
            "text_encoder_lr": te_lrs[0] if len(te_lrs) == 1 else te_lrs}

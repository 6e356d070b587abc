"""What a full fine-tune trains: the MMDiT (minus frozen blocks) and optionally the text encoders.

Learning rates follow sd-scripts: ``--learning_rate`` for the MMDiT, ``--learning_rate_te1/te2/te3``
for CLIP-L/CLIP-G/T5 (unset: the MMDiT's rate; 0: frozen). T5 trains only with ``--train_t5xxl``
and always stays in eval mode (no dropout), as the released model was trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from library.errors import UserError
from library.models.mmdit import MMDiT
from library.models.text_encoders import TextEncoders

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FullTrainSpec:
    learning_rate: float
    learning_rate_te1: float | None = None
    learning_rate_te2: float | None = None
    learning_rate_te3: float | None = None
    train_text_encoder: bool = False
    train_t5xxl: bool = False
    num_last_block_to_freeze: int | None = None
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False  # checkpointed MMDiT block inputs wait in CPU memory


def freeze_last_blocks(mmdit: MMDiT, count: int | None) -> None:
    """Freeze the last ``count`` joint blocks entirely (sd-scripts' --num_last_block_to_freeze)."""
    if not count:
        return
    depth = len(mmdit.joint_blocks)
    if not 0 < count <= depth:
        raise UserError(f"--num_last_block_to_freeze {count} must be between 1 and the model's {depth} blocks")
    for block in list(mmdit.joint_blocks)[depth - count:]:
        block.requires_grad_(False)
    logger.info("froze the last %d of %d joint blocks", count, depth)


def _te_rate(value: float | None, base: float) -> float:
    return base if value is None else value


def param_groups(mmdit: MMDiT, encoders: TextEncoders | None, spec: FullTrainSpec) -> list[dict]:
    """Optimizer parameter groups with their learning rates; frozen parts get requires_grad False."""
    mmdit.requires_grad_(True)
    freeze_last_blocks(mmdit, spec.num_last_block_to_freeze)
    groups = [{"params": [p for p in mmdit.parameters() if p.requires_grad], "lr": spec.learning_rate, "name": "mmdit"}]
    trained = {
        "clip_l": (spec.train_text_encoder, _te_rate(spec.learning_rate_te1, spec.learning_rate)),
        "clip_g": (spec.train_text_encoder, _te_rate(spec.learning_rate_te2, spec.learning_rate)),
        "t5xxl": (spec.train_t5xxl, _te_rate(spec.learning_rate_te3, spec.learning_rate)),
    }
    for name, module in (encoders.present() if encoders is not None else {}).items():
        train, lr = trained[name]
        module.requires_grad_(bool(train and lr > 0))
        if train and lr > 0:
            groups.append({"params": list(module.parameters()), "lr": lr, "name": name})
    return groups


def enable_gradient_checkpointing(mmdit: MMDiT, encoders: TextEncoders | None, spec: FullTrainSpec) -> None:
    if not spec.gradient_checkpointing:
        return
    mmdit.gradient_checkpointing = True
    mmdit.cpu_offload_checkpointing = spec.cpu_offload_checkpointing
    for name, module in (encoders.present() if encoders is not None else {}).items():
        if (name == "t5xxl" and spec.train_t5xxl) or (name != "t5xxl" and spec.train_text_encoder):
            module.gradient_checkpointing_enable()


class FullModel(nn.Module):
    """The trained modules under one parent, so accelerate prepares (and DDP wraps) them together.

    ``train()`` keeps T5 in eval mode: its dropout must stay off even when it is trained.
    ``fused_update`` ("parameter", "block" or None) tells the training loop to step the optimizer inside
    backward (:mod:`library.training.fused`).
    """

    def __init__(self, mmdit: MMDiT, encoders: TextEncoders | None, fused_update: str | None = None) -> None:
        super().__init__()
        self.mmdit = mmdit
        self.text_encoders = nn.ModuleDict(dict(encoders.present()) if encoders is not None else {})
        self.fused_update = fused_update

    def train(self, mode: bool = True) -> "FullModel":
        super().train(mode)
        for name, module in self.text_encoders.items():
            module.train(mode and name != "t5xxl" and any(p.requires_grad for p in module.parameters()))
        return self

    def forward(self, *args, **kwargs) -> torch.Tensor:  # the MMDiT's forward
        return self.mmdit(*args, **kwargs)

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

"""LoRA and LoKr modules that wrap a frozen ``nn.Linear`` from outside.

``apply_to()`` replaces the Linear's ``forward`` with an instance attribute (the module itself is
untouched, so the model's ``state_dict`` keys do not change); ``restore()`` undoes it and
``merge_to()`` folds ``multiplier · ΔW`` into the Linear's weight. The math lives in
``networks.functional``; these classes only hold parameters and route calls.

A split-qkv LoRA holds one (down, up) pair per output part; it computes and saves as one combined
LoRA with down = cat(downs) (n·r, in), up = block_diag(ups) (out, n·r) and alpha · n, which keeps
ΔW = (alpha / r) · up @ down identical to sd-scripts' split form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from library.errors import UserError

from networks.functional.lokr import (
    LokrTensors, lokr_bake_scalar, lokr_bypass, lokr_rank, lokr_scale, lokr_w1, lokr_w2, merge_lokr,
)
from networks.functional.lora import lora_bypass, lora_scale, merge_lora


class AdapterModule(nn.Module):
    """Common hooking logic: holds the wrapped Linear without registering it as a child."""

    def __init__(self, name: str, base: nn.Linear, multiplier: float = 1.0) -> None:
        super().__init__()
        self.lora_name = name
        self.multiplier = multiplier
        self.rank_dropout = 0.0
        self.module_dropout = 0.0
        self._base: tuple[nn.Linear] = (base,)
        self._orig_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.enabled = True

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    def apply_to(self) -> None:
        """Route the Linear's calls through this module (idempotent); the base stays frozen."""
        if self._orig_forward is not None:
            return
        self.base.requires_grad_(False)
        self._orig_forward = self.base.forward
        self.base.forward = self.forward

    def restore(self) -> None:
        """Give the Linear its own forward back."""
        if self._orig_forward is None:
            return
        del self.base.forward
        self._orig_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._orig_forward is None:
            raise RuntimeError(f"{self.lora_name} is not applied; call apply_to() first")
        base_out = self._orig_forward(x)
        if not self.enabled or self.multiplier == 0.0:
            return base_out
        dtype = self.compute_dtype()
        out = self.bypass(x.to(dtype), base_out.to(dtype))
        return out.to(base_out.dtype)

    def compute_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """weight ← weight + multiplier · ΔW (the module's own multiplier by default)."""
        if multiplier is not None:
            self.multiplier = multiplier
        self.base.weight.copy_(self.merged_weight(self.base.weight))


class LoRAModule(AdapterModule):
    """LoRA on one Linear; ``downs``/``ups`` hold one pair, or one per part when split (qkv)."""

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        downs: list[torch.Tensor],
        ups: list[torch.Tensor],
        alpha: float | None,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__(name, base, multiplier)
        self.lora_down = nn.ParameterList(nn.Parameter(d) for d in downs)
        self.lora_up = nn.ParameterList(nn.Parameter(u) for u in ups)
        self.rank = int(downs[0].shape[0])
        self.alpha = float(alpha) if alpha else float(self.rank)
        self.scale = lora_scale(alpha, self.rank)

    @property
    def num_parts(self) -> int:
        return len(self.lora_down)

    def combined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (n·r, in), up (out, n·r)): the split parts as one LoRA of rank n·r."""
        if self.num_parts == 1:
            return self.lora_down[0], self.lora_up[0]
        down = torch.cat(list(self.lora_down), dim=0)  # n × (r, in) -> (n·r, in)
        up = torch.block_diag(*self.lora_up)  # n × (out/n, r) -> (out, n·r)
        return down, up

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down, up = self.combined()
        return lora_bypass(
            x, base_out, down, up, self.scale * self.multiplier,
            rank_dropout=self.rank_dropout, module_dropout=self.module_dropout, training=self.training,
        )

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        down, up = self.combined()
        return merge_lora(weight, down, up, self.scale, self.multiplier)

    def save_tensors(self) -> dict[str, torch.Tensor]:
        """sd-scripts tensors (combined form) without the name prefix."""
        down, up = self.combined()
        alpha = torch.tensor(self.alpha * self.num_parts)
        return {"lora_down.weight": down.detach(), "lora_up.weight": up.detach(), "alpha": alpha}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``save_tensors`` (shapes already checked by the caller)."""
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        n, r = self.num_parts, self.rank
        out_part = up.shape[0] // n
        if n > 1:
            mask = torch.block_diag(*[torch.ones(out_part, r, dtype=torch.bool)] * n)
            if up[~mask].abs().max() > 0:  # a plain qkv LoRA cannot be split without losing its cross terms
                raise UserError(f"{self.lora_name}: the file's qkv LoRA is not split per q/k/v; "
                                "load it without split_qkv in --network_args")
        for i in range(n):
            self.lora_down[i].copy_(down[i * r:(i + 1) * r])
            self.lora_up[i].copy_(up[i * out_part:(i + 1) * out_part, i * r:(i + 1) * r])
        self.alpha = float(tensors["alpha"]) / n if "alpha" in tensors else float(r)
        self.scale = lora_scale(self.alpha, r)

    def up_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_up)

    def delta_shape(self) -> tuple[int, int]:
        """(out, in) of ΔW."""
        return sum(int(u.shape[0]) for u in self.lora_up), int(self.lora_down[0].shape[1])


class LoKrModule(AdapterModule):
    """LoKr on one Linear; ``tensors`` uses LyCORIS names (``lokr_w1``/``_a``/``_b``, ``lokr_w2``…, ``scalar``)."""

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        tensors: LokrTensors,
        alpha: float | None,
        rank: int,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__(name, base, multiplier)
        self.factors = nn.ParameterDict({k: nn.Parameter(v) for k, v in tensors.items()})
        self.rank = lokr_rank(tensors) or rank
        self.alpha = float(alpha) if alpha else float(self.rank)
        self.scale = lokr_scale(alpha, self.rank, tensors)

    def tensors(self) -> LokrTensors:
        return dict(self.factors.items())

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return lokr_bypass(
            x, base_out, self.tensors(), self.scale * self.multiplier,
            rank_dropout=self.rank_dropout, module_dropout=self.module_dropout, training=self.training,
        )

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return merge_lokr(weight, self.tensors(), self.scale, self.multiplier)

    def save_tensors(self) -> dict[str, torch.Tensor]:
        """LyCORIS tensors (scalar baked into w1) without the name prefix."""
        baked = lokr_bake_scalar({k: v.detach() for k, v in self.factors.items()})
        return {**baked, "alpha": torch.tensor(self.alpha)}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``save_tensors``; a learnable scalar restarts at 1 (it is baked into w1)."""
        for key, param in self.factors.items():
            if key == "scalar":
                param.fill_(1.0)
            else:
                param.copy_(tensors[key])
        self.alpha = float(tensors["alpha"]) if "alpha" in tensors else float(self.rank)
        self.scale = lokr_scale(self.alpha, self.rank, self.tensors())

    def up_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.factors.items() if k in ("lokr_w2", "lokr_w2_b")]

    def delta_shape(self) -> tuple[int, int]:
        """(out, in) of ΔW = (a·b, c·d)."""
        w1, w2 = lokr_w1(self.tensors()), lokr_w2(self.tensors())
        return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1])

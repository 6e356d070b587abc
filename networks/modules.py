"""LoRA and LoKr modules that wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` from outside.

``apply_to()`` replaces the layer's ``forward`` with an instance attribute (the module itself is
untouched, so the model's ``state_dict`` keys do not change); ``restore()`` undoes it and
``merge_to()`` folds ``multiplier · ΔW`` into the layer's weight. The math lives in
``networks.functional``; these classes only hold parameters and route calls. A Conv2d is handled
as a Linear over its flattened weight (out, in·kh·kw): parameters are kept 2-D and reshaped to
the file layout (LoRA down (r, in, kh, kw), up (out, r, 1, 1); LoKr w2 (b, d, kh, kw)) only in
``save_tensors`` / ``load_tensors``.

A split-qkv LoRA holds one (down, up) pair per output part; it computes and saves as one combined
LoRA with down = cat(downs) (n·r, in), up = block_diag(ups) (out, n·r) and alpha · n, which keeps
ΔW = (alpha / r) · up @ down identical to sd-scripts' split form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from library.errors import UserError

from networks.functional.conv import ConvSpec, as_matrix, to_conv_weight, to_pointwise
from networks.functional.lokr import (
    LokrTensors, lokr_bake_scalar, lokr_bypass, lokr_delta, lokr_rank, lokr_scale, lokr_w1, lokr_w2, merge_lokr,
)
from networks.functional.lora import lora_bypass, lora_delta, lora_scale, merge_lora
from networks.functional.max_norm import factor_ratio, max_norm_scale

Layer = nn.Linear | nn.Conv2d


def conv_spec_of(layer: nn.Module) -> ConvSpec | None:
    """The geometry of a Conv2d target; None for a Linear."""
    if not isinstance(layer, nn.Conv2d):
        return None
    padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
    return ConvSpec(tuple(layer.kernel_size), tuple(layer.stride), padding, tuple(layer.dilation), layer.groups)


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear's weight, (out, in·kh·kw) of a Conv2d's."""
    weight = layer.weight
    return int(weight.shape[0]), int(weight[0].numel())


class AdapterModule(nn.Module):
    """Common hooking logic: holds the wrapped layer without registering it as a child."""

    def __init__(self, name: str, base: Layer, multiplier: float = 1.0) -> None:
        super().__init__()
        self.lora_name = name
        self.multiplier = multiplier
        self.rank_dropout = 0.0
        self.module_dropout = 0.0
        self.neuron_dropout = 0.0
        self.conv = conv_spec_of(base)
        self._base: tuple[Layer] = (base,)
        self._orig_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.enabled = True

    @property
    def base(self) -> Layer:
        return self._base[0]

    def apply_to(self) -> None:
        """Route the layer's calls through this module (idempotent); the base stays frozen."""
        if self._orig_forward is not None:
            return
        self.base.requires_grad_(False)
        self._orig_forward = self.base.forward
        self.base.forward = self.forward

    def restore(self) -> None:
        """Give the layer its own forward back."""
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

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        """ΔW (out, in[·kh·kw]) in float32 without the multiplier."""
        raise NotImplementedError

    def max_norm_factors(self) -> list[nn.Parameter]:
        """The tensors ΔW is made of; ``apply_max_norm`` scales each by ratio ** (1 / num_factors())."""
        raise NotImplementedError

    def num_factors(self) -> int:
        """How many of them multiply in each term of ΔW (2 for LoRA, split qkv too; 2 to 4 for LoKr)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """weight ← weight + multiplier · ΔW (the module's own multiplier by default)."""
        if multiplier is not None:
            self.multiplier = multiplier
        weight = self.base.weight
        weight.copy_(self.merged_weight(as_matrix(weight)).reshape(weight.shape))

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float, device: torch.device | str | None = None) -> tuple[bool, float]:
        """Scale ΔW down to Frobenius norm ``max_norm`` when above it: (scaled, norm afterwards)."""
        norm = self.delta_weight(device).norm()
        ratio = max_norm_scale(norm, max_norm)
        scaled = bool(ratio != 1)
        if scaled:
            per_factor = factor_ratio(ratio, self.num_factors())
            for param in self.max_norm_factors():
                param.mul_(per_factor.to(param.device, param.dtype))
        return scaled, float(norm * ratio)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class LoRAModule(AdapterModule):
    """LoRA on one layer; ``downs``/``ups`` hold one pair, or one per part when split (qkv).

    For a Conv2d the down matrices are (r, in·kh·kw) and the ups (out, r)."""

    def __init__(
        self,
        name: str,
        base: Layer,
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
            x, base_out, down, up, self.scale * self.multiplier, conv=self.conv,
            rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
            neuron_dropout=self.neuron_dropout, training=self.training,
        )

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        down, up = self.combined()
        return merge_lora(weight, down, up, self.scale, self.multiplier)

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        down, up = self.combined()
        return lora_delta(down.detach().to(device, torch.float32), up.detach().to(device, torch.float32), self.scale)

    def max_norm_factors(self) -> list[nn.Parameter]:
        return [*self.lora_down, *self.lora_up]

    def num_factors(self) -> int:
        return 2

    def save_tensors(self) -> dict[str, torch.Tensor]:
        """sd-scripts tensors (combined form) without the name prefix; conv layout for a Conv2d."""
        down, up = (t.detach() for t in self.combined())
        if self.conv is not None:
            down, up = to_conv_weight(down, self.conv), to_pointwise(up)
        alpha = torch.tensor(self.alpha * self.num_parts)
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``save_tensors`` (shapes already checked by the caller)."""
        down, up = as_matrix(tensors["lora_down.weight"]), as_matrix(tensors["lora_up.weight"])
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
        """(out, in[·kh·kw]) of ΔW."""
        return sum(int(u.shape[0]) for u in self.lora_up), int(self.lora_down[0].shape[1])


class LoKrModule(AdapterModule):
    """LoKr on one layer; ``tensors`` uses LyCORIS names (``lokr_w1``/``_a``/``_b``, ``lokr_w2``…, ``scalar``),
    all 2-D (a Conv2d's W2 side is (b, d·kh·kw))."""

    def __init__(
        self,
        name: str,
        base: Layer,
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
            x, base_out, self.tensors(), self.scale * self.multiplier, conv=self.conv,
            rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
            neuron_dropout=self.neuron_dropout, training=self.training,
        )

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return merge_lokr(weight, self.tensors(), self.scale, self.multiplier)

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        tensors = {k: v.detach().to(device, torch.float32) for k, v in self.factors.items()}
        return lokr_delta(tensors, self.scale)

    def max_norm_factors(self) -> list[nn.Parameter]:
        return [p for k, p in self.factors.items() if k != "scalar"]

    def num_factors(self) -> int:
        return len(self.max_norm_factors())

    def save_tensors(self) -> dict[str, torch.Tensor]:
        """LyCORIS tensors (scalar baked into w1) without the name prefix; a conv's full w2 is (b, d, kh, kw)."""
        baked = lokr_bake_scalar({k: v.detach() for k, v in self.factors.items()})
        if self.conv is not None and "lokr_w2" in baked:
            baked["lokr_w2"] = to_conv_weight(baked["lokr_w2"], self.conv)
        return {**baked, "alpha": torch.tensor(self.alpha)}

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of ``save_tensors``; a learnable scalar restarts at 1 (it is baked into w1)."""
        for key, param in self.factors.items():
            if key == "scalar":
                param.fill_(1.0)
            else:
                param.copy_(as_matrix(tensors[key]))
        self.alpha = float(tensors["alpha"]) if "alpha" in tensors else float(self.rank)
        self.scale = lokr_scale(self.alpha, self.rank, self.tensors())

    def up_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.factors.items() if k in ("lokr_w2", "lokr_w2_b")]

    def delta_shape(self) -> tuple[int, int]:
        """(out, in[·kh·kw]) of ΔW = (a·b, c·d[·kh·kw])."""
        w1, w2 = lokr_w1(self.tensors()), lokr_w2(self.tensors())
        return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1])

"""Max-norm regularisation (sd-scripts' ``--scale_weight_norms``) as pure functions.

Per module: norm = ‖ΔW‖ (Frobenius, ΔW including alpha / rank), ratio = min(norm, max_norm) / norm
with the norm clamped below at max_norm / 2 first (sd-scripts' guard against 0 / 0, which leaves
every norm under the limit at ratio exactly 1). ΔW is scaled by the ratio by multiplying each of
its n factor tensors by ratio ** (1 / n) (LoRA: up and down by √ratio; LoKr: LyCORIS'
``apply_max_norm`` rule over w1 or w1_a/w1_b and w2 or w2_a/w2_b).
"""

from __future__ import annotations

import torch


def max_norm_scale(delta_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings ``delta_norm`` down to ``max_norm`` (1 when already within it)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = delta_norm.clamp(min=max_norm / 2)
    desired = norm.clamp(max=max_norm)
    return desired / norm


def factor_ratio(ratio: torch.Tensor | float, num_factors: int) -> torch.Tensor | float:
    """ratio ** (1 / num_factors): scaling each of ``num_factors`` multiplied tensors by it scales
    their product by ``ratio``."""
    return ratio ** (1.0 / num_factors)

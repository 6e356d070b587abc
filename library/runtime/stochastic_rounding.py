"""Stochastic rounding of float32 values to bfloat16.

bfloat16 is float32 with the low 16 mantissa bits dropped. Round-to-nearest loses every update smaller
than half a bf16 ulp of the weight (about 0.4 % of its magnitude), so tiny learning-rate steps on bf16
weights vanish. Stochastic rounding rounds up with probability equal to the dropped fraction of an ulp,
so the *expected* stored value equals the float32 value and small updates survive on average.

Bit recipe: add a uniform random integer in [0, 2^16) to the float32 bit pattern, then clear the low
16 bits. Adding to the pattern moves the magnitude away from zero (the sign bit is untouched), so the
value is truncated toward zero or bumped one bf16 ulp away from it with probability = dropped bits /
2^16 (a carry into the exponent is the correct next bf16 value; beyond the largest bf16 it is inf).
Infinities and NaNs are passed through unchanged.
"""

from __future__ import annotations

import torch

_LOW_BITS = 16
_LOW_MASK = (1 << _LOW_BITS) - 1


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to bfloat16: E[result] = x for every finite x in range.

    ``generator`` (on ``x``'s device) makes the rounding reproducible; None uses the global generator.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    special = ~torch.isfinite(x)  # inf / NaN: plain truncation keeps them what they are
    rounded = torch.where(special, bits, bits + noise) & ~_LOW_MASK  # int32 arithmetic; the low bits are dropped
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero

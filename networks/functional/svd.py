"""Low-rank factorisation of a weight difference ΔW by SVD, rank choosers and the kept energy.

ΔW (out, in) = U · diag(S) · Vh with S descending. A rank-k LoRA keeps the first k triplets as
``up = U[:, :k] · S[:k]`` (out, k) and ``down = Vh[:k]`` (k, in) (sd-scripts' layout: the singular
values go with up), so ΔW ≈ up @ down at scale 1 (alpha = k). A Conv2d ΔW is factorised as the
matrix (out, in·kh·kw) (see ``functional.conv``); callers reshape down to (k, in, kh, kw) and up to
(out, k, 1, 1), as sd-scripts and LyCORIS store a conv LoRA.

Rank choosers (``--dynamic_method`` / ``--dynamic_param``), each the smallest rank meeting the
target, at least 1; the fixed ``--dim`` / ``--new_rank`` caps them:

- ``sv_ratio`` r ≥ 1: keep every σ_i with σ_max / σ_i ≤ r.
- ``sv_fro`` f in (0, 1]: keep the fewest σ with √(Σ_kept σ²) / √(Σ σ²) ≥ f.
- ``sv_cumulative`` c in (0, 1]: keep the fewest σ with Σ_kept σ / Σ σ ≥ c.

(sd-scripts' resize_lora keeps one more singular value than these targets need; here the rank is
the minimal one.) The kept energy of rank k is Σ_{i<k} σ_i² / Σ σ_i² = ‖ΔW_k‖²_F / ‖ΔW‖²_F.

``clamp_factors`` is sd-scripts' extract clamp: both factors are clamped to ±h, h the
``clamp_quantile`` quantile of the absolute values of all their entries (1.0 = no clamping).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_TOLERANCE = 1e-6  # cumulative fractions are float32 sums: 1.0 may come out as 0.9999999


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, k), S (k,), Vh (k, in)), k = min(out, in), of a 2-D matrix, in float32."""
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of up @ down (up (out, r), down (r, in)) without forming the product.

    up = Qu·Ru and downᵀ = Qd·Rd (reduced QR), so up @ down = Qu · (Ru·Rdᵀ) · Qdᵀ and only the small
    core Ru·Rdᵀ (at most r × r) is decomposed. S has min(out, in, r) entries.
    """
    q_up, r_up = torch.linalg.qr(up.float())  # (out, a), (a, r)
    q_down, r_down = torch.linalg.qr(down.float().t())  # (in, b), (b, r)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.t(), full_matrices=False)  # (a, b) core
    return q_up @ u_core, s, vh_core @ q_down.t()  # (out, k), (k,), (k, in)


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """1 + the index of the first ascending cumulative fraction ≥ target (len when none is)."""
    return min(int((fractions < target - _TOLERANCE).sum()) + 1, fractions.numel())


def rank_sv_ratio(singular_values: torch.Tensor, ratio: float) -> int:
    """Keep every σ with σ_max / σ ≤ ratio (at least one)."""
    s = singular_values.float()
    return max(1, int((s * ratio >= s[0] * (1 - _TOLERANCE)).sum()))


def rank_sv_fro(singular_values: torch.Tensor, fraction: float) -> int:
    """The fewest σ whose Frobenius norm is ≥ fraction of the whole."""
    squares = singular_values.float() ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    return _first_reaching(torch.cumsum(squares, 0) / total, fraction**2)


def rank_sv_cumulative(singular_values: torch.Tensor, fraction: float) -> int:
    """The fewest σ whose sum is ≥ fraction of the sum of all σ."""
    s = singular_values.float()
    total = s.sum()
    if total <= 0:
        return 1
    return _first_reaching(torch.cumsum(s, 0) / total, fraction)


RANK_CHOOSERS: dict[str, Callable[[torch.Tensor, float], int]] = {
    "sv_ratio": rank_sv_ratio,
    "sv_fro": rank_sv_fro,
    "sv_cumulative": rank_sv_cumulative,
}


def choose_rank(singular_values: torch.Tensor, max_rank: int, method: str | None = None,
                param: float | None = None) -> int:
    """The rank to keep: ``max_rank`` (fixed), or the chooser's rank capped by it; never more than
    the number of singular values, never less than 1."""
    rank = max_rank
    if method is not None:
        rank = min(rank, RANK_CHOOSERS[method](singular_values, float(param)))
    return max(1, min(rank, singular_values.numel()))


def kept_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Σ_{i<rank} σ_i² / Σ σ_i² (1.0 for a zero matrix)."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    return 1.0 if total == 0.0 else float(squares[:rank].sum()) / total


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, rank) = U·S, down (rank, in) = Vh) of the first ``rank`` singular triplets."""
    return u[:, :rank] * s[:rank], vh[:rank]


def abs_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |values| with linear interpolation (as ``torch.quantile``, any size)."""
    flat = values.abs().flatten().float()
    position = q * (flat.numel() - 1)
    lower, upper = int(position), min(int(position) + 1, flat.numel() - 1)
    low = torch.kthvalue(flat, lower + 1).values
    high = torch.kthvalue(flat, upper + 1).values
    return low + (high - low) * (position - lower)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ±(the ``quantile`` of their absolute values); 1.0 or more leaves them."""
    if quantile >= 1.0:
        return up, down
    limit = abs_quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)

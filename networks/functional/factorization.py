"""LyCORIS' factorization of a dimension into two factors for LoKr (pure integer math).

The rule, reproduced exactly (checked against ``lycoris.functional.general.factorization``):

1. ``factor > 0`` and ``factor`` divides ``dimension``: the pair ``(factor, dimension // factor)``,
   sorted so that ``m <= n``.
2. Otherwise let ``limit = dimension`` when ``factor < 0``, else ``limit = factor`` (so
   ``factor == 0`` yields ``(1, dimension)``). Walk the divisors ``d > 1`` of ``dimension`` in
   increasing order, starting from ``(m, n) = (1, dimension)``: stop before a divisor larger than
   ``limit``, and stop once ``m >= n``; otherwise take ``(m, n) = (d, dimension // d)``.
   Return the pair sorted so that ``m <= n``.

For ``factor = -1`` this is the divisor pair closest to ``sqrt(dimension)``
(e.g. 1536 -> (32, 48), 2432 -> (38, 64)); for a non-dividing positive factor it is the largest
divisor reached without exceeding ``factor`` (or crossing ``sqrt``), e.g. 2432 with factor 5 ->
(4, 608), while a dividing factor is taken as is: 2432 with factor 16 -> (16, 152).
"""

from __future__ import annotations


def _divisors_above_one(dimension: int) -> list[int]:
    """All divisors d of ``dimension`` with 1 < d <= dimension, ascending."""
    return [d for d in range(2, dimension + 1) if dimension % d == 0]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m <= n`` and ``m * n == dimension`` (LyCORIS rule)."""
    if dimension < 1:
        raise ValueError(f"dimension must be positive, got {dimension}")
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return (min(factor, other), max(factor, other))
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    for divisor in _divisors_above_one(dimension):
        if m >= n or divisor > limit:
            break
        m, n = divisor, dimension // divisor
    return (min(m, n), max(m, n))

"""σ plots: the training σ distribution of ``--weighting_scheme`` × ``--training_shift`` and the inference
σ schedule of ``--scheduler`` × ``--shift``, computed with the trainer's own code (library.flow).

- Density: the exact probability of each σ bin from :func:`library.flow.timesteps.sigma_cdf`, divided
  by the bin width; the histogram beside it is drawn with :func:`sample_sigmas`, the sampler training
  uses, so the picture also shows that the two agree.
- Effective weight: density × loss weight (sigma_sqrt, cosmap) normalised to integrate to 1 — what a
  scheme that samples uniformly but weights the loss actually emphasises.
- Schedule: :func:`library.flow.schedules.make_sigmas` (σ per sampling step, ending in 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from library.flow.schedules import make_sigmas
from library.flow.timesteps import TimestepSpec, sample_sigmas, sigma_cdf
from library.flow.weighting import loss_weighting, resolve_weighting_scheme
from library.plots.charts import Panel, Series


@dataclass(frozen=True)
class TrainingCurve:
    label: str
    spec: TimestepSpec
    loss_weighting: str


@dataclass(frozen=True)
class DensityOptions:
    """What the σ density depends on besides the scheme and the shift (the trainer's flags)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: float | None = None
    max_timestep: float | None = None
    timestep_sampling: str | None = None
    loss_weighting: str | None = None


def training_curves(schemes: Sequence[str], shifts: Sequence[float],
                    options: DensityOptions = DensityOptions()) -> list[TrainingCurve]:
    """One curve per (scheme, shift); ValueError for an unknown name or a parameter out of range."""
    curves = []
    for scheme in schemes:
        sampling, weighting = resolve_weighting_scheme(scheme, options.timestep_sampling, options.loss_weighting)
        for shift in shifts:
            spec = TimestepSpec(sampling=sampling, shift=float(shift), logit_mean=options.logit_mean,
                                logit_std=options.logit_std, mode_scale=options.mode_scale,
                                min_timestep=options.min_timestep, max_timestep=options.max_timestep)
            curves.append(TrainingCurve(f"{scheme}, shift {float(shift):g}", spec, weighting))
    return curves


def bin_edges(bins: int) -> torch.Tensor:
    if bins < 2:
        raise ValueError(f"need at least 2 bins, got {bins}")
    return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)


def analytic_density(spec: TimestepSpec, edges: torch.Tensor) -> list[float]:
    """P(σ in bin) / bin width, from the analytic CDF."""
    return (torch.diff(sigma_cdf(edges, spec)) / torch.diff(edges)).tolist()


def sampled_density(spec: TimestepSpec, edges: torch.Tensor, samples: int, seed: int = 0) -> list[float]:
    """Histogram density of ``samples`` σ drawn by the trainer's sampler."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = sample_sigmas(samples, spec, generator=generator).double()
    counts = torch.histogram(sigmas, bins=edges).hist
    return (counts / (samples * torch.diff(edges))).tolist()


def effective_density(density: Sequence[float], edges: torch.Tensor, weighting: str) -> list[float]:
    """density × loss weight at the bin centres, normalised to integrate to 1."""
    centres = ((edges[:-1] + edges[1:]) / 2).float()
    weighted = torch.tensor(density, dtype=torch.float64) * loss_weighting(weighting, centres).double()
    total = float((weighted * torch.diff(edges)).sum())
    return (weighted / total).tolist() if total > 0 else weighted.tolist()


def sigma_quantiles(spec: TimestepSpec, qs: Sequence[float], iters: int = 50) -> list[float]:
    """The σ below which each fraction ``q`` of training σ falls (bisection on the analytic CDF, all at once)."""
    q = torch.tensor(list(qs), dtype=torch.float64)
    lo, hi = torch.zeros_like(q), torch.ones_like(q)
    for _ in range(iters):
        mid = (lo + hi) / 2
        below = sigma_cdf(mid, spec) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).tolist()


def curve_summary(curve: TrainingCurve) -> str:
    """One line: quartiles of σ and the share of steps in the noisier half."""
    q1, q2, q3 = sigma_quantiles(curve.spec, (0.25, 0.5, 0.75))
    above = 1.0 - float(sigma_cdf(torch.tensor(0.5), curve.spec))
    weight = "" if curve.loss_weighting == "none" else f", loss weighting {curve.loss_weighting}"
    return f"{curve.label}: sigma quartiles {q1:.3f} / {q2:.3f} / {q3:.3f}, P(sigma > 0.5) = {above:.3f}{weight}"


def schedules(schedulers: Sequence[str], shifts: Sequence[float], steps: int) -> list[tuple[str, list[float]]]:
    """(label, σ per step incl. the final 0) per (scheduler, shift)."""
    return [(f"{name}, shift {float(shift):g}", make_sigmas(name, steps, float(shift)).tolist())
            for name in schedulers for shift in shifts]


def _capped_range(series: Sequence[Series], quantile: float = 0.95) -> tuple[float, float]:
    values = sorted(float(v) for s in series for v in s.ys)
    top = values[min(len(values) - 1, int(quantile * len(values)))] if values else 1.0
    return 0.0, 1.1 * max(top, 1e-9)


def timestep_panels(curves: Sequence[TrainingCurve], inference: Sequence[tuple[str, list[float]]], *,
                    bins: int = 50, samples: int = 100_000, seed: int = 0) -> list[Panel]:
    """Density panel, effective-weight panel (only when some curve weights the loss), schedule panel."""
    edges = bin_edges(bins)
    xs = edges.tolist()
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    density, effective = [], []
    for i, curve in enumerate(curves):
        exact = analytic_density(curve.spec, edges)
        density.append(Series("", xs, sampled_density(curve.spec, edges, samples, seed), "steps", i, 1))
        density.append(Series(curve.label, centres, exact, "line", i, 3))
        if curve.loss_weighting != "none":
            effective.append(Series(curve.label, centres,
                                    effective_density(exact, edges, curve.loss_weighting), "line", i, 3))
    top = max((max(s.ys) for s in density if s.kind == "line"), default=1.0)
    panels = [Panel(f"training sigma density (lines: exact; steps: {samples} draws)", "sigma (1 = noise)",
                    "density", tuple(density), (0.0, 1.0), (0.0, 1.1 * top))]
    if effective:
        panels.append(Panel("density x loss weight (normalised)", "sigma", "weight", tuple(effective), (0.0, 1.0),
                            _capped_range(effective)))
    if inference:
        steps = max(len(sig) for _, sig in inference) - 1
        lines = tuple(Series(label, list(range(len(sig))), sig, "points", i, 2)
                      for i, (label, sig) in enumerate(inference))
        panels.append(Panel("inference sigma schedule", "step", "sigma", lines, (0.0, float(max(1, steps))),
                            (0.0, 1.0)))
    return panels

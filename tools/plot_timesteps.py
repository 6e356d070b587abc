"""Plot the training σ distribution and the inference σ schedule as a PNG (several settings at once).

    python tools/plot_timesteps.py --weighting_scheme logit_normal mode --training_shift 2.5 7 \
        --shift 3 7 --scheduler simple beta --steps 28 --output timesteps.png

Every (--weighting_scheme, --training_shift) pair gets a density curve (exact, from the trainer's CDF)
over a histogram of σ drawn by the trainer's sampler; schemes that weight the loss (sigma_sqrt, cosmap)
also get "density x loss weight". Every (--scheduler, --shift) pair gets its σ per sampling step.
The quartiles of each training distribution are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    from library.cli import ArgumentParser
    from library.config import CHOICES

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weighting_scheme", nargs="+", choices=CHOICES["weighting_scheme"], default=["logit_normal"])
    p.add_argument("--training_shift", nargs="+", type=float, default=[1.0])
    p.add_argument("--timestep_sampling", choices=CHOICES["timestep_sampling"], help="overrides the scheme's density")
    p.add_argument("--loss_weighting", choices=CHOICES["loss_weighting"], help="overrides the scheme's weighting")
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument("--min_timestep", type=float, default=None)
    p.add_argument("--max_timestep", type=float, default=None)
    p.add_argument("--shift", nargs="*", type=float, default=[3.0], help="inference shifts (none: no schedule panel)")
    p.add_argument("--scheduler", nargs="+", choices=("normal", "simple", "beta"), default=["normal"])
    p.add_argument("--steps", type=int, default=28, help="inference steps")
    p.add_argument("--bins", type=int, default=50)
    p.add_argument("--samples", type=int, default=100_000, help="σ drawn for each histogram")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--output", type=Path, default=Path("timesteps.png"))
    return p


def run(ns: argparse.Namespace) -> None:
    from library.errors import UserError
    from library.plots import charts
    from library.plots import timesteps as tp

    options = tp.DensityOptions(logit_mean=ns.logit_mean, logit_std=ns.logit_std, mode_scale=ns.mode_scale,
                                min_timestep=ns.min_timestep, max_timestep=ns.max_timestep,
                                timestep_sampling=ns.timestep_sampling, loss_weighting=ns.loss_weighting)
    if ns.samples < 1:
        raise UserError(f"--samples must be at least 1, got {ns.samples}")
    try:
        curves = tp.training_curves(ns.weighting_scheme, ns.training_shift, options)
        inference = tp.schedules(ns.scheduler, ns.shift, ns.steps) if ns.shift else []
        panels = tp.timestep_panels(curves, inference, bins=ns.bins, samples=ns.samples, seed=ns.seed)
        image = charts.render(panels, width=ns.width)
    except ValueError as exc:
        raise UserError(f"{exc} (check the flags)") from None
    for curve in curves:
        print(tp.curve_summary(curve))
    for label, sigmas in inference:
        print(f"{label}: " + " ".join(f"{s:.3f}" for s in sigmas))
    print(f"wrote {charts.save_png(image, ns.output)}")


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    ns = build_parser().parse_args(argv)
    return run_command(lambda: run(ns))


if __name__ == "__main__":
    sys.exit(main())

"""tools/plot_timesteps.py and library.plots: σ densities from the trainer's math, drawn with Pillow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import plot_timesteps  # noqa: E402
from library.flow.schedules import make_sigmas  # noqa: E402
from library.flow.timesteps import TimestepSpec  # noqa: E402
from library.plots import charts  # noqa: E402
from library.plots import timesteps as tp  # noqa: E402


def test_tool_writes_png_with_every_panel_and_prints_quartiles(tmp_path, capsys):
    out = tmp_path / "plots" / "t.png"
    argv = ["--weighting_scheme", "logit_normal", "cosmap", "--training_shift", "1", "3", "--shift", "3", "7",
            "--scheduler", "simple", "--steps", "8", "--samples", "20000", "--bins", "20", "--output", str(out)]
    assert plot_timesteps.main(argv) == 0
    text = capsys.readouterr().out
    # shift(0.5) = 3·0.5 / (1 + 2·0.5) = 0.75: the median moves exactly as the shift maps it
    assert "logit_normal, shift 3: sigma quartiles" in text and "/ 0.750 /" in text.split("logit_normal, shift 3")[1]
    assert "loss weighting cosmap" in text and "simple, shift 7: 1.000" in text
    image = Image.open(out).convert("RGB")
    assert image.size == (960, 3 * 340)  # density, density x weight (cosmap), schedule
    first_panel = image.crop((0, 0, 960, 340))
    assert first_panel.getcolors(1 << 20) and any(c == charts.PALETTE[0] for _, c in first_panel.getcolors(1 << 20))


def test_no_weighting_no_schedule_gives_one_panel(tmp_path):
    out = tmp_path / "one.png"
    argv = ["--weighting_scheme", "mode", "--shift", "--samples", "1000", "--output", str(out)]
    assert plot_timesteps.main(argv) == 0
    assert Image.open(out).size == (960, 340)


def test_densities_match_the_trainers_sampler_and_cdf():
    edges = tp.bin_edges(20)
    width = 1 / 20
    for spec in (TimestepSpec("logit_normal", shift=3.0), TimestepSpec("mode", shift=2.5), TimestepSpec("uniform")):
        exact = tp.analytic_density(spec, edges)
        drawn = tp.sampled_density(spec, edges, 200_000, seed=1)
        assert sum(exact) * width == pytest.approx(1.0, abs=1e-9)
        assert max(abs(a - b) for a, b in zip(exact, drawn)) < 0.15
    uniform = [1.0] * 20
    assert tp.effective_density(uniform, edges, "none") == pytest.approx(uniform)
    cos = tp.effective_density(uniform, edges, "cosmap")
    assert sum(cos) * width == pytest.approx(1.0) and cos[10] > cos[0]  # cosmap favours the middle
    (q,) = tp.sigma_quantiles(TimestepSpec("uniform", shift=3.0), [0.5])
    assert q == pytest.approx(0.75, abs=1e-9)


def test_curves_follow_weighting_scheme_split_and_schedules_are_the_samplers():
    curves = tp.training_curves(["sigma_sqrt", "mode"], [1.0, 7.0], tp.DensityOptions(mode_scale=0.5))
    assert [(c.spec.sampling, c.spec.shift, c.loss_weighting) for c in curves] == [
        ("uniform", 1.0, "sigma_sqrt"), ("uniform", 7.0, "sigma_sqrt"), ("mode", 1.0, "none"), ("mode", 7.0, "none")]
    assert curves[2].spec.mode_scale == 0.5
    ((label, sigmas),) = tp.schedules(["simple"], [7.0], 10)
    assert label == "simple, shift 7" and sigmas == make_sigmas("simple", 10, 7.0).tolist()
    with pytest.raises(ValueError):
        tp.training_curves(["mode"], [0.0])


def test_nice_ticks():
    assert charts.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0.0, 28.0) == [0.0, 10.0, 20.0]


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    assert plot_timesteps.main(["--training_shift", "0", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shift must be > 0" in err[0]
    assert not (tmp_path / "x.png").exists()
    assert torch.equal(tp.bin_edges(2), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))

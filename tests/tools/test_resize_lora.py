"""tools/resize_lora.py end to end: the rank goes down to the best approximation, the kept energy
matches the singular values, full rank reproduces ΔW (LoKr too), bad input is one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.models.safetensors_io import read_metadata
from networks.deltas import read_network
from networks.extract import resize_network
from networks.functional.svd import kept_energy, rank_sv_ratio
from networks.lowrank import RankSpec
from tests.tools.test_merge_network import make_networks, module_deltas

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import resize_lora  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    files = tiny_models("sd35-medium")
    nets = make_networks(files, tmp_path_factory.mktemp("resize"), ("lora", "lokr"))
    return files, nets, {name: module_deltas(path, files) for name, path in nets.items()}


def _resize(argv) -> int:
    return resize_lora.main([str(a) for a in argv] + ["--no_progress"])


def test_lower_rank_is_the_best_approximation(setup, tmp_path, capsys):
    files, nets, deltas = setup
    out = tmp_path / "r2.safetensors"
    assert _resize(["--model", nets["lora"], "--save_to", out, "--new_rank", 2, "--verbose"]) == 0
    printed = capsys.readouterr().out
    tensors, original = load_file(str(out)), load_file(str(nets["lora"]))
    resized = module_deltas(out, files)
    energies = []
    for name, delta in deltas["lora"].items():
        rank_before = original[f"{name}.lora_down.weight"].shape[0]
        assert rank_before in (2, 4) and tensors[f"{name}.lora_down.weight"].shape[0] == 2  # blocks 4 → 2, emb 2 → 2
        # alpha / rank is kept: 2 / 4 for the blocks (dim 4, alpha 2), 2 / 2 for the emb modules (dim 2)
        ratio = float(original[f"{name}.alpha"]) / rank_before
        assert float(tensors[f"{name}.alpha"]) / 2 == pytest.approx(ratio)
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert (resized[name] - best).abs().max().item() <= 1e-4, name
        energies.append((float((s[:2] ** 2).sum()), float((s**2).sum())))
        line = re.search(rf"^{name}: rank {rank_before} → 2, kept energy ([\d.]+) %$", printed, re.M)
        assert line is not None and float(line.group(1)) == pytest.approx(100 * kept_energy(s, 2), abs=0.01)
    overall = sum(k for k, _ in energies) / sum(t for _, t in energies)
    assert f"kept energy {100 * overall:.2f} % of Σσ²" in printed
    assert "resized from rank" not in read_metadata(nets["lora"]).get("ss_training_comment", "")
    assert read_metadata(out)["ss_training_comment"].startswith("resized from ranks 2–4 (lora) to rank 2")


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_full_rank_resize_reproduces_the_network(kind, setup, tmp_path):
    files, nets, deltas = setup
    out = tmp_path / f"{kind}_full.safetensors"
    assert _resize(["--model", nets[kind], "--save_to", out, "--new_rank", 10000]) == 0
    resized = module_deltas(out, files)
    assert resized.keys() == deltas[kind].keys()
    for name, delta in deltas[kind].items():
        assert (resized[name] - delta).abs().max().item() <= 1e-4, name
    meta = read_metadata(out)
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_network_dim"] == "Dynamic"


def test_dynamic_rank_follows_the_singular_values(setup):
    _, nets, deltas = setup
    modules, _, report = resize_network(read_network(nets["lora"]), RankSpec(3, method="sv_ratio", param=2.0))
    for module in report.modules:
        sigma = torch.linalg.svdvals(deltas["lora"][module.name])
        assert module.rank == min(3, rank_sv_ratio(sigma, 2.0), module.rank_before)
        assert modules[module.name]["lora_down.weight"].shape[0] == module.rank
        assert module.kept_fraction == pytest.approx(kept_energy(sigma, module.rank), abs=1e-5)
    assert len({m.rank for m in report.modules}) > 1  # the rank really varies per module


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"),
    ("checkpoint", "not an SD3 LoRA/LoKr file"),
    ("no_param", "needs --dynamic_param"),
    ("zero_rank", "at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, needle, setup, tmp_path, capsys):
    files, nets, _ = setup
    out = tmp_path / "out" / "resized.safetensors"
    out.parent.mkdir()
    argv = {
        "missing": ["--model", tmp_path / "nope.safetensors"],
        "checkpoint": ["--model", files.checkpoint],
        "no_param": ["--model", nets["lora"], "--dynamic_method", "sv_fro"],
        "zero_rank": ["--model", nets["lora"], "--new_rank", 0],
    }[case]
    assert _resize(argv + ["--save_to", out]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert list(out.parent.iterdir()) == []


def test_metadata_describes_the_new_lora():
    from networks.lowrank import lora_metadata

    tensors = {"m.lora_down.weight": torch.zeros(3, 8), "m.lora_up.weight": torch.zeros(8, 3), "m.alpha": torch.tensor(3.0)}
    lokr = {"ss_network_module": "networks.lokr_sd3", "ss_network_args": '{"factor": "4"}', "sshs_model_hash": "x",
            "modelspec.architecture": "stable-diffusion-3-5-medium/lokr", "ss_training_comment": "mine"}
    meta = lora_metadata(lokr, tensors, comment="resized")
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_network_args"] == "{}"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and "sshs_model_hash" not in meta
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_training_comment"]) == ("3", "3", "resized; mine")
    split = {"ss_network_module": "networks.lora_sd3", "ss_network_args": '{"split_qkv": "True", "emb_dims": "[1]"}'}
    assert lora_metadata(split, tensors)["ss_network_args"] == '{"emb_dims": "[1]"}'

"""tools/extract_lora.py end to end: (base, base + ΔW) → LoRA; full rank rebuilds ΔW, a lower rank
reports the kept energy of ΔW's singular values; bad input is one line and writes nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.models.safetensors_io import read_metadata, save_safetensors
from networks.functional.svd import kept_energy, rank_sv_fro
from networks.lowrank import RankSpec
from networks.extract import extract_lora
from tests.tools.test_merge_network import module_deltas

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import extract_lora as extract_tool  # noqa: E402

MMDIT = "model.diffusion_model."
CLIP_L = "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
# weight key -> (module name, rank of the ΔW added to it)
CHANGED = {
    MMDIT + "joint_blocks.0.x_block.attn.qkv.weight": ("lora_unet_joint_blocks_0_x_block_attn_qkv", 3),
    MMDIT + "joint_blocks.1.context_block.mlp.fc1.weight": ("lora_unet_joint_blocks_1_context_block_mlp_fc1", 5),
    MMDIT + "joint_blocks.0.x_block.attn2.proj.weight": ("lora_unet_joint_blocks_0_x_block_attn2_proj", 32),
    MMDIT + "x_embedder.proj.weight": ("lora_unet_x_embedder_proj", 4),
    CLIP_L + "self_attn.q_proj.weight": ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 2),
}


@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    """The tiny SD3.5-M checkpoint plus a known ΔW (random, of the given rank) on a few weights."""
    files = tiny_models("sd35-medium")
    tensors = load_file(str(files.checkpoint))
    gen = torch.Generator().manual_seed(11)
    deltas = {}
    for key, (name, rank) in CHANGED.items():
        weight = tensors[key]
        out, inner = weight.shape[0], weight[0].numel()
        delta = (torch.randn(out, rank, generator=gen) @ torch.randn(rank, inner, generator=gen)) * 0.05
        tensors[key] = weight + delta.reshape(weight.shape)  # conv: (out, in·kh·kw) -> (out, in, kh, kw)
        deltas[name] = delta
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_safetensors(tensors, path, read_metadata(files.checkpoint))
    return files, path, deltas


def test_full_rank_extraction_rebuilds_the_difference(tuned, tmp_path, capsys):
    files, path, deltas = tuned
    out = tmp_path / "extracted.safetensors"
    argv = ["--model_org", files.checkpoint, "--model_tuned", path, "--save_to", out, "--dim", "1000",
            "--clamp_quantile", "1", "--no_progress"]
    assert extract_tool.main([str(a) for a in argv]) == 0
    assert f"LoRA of {len(CHANGED)} modules" in capsys.readouterr().out
    tensors = load_file(str(out))
    assert tensors["lora_unet_x_embedder_proj.lora_down.weight"].shape == (32, 16, 2, 2)  # conv layout, full rank 32
    assert tensors["lora_unet_x_embedder_proj.lora_up.weight"].shape == (32, 32, 1, 1)
    rebuilt = module_deltas(out, files)  # loads through the project's network loader
    assert rebuilt.keys() == deltas.keys()  # unchanged layers and encoders are left out
    for name, delta in deltas.items():
        assert (rebuilt[name] - delta).abs().max().item() <= 1e-4, name
    meta = read_metadata(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_base_model_version"] == "sd3.5_medium"
    assert meta["sshs_model_hash"] and meta["ss_network_dim"] == "Dynamic"


def test_lower_rank_reports_the_kept_energy(tuned, tmp_path, capsys):
    files, path, deltas = tuned
    modules, _, report = extract_lora(files.checkpoint, path, RankSpec(2))
    assert {m.name for m in report.modules} == set(deltas)
    for module in report.modules:
        sigma = torch.linalg.svdvals(deltas[module.name])
        assert module.rank == 2 and modules[module.name]["lora_down.weight"].shape[0] == 2
        assert module.kept_fraction == pytest.approx(kept_energy(sigma, 2), abs=1e-5)
        assert module.kept_fraction == pytest.approx(float((sigma[:2] ** 2).sum() / (sigma**2).sum()), abs=1e-5)
    total = sum(float((torch.linalg.svdvals(d)[:2] ** 2).sum()) for d in deltas.values())
    overall = total / sum(float(d.pow(2).sum()) for d in deltas.values())
    assert report.kept_fraction() == pytest.approx(overall, abs=1e-5)
    out = tmp_path / "r2.safetensors"
    argv = ["--model_org", files.checkpoint, "--model_tuned", path, "--save_to", out, "--dim", "2", "--verbose",
            "--no_progress"]
    assert extract_tool.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert f"kept energy {100 * overall:.2f} % of Σσ²" in printed
    qkv = re.search(r"lora_unet_joint_blocks_0_x_block_attn_qkv: rank full → 2, kept energy ([\d.]+) %", printed)
    sigma = torch.linalg.svdvals(deltas["lora_unet_joint_blocks_0_x_block_attn_qkv"])
    assert qkv is not None and float(qkv.group(1)) == pytest.approx(100 * kept_energy(sigma, 2), abs=0.01)


def test_dynamic_rank_is_the_fewest_meeting_the_target(tuned):
    files, path, deltas = tuned
    _, _, report = extract_lora(files.checkpoint, path, RankSpec(1000, method="sv_fro", param=0.8))
    for module in report.modules:
        sigma = torch.linalg.svdvals(deltas[module.name])
        assert module.rank == rank_sv_fro(sigma, 0.8)
        assert module.kept_fraction >= 0.8**2 - 1e-6
        assert kept_energy(sigma, module.rank - 1) < 0.8**2  # one fewer would miss the target
    assert any(m.rank > 1 for m in report.modules)


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"),
    ("other_model", "another architecture"),
    ("same", "does not differ"),
    ("bad_param", "--dynamic_param for sv_fro"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, needle, tuned, tiny_models, tmp_path, capsys):
    files, path, _ = tuned
    out = tmp_path / "out" / "lora.safetensors"
    out.parent.mkdir()
    argv = {
        "missing": ["--model_org", tmp_path / "nope.safetensors", "--model_tuned", path],
        "other_model": ["--model_org", files.checkpoint, "--model_tuned", tiny_models("sd3-medium").checkpoint],
        "same": ["--model_org", files.checkpoint, "--model_tuned", files.checkpoint],
        "bad_param": ["--model_org", files.checkpoint, "--model_tuned", path, "--dynamic_method", "sv_fro",
                      "--dynamic_param", "2"],
    }[case]
    assert extract_tool.main([str(a) for a in argv + ["--save_to", out, "--no_progress"]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert list(out.parent.iterdir()) == []

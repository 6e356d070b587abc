"""tools/convert_network.py end to end: sd-scripts -> diffusers -> sd-scripts gives the file back; bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from library.models.loading import load_mmdit
from library.models.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.models.text_encoders import load_text_encoders
from networks import lora_sd3

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import convert_network  # noqa: E402


def _lora_file(tiny_models, path: Path) -> Path:
    files = tiny_models("sd3-medium")
    mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
    network = lora_sd3.create_network(1.0, 4, None, None, encoders, mmdit)  # alpha = rank: nothing to bake
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    network.save_weights(path, metadata={"ss_network_module": "networks.lora_sd3", "ss_network_dim": "4"})
    return path


def test_convert_there_and_back(tiny_models, tmp_path, capsys):
    original = _lora_file(tiny_models, tmp_path / "lora.safetensors")
    exported, back = tmp_path / "lora_diffusers.safetensors", tmp_path / "back.safetensors"
    assert convert_network.main(["--src_path", str(original), "--dst_path", str(exported)]) == 0
    assert "diffusers layout" in capsys.readouterr().out
    keys = list(load_safetensors(exported))
    assert keys and all(k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert read_metadata(exported)["ss_network_dim"] == "4"
    assert convert_network.main(["--src_path", str(exported), "--dst_path", str(back), "--to", "sd-scripts"]) == 0
    assert back.read_bytes() == original.read_bytes()
    half = tmp_path / "half.safetensors"
    assert convert_network.main(["--src_path", str(original), "--dst_path", str(half), "--save_precision", "bf16"]) == 0
    tensors = load_safetensors(half)
    assert {t.dtype for k, t in tensors.items()} == {torch.bfloat16}


def test_bad_input_is_one_line_and_writes_nothing(tiny_models, tmp_path, capsys):
    not_a_network, dst = tmp_path / "model.safetensors", tmp_path / "out.safetensors"
    save_safetensors({"model.diffusion_model.context_embedder.weight": torch.zeros(2, 2)}, not_a_network)
    original = _lora_file(tiny_models, tmp_path / "lora.safetensors")
    cases = [
        ["--src_path", str(not_a_network), "--dst_path", str(dst)],
        ["--src_path", str(tmp_path / "missing.safetensors"), "--dst_path", str(dst)],
        ["--src_path", str(original), "--dst_path", str(dst), "--to", "sd-scripts"],
        ["--src_path", str(original), "--dst_path", str(original)],
    ]
    for argv in cases:
        assert convert_network.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert not dst.exists() and not list(tmp_path.glob(".*tmp*"))


def test_help_is_instant_and_lists_the_flags():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_network.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--src_path" in result.stdout and "--to" in result.stdout

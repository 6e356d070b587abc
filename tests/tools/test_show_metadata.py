"""tools/show_metadata.py and library.models.file_info: file kind, variant, ranks and settings from headers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import show_metadata  # noqa: E402
from library.models.file_info import file_summary, module_info  # noqa: E402
from library.models.loading import load_mmdit  # noqa: E402
from library.models.mmdit_config import mmdit_shapes, real_config  # noqa: E402
from library.models.safetensors_io import save_safetensors  # noqa: E402
from library.training.network_files import network_metadata, with_hashes  # noqa: E402

SETTINGS = {"network_module": "networks.lokr_sd3", "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-4,
            "optimizer_type": "AdamW8bit", "steps": 12, "training_shift": 3.0, "weighting_scheme": "logit_normal",
            "training_started_at": 1700000000.0, "captions_by_dir": {"10_girl": ["1girl, solo", "1girl, smile"]}}


def _json(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _network_file(tmp_path: Path, files, module: str, network_args: dict) -> Path:
    import importlib

    mmdit = load_mmdit(files.checkpoint)
    net = importlib.import_module(f"networks.{module}").create_network(1.0, 4, 2.0, None, None, mmdit, **network_args)
    tensors = net.state_dict_for_save()
    meta = network_metadata({**SETTINGS, "network_module": f"networks.{module}"}, mmdit.config, kind=net.kind,
                            title="t", network_args={k: str(v) for k, v in network_args.items()})
    path = tmp_path / f"{module}.safetensors"
    save_safetensors(tensors, path, with_hashes(tensors, meta))
    return path


def test_checkpoint_and_text_encoder_files(tiny_models, capsys):
    files = tiny_models("sd35-medium")
    assert show_metadata.main([str(files.checkpoint), str(files.clip_g), "--json"]) == 0
    ckpt, clip = _json(capsys)
    assert ckpt["kind"] == "checkpoint" and ckpt["details"]["variant"] == "sd35-medium"
    mmdit = ckpt["details"]["mmdit"]
    assert mmdit["qk_norm"] is True and mmdit["dual_attention_layers"]
    assert mmdit["architecture"] == "stable-diffusion-3-5-medium"
    assert set(ckpt["details"]["components"]) == {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    assert ckpt["training"]["prediction type"] == "flow"
    assert clip["kind"] == "clip" and clip["details"]["layers"] > 0
    assert show_metadata.main([str(files.checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "kind: checkpoint (sd35-medium)" in text and "MMDiT: architecture stable-diffusion-3-5-medium" in text


def test_lora_and_lokr_files(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    lora = _network_file(tmp_path, files, "lora_sd3", {"context_attn_dim": 2})
    lokr = _network_file(tmp_path, files, "lokr_sd3", {"factor": 4, "full_matrix": True})
    assert show_metadata.main([str(lora), str(lokr), "--json", "--all"]) == 0
    lo, lk = _json(capsys)
    assert lo["kind"] == "lora" and lk["kind"] == "lokr"
    assert set(lo["details"]["ranks"]["mmdit context attn"]) == {"2"}  # context_attn_dim=2
    assert set(lo["details"]["ranks"]["mmdit x mlp"]) == {"4"}  # the default dim elsewhere
    assert set(lk["details"]["ranks"]["mmdit x attn"]) == {"full"}
    assert lo["details"]["alphas"] == {"2": lo["details"]["modules"]}  # read from the alpha tensors
    assert lo["details"]["base_model"] == "sd3_medium"
    assert lo["training"]["training shift"] == "3.0" and lo["training"]["optimizer"] == "AdamW8bit"
    assert lo["training"]["started"] == "2023-11-14 22:13 UTC" and ["1girl", 2] in lo["top_tags"]
    assert "ss_network_args" in lo["metadata"]
    assert show_metadata.main([str(lokr)]) == 0
    text = capsys.readouterr().out
    assert "kind: lokr" in text and "x rank full" in text and "training shift: 3.0" in text


def test_variant_from_shapes_alone():
    header = {k: {"dtype": "BF16", "shape": list(s), "data_offsets": [0, 0]}
              for k, s in mmdit_shapes(real_config("sd35-large")).items()}
    summary = file_summary(header)
    assert summary["details"]["variant"] == "sd35-large" and summary["details"]["mmdit"]["depth"] == 38
    assert 8.0e9 < summary["parameters"] < 8.4e9  # 8.06 B parameters + the pos_embed buffer
    lora = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": [8, 2432],
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": [7296, 8]}
    guess = file_summary({k: {"dtype": "F32", "shape": s} for k, s in lora.items()})
    assert guess["kind"] == "lora" and guess["details"]["base_model"].startswith("sd35-large")
    lokr = {"lokr_w1": (4, 4), "lokr_w2_a": (384, 8), "lokr_w2_b": (8, 384)}
    assert module_info("lokr", lokr) == ("8", (1536, 1536))


def test_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 4)
    assert show_metadata.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a valid safetensors file" in err[0]

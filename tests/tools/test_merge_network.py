"""tools/merge_network.py end to end on the miniature SD3.5-M: into a checkpoint (latents equal the
on-the-fly networks), into separate encoder files, several networks into one LoRA, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.models.loading import load_mmdit
from library.models.safetensors_io import read_header, read_metadata, save_safetensors
from library.models.text_encoders import load_text_encoders
from networks import lokr_sd3, lora_sd3
from networks.apply import attach_networks
from networks.deltas import read_network
from networks.functional.svd import kept_energy
from networks.lowrank import MERGED_NETWORKS_KEY, RankSpec
from networks.merge import ModelFile, merge_into_models, merge_to_lora
from tests.networks.test_network import outputs, randomise

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import merge_network  # noqa: E402
import sd3_minimal_inference  # noqa: E402

# name -> (module, rank, alpha, network_args)
NETWORKS = {
    "lora": (lora_sd3, 4, 2.0, {"emb_dims": "[2,2,2,2,2,2]", "train_t5xxl": "True"}),
    "lora2": (lora_sd3, 3, 3.0, {}),
    "lokr": (lokr_sd3, 4, 2.0, {"factor": "4"}),
}


def make_networks(files, folder: Path, names=tuple(NETWORKS)) -> dict[str, Path]:
    """Randomised (non-zero up) networks made with the project's own network code, saved to files."""
    paths = {}
    for seed, name in enumerate(names, start=1):
        module, rank, alpha, extra = NETWORKS[name]
        mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
        network = module.create_network(1.0, rank, alpha, None, encoders, mmdit, **extra)
        randomise(network, seed=seed)
        paths[name] = folder / f"{name}.safetensors"
        network.save_weights(paths[name])
    return paths


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    files = tiny_models("sd35-medium")
    return files, make_networks(files, tmp_path_factory.mktemp("networks"))


def fresh_models(checkpoint):
    return load_mmdit(checkpoint, dtype=torch.float32).requires_grad_(False), load_text_encoders(checkpoint)


def module_deltas(path: Path, files) -> dict[str, torch.Tensor]:
    """ΔW per module of a saved network, through the project's loader and modules (multiplier 1)."""
    mmdit, encoders = fresh_models(files.checkpoint)
    from networks.apply import load_network

    network = load_network(str(path), 1.0, encoders, mmdit)
    return {name: module.delta_weight() for name, module in network.adapters.items()}


def _latents(files, checkpoint, extra, out: Path, capsys) -> torch.Tensor:
    argv = ["--ckpt_path", checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt", "a cat", "--steps", 3,
            "--width", 64, "--height", 64, "--seed", 4, "--output_dir", out.parent / "png", "--output_latents", out]
    code = sd3_minimal_inference.main([str(a) for a in argv + extra])
    assert code == 0, capsys.readouterr().err
    return load_file(str(out))["latents_0000"]


@pytest.mark.slow
def test_merged_checkpoint_gives_the_on_the_fly_latents(setup, tmp_path, capsys):
    files, nets = setup
    merged = tmp_path / "merged.safetensors"
    argv = ["--sd3_model", files.checkpoint, "--save_to", merged, "--models", nets["lora"], nets["lokr"],
            "--ratios", "0.8", "1.0", "--no_progress"]
    assert merge_network.main([str(a) for a in argv]) == 0
    assert "weights merged from 2 network(s)" in capsys.readouterr().out
    fly = _latents(files, files.checkpoint, ["--lora_weights", f"{nets['lora']};0.8", f"{nets['lokr']};1.0"],
                   tmp_path / "fly.safetensors", capsys)
    baked = _latents(files, merged, [], tmp_path / "baked.safetensors", capsys)
    assert (fly - baked).abs().max().item() <= 1e-4
    before, after = load_file(str(files.checkpoint)), load_file(str(merged))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("first_stage_model."))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("x_embedder.proj" in k for k in changed) and any(k.startswith("text_encoders.t5xxl") for k in changed)
    old, new = read_metadata(files.checkpoint), read_metadata(merged)
    assert all(new[k] == v for k, v in old.items() if k.startswith("modelspec."))
    record = json.loads(new[MERGED_NETWORKS_KEY])
    assert [(r["name"], r["kind"], r["ratio"]) for r in record] == [("lora.safetensors", "lora", 0.8),
                                                                   ("lokr.safetensors", "lokr", 1.0)]


def test_separate_encoder_file_and_save_precision(setup, tmp_path):
    files, nets = setup
    out, clip_out = tmp_path / "bf16.safetensors", tmp_path / "clip_l_merged.safetensors"
    argv = ["--sd3_model", files.checkpoint, "--save_to", out, "--clip_l", files.clip_l, "--clip_l_save_to", clip_out,
            "--models", nets["lora"], "--ratios", "0.8", "--save_precision", "bf16", "--no_progress"]
    assert merge_network.main([str(a) for a in argv]) == 0
    dtypes = {k: v["dtype"] for k, v in read_header(out).items() if k != "__metadata__"}
    assert {d for k, d in dtypes.items() if k.startswith(("model.", "text_encoders."))} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.startswith("first_stage_model.")} == {"F32"}  # the VAE is never cast
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    base, merged = load_file(str(files.clip_l)), load_file(str(clip_out))
    delta = module_deltas(nets["lora"], files)["lora_te1_" + key.removesuffix(".weight").replace(".", "_")]
    expected = base[key].float() + 0.8 * delta
    assert merged[key].dtype == torch.bfloat16 and torch.allclose(merged[key].float(), expected, rtol=2**-8, atol=1e-6)
    in_checkpoint = "text_encoders.clip_l.transformer." + key  # the separate file took CLIP-L's modules
    assert torch.equal(load_file(str(out))[in_checkpoint], load_file(str(files.checkpoint))[in_checkpoint].bfloat16())


def test_each_tensor_is_read_and_merged_once(setup, tmp_path, monkeypatch):
    import networks.merge as merge

    files, nets = setup
    calls: dict[str, int] = {}
    original = merge._merged_tensor

    def counting(handle, key, *rest):
        calls[key] = calls.get(key, 0) + 1
        return original(handle, key, *rest)

    monkeypatch.setattr(merge, "_merged_tensor", counting)
    merge_into_models([ModelFile(files.checkpoint, tmp_path / "once.safetensors")], [(read_network(nets["lora2"]), 1.0)])
    assert set(calls) == set(load_file(str(files.checkpoint))) and set(calls.values()) == {1}


def test_concatenated_lora_acts_like_both_networks(setup, tmp_path, capsys):
    files, nets = setup
    joined = tmp_path / "joined.safetensors"
    argv = ["--save_to", joined, "--models", nets["lora"], nets["lora2"], "--ratios", "0.8", "-0.5", "--no_progress"]
    assert merge_network.main([str(a) for a in argv]) == 0
    assert "networks concatenated" in capsys.readouterr().out
    tensors = load_file(str(joined))
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 4 + 3
    assert tensors["lora_unet_x_embedder_proj.lora_down.weight"].shape == (2, 16, 2, 2)  # conv layout kept
    both, one = fresh_models(files.checkpoint), fresh_models(files.checkpoint)
    attach_networks([f"{nets['lora']};0.8", f"{nets['lora2']};-0.5"], both[1], both[0], merge=False)
    attach_networks([str(joined)], one[1], one[0], merge=False)
    plain = outputs(*fresh_models(files.checkpoint))
    for a, b, base in zip(outputs(*both), outputs(*one), plain):
        assert (a - b).abs().max().item() <= 1e-5
        assert (a - base).abs().max().item() > 1e-3  # the networks really act
    assert read_metadata(joined)["ss_network_dim"] == "Dynamic"  # 4 + 3 and 2 (emb) + 0


def test_svd_merge_with_a_lokr(setup, tmp_path):
    files, nets = setup
    full = tmp_path / "full.safetensors"
    argv = ["--save_to", full, "--models", nets["lora2"], nets["lokr"], "--ratios", "0.8", "1.0", "--new_rank", "1000",
            "--no_progress"]
    assert merge_network.main([str(a) for a in argv]) == 0
    a, b, merged = (module_deltas(p, files) for p in (nets["lora2"], nets["lokr"], full))
    assert merged.keys() == a.keys() | b.keys()
    for name, delta in merged.items():
        expected = 0.8 * a.get(name, 0.0) + b.get(name, 0.0)
        assert (delta - expected).abs().max().item() <= 1e-4, name
    networks = [(read_network(nets["lora2"]), 0.8), (read_network(nets["lokr"]), 1.0)]
    _, _, report = merge_to_lora(networks, spec=RankSpec(2))
    for module in report.modules:
        expected = 0.8 * a.get(module.name, 0.0) + b.get(module.name, 0.0)
        assert module.rank == 2
        assert module.kept_fraction == pytest.approx(kept_energy(torch.linalg.svdvals(expected), 2), abs=1e-5)


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"),
    ("other_model", "made for another model"),
    ("lokr_concat", "needs --new_rank"),
    ("ratios", "--ratios has 2 values"),
    ("clip_pair", "go together"),
    ("no_t5", "has no T5-XXL; pass --t5xxl FILE and --t5xxl_save_to OUT"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, needle, setup, tiny_models, tmp_path, capsys):
    files, nets = setup
    out = tmp_path / "out" / "result.safetensors"
    out.parent.mkdir()
    without_t5 = tmp_path / "no_t5.safetensors"
    if case == "no_t5":
        kept = {k: v for k, v in load_file(str(files.checkpoint)).items() if not k.startswith("text_encoders.t5xxl.")}
        save_safetensors(kept, without_t5, read_metadata(files.checkpoint))
    argv = {
        "missing": ["--sd3_model", files.checkpoint, "--models", tmp_path / "nope.safetensors"],
        "other_model": ["--sd3_model", tiny_models("sd3-medium").checkpoint, "--models", nets["lora"]],
        "lokr_concat": ["--models", nets["lora"], nets["lokr"]],
        "ratios": ["--models", nets["lora"], "--ratios", "1", "2"],
        "clip_pair": ["--sd3_model", files.checkpoint, "--models", nets["lora"], "--clip_l", files.clip_l],
        "no_t5": ["--sd3_model", without_t5, "--models", nets["lora"]],  # the LoRA adapts T5 too
    }[case]
    assert merge_network.main([str(a) for a in argv + ["--save_to", out, "--no_progress"]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("tool", ["merge_network", "extract_lora", "resize_lora"])
def test_help_is_instant_and_exits_zero(tool, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(tool).main(["--help"])
    assert exited.value.code == 0 and "--save_to" in capsys.readouterr().out

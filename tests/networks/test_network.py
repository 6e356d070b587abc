"""SD3 LoRA / LoKr networks on the miniature SD3.5-M: keys, no-op init, bypass == merge, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, save_safetensors
from networks import lokr_sd3, lora_sd3
from networks.options import parse_block_indices

MODULES = {"lora": lora_sd3, "lokr": lokr_sd3}
UNET_TARGETS = {"attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"}
TE_PARENTS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}
T5_PARENTS = {"T5Attention", "T5DenseGatedActDense", "T5DenseActDense"}
LOKR_W1 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
LOKR_W2 = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
# SAI module paths of the emb_dims parts, in emb_dims order
EMB_PATHS = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer.adaLN_modulation",
             "final_layer.linear")


def expected_names(mmdit: nn.Module, encoders, t5: bool = False, emb: tuple[int, ...] = (0,) * 6) -> set[str]:
    """The sd-scripts module names, derived from the models' own module trees."""
    names = set()
    emb_paths = [p for p, dim in zip(EMB_PATHS, emb) if dim > 0]
    for path, module in mmdit.named_modules():
        parts = path.split(".")
        if isinstance(module, nn.Linear) and parts[0] == "joint_blocks" and ".".join(parts[3:]) in UNET_TARGETS:
            names.add("lora_unet_" + path.replace(".", "_"))
        in_emb = any(path == p or path.startswith(p + ".") for p in emb_paths)
        if in_emb and isinstance(module, (nn.Linear, nn.Conv2d)):
            names.add("lora_unet_" + path.replace(".", "_"))
    specs = [("lora_te1_", encoders.clip_l, TE_PARENTS), ("lora_te2_", encoders.clip_g, TE_PARENTS)]
    specs += [("lora_te3_", encoders.t5xxl, T5_PARENTS)] if t5 else []
    for prefix, encoder, parents in specs:
        modules = dict(encoder.named_modules())
        for path, module in modules.items():
            parent = modules[path.rpartition(".")[0]] if "." in path else None
            if isinstance(module, nn.Linear) and type(parent).__name__ in parents:
                names.add(prefix + path.replace(".", "_"))
    return names


def module_names(sd: dict) -> set[str]:
    return {k.partition(".")[0] for k in sd}


def mmdit_inputs(cfg) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 5, cfg.context_dim, generator=gen)
    y = torch.randn(2, cfg.pooled_dim, generator=gen)
    return x, torch.tensor([250.0, 750.0]), context, y


def outputs(mmdit, encoders) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 5, 9, 17, 49407, 49407]])
    with torch.no_grad():
        return [
            mmdit(*mmdit_inputs(mmdit.config)),
            encoders.clip_l(ids).last_hidden_state,
            encoders.clip_g(ids).last_hidden_state,
        ]


def randomise(network, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_keys_match_model_modules(models, kind):
    mmdit, encoders = models()
    network = MODULES[kind].create_network(1.0, 4, 2.0, None, encoders, mmdit)
    sd = network.state_dict_for_save()
    assert module_names(sd) == expected_names(mmdit, encoders)
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in module_names(sd)
    last = f"lora_unet_joint_blocks_{len(mmdit.joint_blocks) - 1}_context_block_"
    assert {n for n in module_names(sd) if n.startswith(last)} == {last + "attn_qkv", last + "adaLN_modulation_1"}
    for name in module_names(sd):
        suffixes = {k.partition(".")[2] for k in sd if k.partition(".")[0] == name}
        if kind == "lora":
            assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
        else:
            assert "alpha" in suffixes and any(s <= suffixes for s in LOKR_W1) and any(s <= suffixes for s in LOKR_W2)
    with_t5 = MODULES[kind].create_network(1.0, 4, 2.0, None, encoders, mmdit, train_t5xxl="True")
    assert module_names(with_t5.state_dict_for_save()) == expected_names(mmdit, encoders, t5=True)
    with_emb = MODULES[kind].create_network(1.0, 4, 2.0, None, encoders, mmdit, emb_dims="[2,2,2,2,2,2]")
    emb_names = module_names(with_emb.state_dict_for_save())
    assert emb_names == expected_names(mmdit, encoders, emb=(2,) * 6)
    assert {"lora_unet_x_embedder_proj", "lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0",
            "lora_unet_t_embedder_mlp_2", "lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_final_layer_linear"} <= emb_names
    some = MODULES[kind].create_network(1.0, 4, 2.0, None, encoders, mmdit, emb_dims=[4, 0, 4, 4, 0, 4])
    assert module_names(some.state_dict_for_save()) == expected_names(mmdit, encoders, emb=(4, 0, 4, 4, 0, 4))


@pytest.mark.parametrize("kind,args", [("lora", {}), ("lokr", {}), ("lora", {"emb_dims": "[4,4,4,4,4,4]"}),
                                       ("lokr", {"emb_dims": "[4,4,4,4,4,4]", "factor": "4"})])
def test_fresh_network_changes_nothing_and_bypass_equals_merge(models, kind, args):
    mmdit, encoders = models()
    before = outputs(mmdit, encoders)
    state_keys = set(mmdit.state_dict())
    network = MODULES[kind].create_network(0.7, 4, 2.0, None, encoders, mmdit, **args)
    network.apply_to(encoders, mmdit, True, True)
    assert set(mmdit.state_dict()) == state_keys
    for a, b in zip(before, outputs(mmdit, encoders)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    randomise(network)
    bypass = outputs(mmdit, encoders)
    assert (bypass[0] - before[0]).abs().max() > 1e-3
    network.merge_to()
    merged = outputs(mmdit, encoders)
    for a, b in zip(bypass, merged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,args", [("lora", {}), ("lora", {"split_qkv": "True"}),
                                        ("lokr", {"factor": "4", "decompose_both": "True"}),
                                        ("lokr", {"full_matrix": "True"}), ("lokr", {"use_scalar": "True"}),
                                        ("lora", {"emb_dims": "[2,2,2,2,2,2]"}),
                                        ("lokr", {"emb_dims": "[2,2,2,2,2,2]", "full_matrix": "True"}),
                                        ("lokr", {"emb_dims": "[1,1,1,1,1,1]", "factor": "8"})])
def test_save_load_round_trip(models, tmp_path, kind, args):
    mmdit, encoders = models()
    network = MODULES[kind].create_network(1.0, 2, 1.0, None, encoders, mmdit, **args)
    randomise(network)
    network.apply_to()
    reference = outputs(mmdit, encoders)
    path = tmp_path / "net.safetensors"
    network.save_weights(path)
    saved = network.state_dict_for_save()
    assert module_names(load_safetensors(path)) == module_names(saved)
    other = MODULES[kind].create_network(1.0, 2, 1.0, None, encoders, mmdit, **args)
    other.load_weights(path)
    for key, tensor in other.state_dict_for_save().items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)
    network.restore()
    fresh_mmdit, fresh_encoders = models()
    loaded = MODULES[kind].create_network_from_weights(1.0, path, None, fresh_encoders, fresh_mmdit)
    assert loaded.state_dict_for_save().keys() == saved.keys()
    if "emb_dims" in args:
        assert isinstance(loaded.adapters["lora_unet_x_embedder_proj"].base, nn.Conv2d)
    loaded.apply_to()
    for a, b in zip(reference, outputs(fresh_mmdit, fresh_encoders)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_split_qkv_saves_combined_qkv(models):
    mmdit, encoders = models()
    plain = lora_sd3.create_network(1.0, 4, 2.0, None, encoders, mmdit).state_dict_for_save()
    network = lora_sd3.create_network(1.0, 4, 2.0, None, encoders, mmdit, split_qkv="true")
    module = network.adapters["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert module.num_parts == 3
    randomise(network)
    sd = network.state_dict_for_save()
    assert sd.keys() == plain.keys()
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    hidden = mmdit.config.hidden_size
    assert sd[f"{key}.lora_down.weight"].shape == (12, hidden)
    assert sd[f"{key}.lora_up.weight"].shape == (3 * hidden, 12)
    assert float(sd[f"{key}.alpha"]) == 6.0
    weight = module.base.weight.detach().clone()
    down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
    expected = weight + (6.0 / 12) * up @ down
    module.merge_to()
    torch.testing.assert_close(module.base.weight, expected, rtol=1e-6, atol=1e-6)


def test_per_type_dims_and_block_indices(models):
    mmdit, encoders = models()
    network = lora_sd3.create_network(
        1.0, 4, 4.0, None, None, mmdit, context_attn_dim="0", x_mlp_dim="8", x_mod_dim="2", train_block_indices="0,2"
    )
    sd = network.state_dict_for_save()
    names = module_names(sd)
    assert not any("context_block_attn" in n for n in names)
    assert {n.split("_")[4] for n in names} == {"0", "2"}
    assert sd["lora_unet_joint_blocks_0_x_block_mlp_fc1.lora_down.weight"].shape[0] == 8
    assert sd["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1.lora_down.weight"].shape[0] == 2
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 4
    assert sd["lora_unet_joint_blocks_0_context_block_mlp_fc1.lora_down.weight"].shape[0] == 4
    assert parse_block_indices("0,1,4-5,7") == {0, 1, 4, 5, 7}
    assert parse_block_indices("all") is None and parse_block_indices("none") == frozenset()
    none = lora_sd3.create_network(1.0, 4, 4.0, None, encoders, mmdit, train_block_indices="none")
    assert all(n.startswith("lora_te") for n in module_names(none.state_dict_for_save()))
    with pytest.raises(UserError, match="train_block_indices"):
        lora_sd3.create_network(1.0, 4, 4.0, None, None, mmdit, train_block_indices="0-9")


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_loraplus_param_groups(models, kind):
    mmdit, encoders = models()
    network = MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit, loraplus_lr_ratio="16")
    groups = {g["name"]: g for g in network.param_groups(1e-4, [5e-5, 0.0])}
    assert set(groups) == {"unet", "unet_plus", "te1", "te1_plus"}
    assert groups["unet_plus"]["lr"] == pytest.approx(16e-4)
    assert groups["te1_plus"]["lr"] == pytest.approx(16 * 5e-5)
    ups = {id(p) for m in network.adapters.values() for p in m.up_parameters()}
    assert all(id(p) in ups for p in groups["unet_plus"]["params"])
    assert not any(id(p) in ups for p in groups["unet"]["params"])
    plain = MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit).param_groups(1e-4)
    assert {g["name"] for g in plain} == {"unet", "te1", "te2"}


def test_unknown_network_arg_is_user_error(models):
    mmdit, encoders = models()
    with pytest.raises(UserError, match="conv_dim"):
        lora_sd3.create_network(1.0, 4, 4.0, None, encoders, mmdit, conv_dim="4")
    with pytest.raises(UserError, match="split_qkv"):
        lokr_sd3.create_network(1.0, 4, 4.0, None, encoders, mmdit, split_qkv="True")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_bad_files_are_one_line_user_errors(models, tiny_models, tmp_path, kind):
    medium, medium_te = models("sd35-medium")
    large, large_te = models("sd35-large")
    module = MODULES[kind]
    medium_path, large_path = tmp_path / "medium.safetensors", tmp_path / "large.safetensors"
    module.create_network(1.0, 4, 4.0, None, medium_te, medium).save_weights(medium_path)
    module.create_network(1.0, 4, 4.0, None, large_te, large).save_weights(large_path)
    with pytest.raises(UserError) as exc:
        module.create_network_from_weights(1.0, medium_path, None, large_te, large)
    assert "different model" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        module.create_network(1.0, 4, 4.0, None, medium_te, medium).load_weights(large_path)
    assert "different model" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        module.create_network_from_weights(1.0, tiny_models("sd35-medium").checkpoint, None, medium_te, medium)
    assert "not an SD3 LoRA/LoKr" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        module.create_network(1.0, 8, 4.0, None, medium_te, medium).load_weights(medium_path)
    assert ("rank" if kind == "lora" else "does not match") in _one_line(exc)
    other = MODULES["lokr" if kind == "lora" else "lora"]
    with pytest.raises(UserError) as exc:
        other.create_network(1.0, 4, 4.0, None, medium_te, medium).load_weights(medium_path)
    assert f"networks.{kind}_sd3" in _one_line(exc)


def test_bare_safetensors_is_not_a_network(tmp_path, models):
    mmdit, encoders = models()
    path = tmp_path / "x.safetensors"
    save_safetensors({"weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="not an SD3 LoRA/LoKr"):
        lora_sd3.create_network_from_weights(1.0, path, None, encoders, mmdit)


def test_plain_qkv_lora_cannot_load_into_split_qkv(tmp_path):
    import torch

    from library.errors import UserError
    from networks.modules import LoRAModule

    linear = torch.nn.Linear(8, 12)
    split = LoRAModule("lora_unet_x", linear, [torch.zeros(2, 8)] * 3, [torch.zeros(4, 2)] * 3, 2.0)
    plain = {"lora_down.weight": torch.randn(6, 8), "lora_up.weight": torch.randn(12, 6), "alpha": torch.tensor(6.0)}
    with pytest.raises(UserError, match="not split per q/k/v"):
        split.load_tensors(plain)

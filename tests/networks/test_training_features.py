"""emb_dims parsing, --network_dropout, verbose / summary lines and --scale_weight_norms."""

from __future__ import annotations

import logging
import re

import lycoris.functional.lokr as lycoris_lokr
import lycoris.modules.lokr as lycoris_modules
import pytest
import torch
import torch.nn.functional as F

from library.errors import UserError
from networks import lokr_sd3, lora_sd3
from networks.functional.conv import as_matrix
from networks.functional.lokr import lokr_bypass, lokr_scale
from networks.functional.lora import lora_bypass
from networks.functional.max_norm import factor_ratio, max_norm_scale
from networks.modules import conv_spec_of
from networks.options import parse_emb_dims
from tests.networks.test_network import MODULES, mmdit_inputs, randomise

LOKR_ORDER = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
EMB_ALL = "[2,2,2,2,2,2]"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- emb_dims


def test_emb_dims_parsing_and_ranks(models) -> None:
    assert parse_emb_dims("[4,0,4,4,0,4]") == (4, 0, 4, 4, 0, 4)
    assert parse_emb_dims(" 1, 2,3,4,5,6 ") == (1, 2, 3, 4, 5, 6)
    assert parse_emb_dims([4, 0, 4, 4, 0, 4]) == (4, 0, 4, 4, 0, 4)
    mmdit, _ = models()
    sd = lora_sd3.create_network(1.0, 4, 4.0, None, None, mmdit, emb_dims="[3,0,8,2,0,5]").state_dict_for_save()
    proj = mmdit.x_embedder.proj
    assert sd["lora_unet_x_embedder_proj.lora_down.weight"].shape == (8, proj.in_channels, *proj.kernel_size)
    assert sd["lora_unet_x_embedder_proj.lora_up.weight"].shape == (proj.out_channels, 8, 1, 1)
    assert sd["lora_unet_context_embedder.lora_down.weight"].shape[0] == 3
    assert sd["lora_unet_y_embedder_mlp_2.lora_down.weight"].shape[0] == 2
    assert sd["lora_unet_final_layer_linear.lora_down.weight"].shape[0] == 5
    assert not any(k.startswith(("lora_unet_t_embedder", "lora_unet_final_layer_adaLN")) for k in sd)
    for bad in ("[4,0,4]", [1, 2, 3, 4, 5, 6, 7], "[4,0,4,4,0,-1]"):
        with pytest.raises(UserError, match="emb_dims") as exc:
            lokr_sd3.create_network(1.0, 4, 4.0, None, None, mmdit, emb_dims=bad)
        assert "\n" not in str(exc.value) and "6 ranks" in str(exc.value)
    with pytest.raises(UserError, match="emb_dims"):
        lora_sd3.create_network(1.0, 4, 4.0, None, None, mmdit, emb_dims="[a,0,4,4,0,4]")


# ---------------------------------------------------------------- neuron dropout


def _lora_case():
    gen = _gen(1)
    down, up = torch.randn(6, 16, generator=gen), torch.randn(12, 6, generator=gen)
    return torch.randn(4, 3, 16, generator=gen), torch.zeros(4, 3, 12), down, up


def test_lora_neuron_dropout_placement_and_expectation() -> None:
    x, base, down, up = _lora_case()
    expected = lora_bypass(x, base, down, up, 0.5)
    assert torch.equal(lora_bypass(x, base, down, up, 0.5, neuron_dropout=0.4), expected)  # eval: no effect
    torch.manual_seed(3)
    one = lora_bypass(x, base, down, up, 0.5, neuron_dropout=0.4, training=True)
    torch.manual_seed(3)
    by_hand = (F.dropout(x @ down.t(), p=0.4, training=True) @ up.t()) * 0.5  # sd-scripts: dropout on lx
    torch.testing.assert_close(one, by_hand, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(one, expected)
    draws = torch.stack([lora_bypass(x, base, down, up, 0.5, neuron_dropout=0.4, training=True) for _ in range(4000)])
    assert (draws.mean(0) - expected).abs().max() / expected.abs().max() < 0.05


@pytest.mark.parametrize("conv", [False, True])
def test_lokr_neuron_dropout_matches_lycoris_bypass(conv: bool) -> None:
    layer = torch.nn.Conv2d(16, 24, 2, 2) if conv else torch.nn.Linear(48, 64)
    layer.requires_grad_(False)
    module = lycoris_modules.LokrModule("m", layer, lora_dim=2, alpha=1, factor=4, dropout=0.3, bypass_mode=True)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=_gen(2)) * 0.3)
    tensors = {k: as_matrix(v.detach()) for k, v in module.named_parameters() if k.startswith("lokr_")}
    x = torch.randn(2, 16, 8, 8) if conv else torch.randn(3, 5, 48)
    scale, spec = lokr_scale(1, 2, tensors), conv_spec_of(layer)
    eval_out = lokr_bypass(x, layer(x), tensors, scale, conv=spec, neuron_dropout=0.3)
    module.train()
    torch.manual_seed(7)
    theirs = module(x).detach()
    torch.manual_seed(7)
    ours = lokr_bypass(x, layer(x), tensors, scale, conv=spec, neuron_dropout=0.3, training=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, eval_out)
    module.eval()
    torch.testing.assert_close(eval_out, module(x).detach(), rtol=1e-5, atol=1e-5)
    draws = torch.stack([lokr_bypass(x, layer(x), tensors, scale, conv=spec, neuron_dropout=0.3, training=True)
                         for _ in range(3000)])
    delta = eval_out - layer(x)
    assert (draws.mean(0) - eval_out).abs().max() / delta.abs().max() < 0.06


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_network_dropout_on_the_network(models, kind) -> None:
    mmdit, encoders = models()
    network = MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit, neuron_dropout=0.25,
                                           emb_dims=EMB_ALL)
    assert network.neuron_dropout == 0.25
    assert all(m.neuron_dropout == 0.25 for m in network.adapters.values())
    randomise(network)
    network.apply_to()
    inputs = mmdit_inputs(mmdit.config)
    network.eval()
    with torch.no_grad():
        first, second = mmdit(*inputs), mmdit(*inputs)
        network.train()
        dropped = mmdit(*inputs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert (dropped - first).abs().max() > 1e-4
    assert MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit).neuron_dropout is None
    with pytest.raises(UserError, match="network_dropout"):
        MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit, neuron_dropout=1.5)


# ---------------------------------------------------------------- verbose and summary


def _category(name: str) -> str:
    """The expected summary category, spelled out independently of networks.targets."""
    if not name.startswith("lora_unet_"):
        return name.split("_")[1]
    for stream in ("context", "x"):
        for part, kind in (("attn", "attn"), ("attn2", "attn"), ("mlp", "mlp"), ("adaLN_modulation", "mod")):
            if re.match(rf"lora_unet_joint_blocks_\d+_{stream}_block_{part}_", name):
                return f"unet {stream} {kind}"
    return "unet emb"


@pytest.mark.parametrize("kind,args", [("lora", {"split_qkv": "true"}), ("lokr", {"use_scalar": "true"})])
def test_summary_counts_and_verbose_log(models, caplog, kind, args) -> None:
    mmdit, encoders = models()
    with caplog.at_level(logging.INFO, logger="networks.network"):
        network = MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit, emb_dims=EMB_ALL,
                                               train_t5xxl="true", verbose="true", **args)
    expected: dict[str, list[int]] = {}
    for name, module in network.adapters.items():
        counts = expected.setdefault(_category(name), [0, 0])
        counts[0] += 1
        counts[1] += sum(p.numel() for p in module.parameters())
    assert set(expected) == {"unet context attn", "unet context mlp", "unet context mod", "unet x attn",
                             "unet x mlp", "unet x mod", "unet emb", "te1", "te2", "te3"}
    assert {c: list(v) for c, v in network.summary().items()} == expected
    lines = network.summary_lines()
    assert len(lines) == len(expected) + 1
    parsed = {}
    for line in lines:
        match = re.fullmatch(rf"{kind} (.+?)\s*: +(\d+) modules, +([\d,]+) params", line)
        parsed[match.group(1)] = [int(match.group(2)), int(match.group(3).replace(",", ""))]
    assert parsed.pop("total") == [len(network.adapters), sum(p.numel() for p in network.parameters())]
    assert parsed == expected
    messages = [r.getMessage() for r in caplog.records]
    assert all(line in messages for line in lines)
    for name, module in network.adapters.items():
        assert any(m.startswith(f"{name}: {kind} rank {module.rank}") for m in messages), name
    quiet = MODULES[kind].create_network(1.0, 4, 4.0, None, encoders, mmdit)
    assert "unet emb" not in quiet.summary()


# ---------------------------------------------------------------- max-norm regularisation


def test_max_norm_scale() -> None:
    norms = torch.tensor([0.0, 0.3, 1.0, 1.5, 4.0])
    torch.testing.assert_close(max_norm_scale(norms, 1.0), torch.tensor([1.0, 1.0, 1.0, 1 / 1.5, 0.25]))
    assert float(factor_ratio(torch.tensor(0.25), 2)) == pytest.approx(0.5)
    assert float(factor_ratio(torch.tensor(0.125), 3)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        max_norm_scale(norms, 0.0)


def _file_delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW from a module's saved tensors, by the file formats' formulas."""
    alpha = float(tensors["alpha"])
    if "lora_down.weight" in tensors:
        down, up = as_matrix(tensors["lora_down.weight"]), as_matrix(tensors["lora_up.weight"])
        return up @ down * (alpha / down.shape[0])
    return lycoris_lokr.diff_weight(*(tensors.get(k) for k in LOKR_ORDER), None, gamma=alpha, backend="torch")


def _saved_by_module(network) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in network.state_dict_for_save().items():
        name, _, tensor_key = key.partition(".")
        out.setdefault(name, {})[tensor_key] = tensor
    return out


@pytest.mark.parametrize("kind,args", [("lora", {}), ("lora", {"split_qkv": "true"}),
                                       ("lokr", {"decompose_both": "true", "factor": "8"}),
                                       ("lokr", {"use_scalar": "true"}), ("lokr", {"full_matrix": "true"})])
def test_apply_max_norm_regularization(models, kind, args) -> None:
    mmdit, encoders = models()
    network = MODULES[kind].create_network(1.0, 2, 1.0, None, encoders, mmdit, emb_dims=EMB_ALL, **args)
    randomise(network, seed=5)
    before = _saved_by_module(network)
    norms = {name: float(_file_delta(t).norm()) for name, t in before.items()}
    max_norm = sorted(norms.values())[len(norms) // 2]
    over = {name for name, norm in norms.items() if norm > max_norm}
    assert 0 < len(over) < len(norms)
    scaled, mean_norm, top_norm = network.apply_max_norm_regularization(max_norm)
    after = _saved_by_module(network)
    new_norms = {name: float(_file_delta(t).norm()) for name, t in after.items()}
    assert scaled == len(over)
    for name in norms:
        assert new_norms[name] <= max_norm + 1e-5
        if name in over:
            assert new_norms[name] == pytest.approx(max_norm, rel=1e-4)
        else:
            for key, tensor in after[name].items():
                assert torch.equal(tensor, before[name][key]), (name, key)
    assert top_norm == pytest.approx(max(new_norms.values()), rel=1e-4)
    assert mean_norm == pytest.approx(sum(new_norms.values()) / len(new_norms), rel=1e-4)

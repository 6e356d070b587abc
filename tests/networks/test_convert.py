"""sd-scripts <-> diffusers/PEFT network conversion: diffusers and PEFT load the export and compute what
our on-the-fly network computes; the reverse conversion gives the file back; key map and row swaps."""

from __future__ import annotations

import json

import pytest
import torch

from library.errors import UserError
from library.models.mmdit_config import to_diffusers_config
from library.models.safetensors_io import load_safetensors, safetensors_bytes, save_safetensors
from library.models.text_encoders import load_text_encoders
from networks import lokr_sd3, lora_sd3
from networks.convert import (
    PEFT_CONFIG_KEY, detect_format, from_peft, lokr_peft_config, permute_lokr_rows, to_peft,
)
from networks.convert_keys import UnetKeyMap, join_name, split_name

MODULES = {"lora": lora_sd3, "lokr": lokr_sd3}
ALL_EMB = "[2,2,2,2,2,2]"
TOL = 1e-5


def _network(kind: str, mmdit, encoders, dim: int = 4, alpha: float | None = 3.0, seed: int = 3, **network_args):
    network = MODULES[kind].create_network(1.0, dim, alpha, None, encoders, mmdit, emb_dims=ALL_EMB, **network_args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return network


def _inputs(cfg):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 8, 12, generator=gen)
    return x, torch.tensor([250.0, 750.0]), torch.randn(2, 5, cfg.context_dim, generator=gen), \
        torch.randn(2, cfg.pooled_dim, generator=gen)


def _diffusers_transformer(checkpoint, cfg):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = load_safetensors(checkpoint, prefix="model.diffusion_model.", strip_prefix=False)
    model = SD3Transformer2DModel(**{k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")})
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(state), strict=True)
    return model.eval().requires_grad_(False)


def _theirs(transformer, inputs) -> torch.Tensor:
    x, t, ctx, y = inputs
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample


def _ours_with(network, mmdit, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        base = mmdit(*inputs)
        network.apply_to()
        adapted = mmdit(*inputs)
        network.restore()
    return base, adapted


def _export(tmp_path, network) -> tuple:
    tensors, metadata = to_peft(network.state_dict_for_save(), {"ss_network_dim": "4"})
    path = tmp_path / "peft.safetensors"
    save_safetensors(tensors, path, metadata)
    return path, tensors


@pytest.mark.parametrize("variant", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_lora_export_loads_in_diffusers_pipeline(models, tiny_models, tmp_path, variant):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    mmdit, encoders = models(variant)
    network = _network("lora", mmdit, encoders)
    path, tensors = _export(tmp_path, network)
    assert any(k.startswith("text_encoder_2.") for k in tensors) and all(".lora_" in k for k in tensors)
    files = tiny_models(variant)
    theirs_te = load_text_encoders(files.checkpoint)
    pipe = StableDiffusion3Pipeline(transformer=_diffusers_transformer(files.checkpoint, mmdit.config),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=theirs_te.clip_l,
                                    tokenizer=None, text_encoder_2=theirs_te.clip_g, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    inputs = _inputs(mmdit.config)
    base, ours = _ours_with(network, mmdit, inputs)
    assert (_theirs(pipe.transformer, inputs) - base).abs().max() <= TOL
    pipe.load_lora_weights(str(path))
    theirs = _theirs(pipe.transformer, inputs)
    assert (ours - base).abs().max() > 1e-2  # the LoRA matters, so a silently ignored key would show
    assert (theirs - ours).abs().max() <= TOL
    ids = torch.tensor([[49406, 5, 9, 17, 49407, 49407]])
    network.apply_to()
    with torch.no_grad():
        for mine, their in ((encoders.clip_l, pipe.text_encoder), (encoders.clip_g, pipe.text_encoder_2)):
            expected = mine(ids).last_hidden_state
            assert (their(ids).last_hidden_state - expected).abs().max() <= TOL
    network.restore()


CASES = [
    ("lora", {}, None),
    ("lora", {"split_qkv": "True", "train_t5xxl": "True"}, 3.0),
    ("lokr", {"train_t5xxl": "True"}, 3.0),
    ("lokr", {"decompose_both": "True", "factor": "4"}, 3.0),
    ("lokr", {"full_matrix": "True"}, None),
]


@pytest.mark.parametrize("kind,network_args,alpha", CASES)
def test_round_trip_gives_the_file_back(models, tmp_path, kind, network_args, alpha):
    mmdit, encoders = models("sd35-medium")
    network = _network(kind, mmdit, encoders, alpha=alpha, **network_args)
    original, metadata = network.state_dict_for_save(), {"ss_network_module": f"networks.{kind}_sd3"}
    exported, export_meta = to_peft(original, metadata)
    assert detect_format(list(exported)) == "diffusers" and detect_format(list(original)) == "sd-scripts"
    back, back_meta = from_peft(exported, export_meta)
    assert back_meta == metadata and set(back) == set(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape
        # baking alpha/r in and out rounds twice: one float32 ulp at most
        torch.testing.assert_close(back[key], tensor, rtol=2.5e-7, atol=0.0)
    if alpha is None:  # scale 1: nothing to bake, the file comes back byte for byte
        assert safetensors_bytes(back, back_meta) == safetensors_bytes(original, metadata)


def test_lokr_export_loads_via_load_lora_adapter(models, tiny_models, tmp_path):
    mmdit, encoders = models("sd3-medium")
    network = _network("lokr", mmdit, encoders, context_attn_dim=2)
    path, tensors = _export(tmp_path, network)
    assert "transformer.transformer_blocks.0.attn.to_qkv.lokr_w1" in tensors  # qkv goes to the fused projection
    assert "transformer.pos_embed.proj.lokr_w2_b" in tensors  # the patch conv, low-rank w2
    transformer = _diffusers_transformer(tiny_models("sd3-medium").checkpoint, mmdit.config)
    inputs = _inputs(mmdit.config)
    base, ours = _ours_with(network, mmdit, inputs)
    transformer.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    assert (ours - base).abs().max() > 1e-2
    assert (_theirs(transformer, inputs) - ours).abs().max() <= TOL


def test_diffusers_fused_qkv_attention_cannot_run_sd35(tiny_models):
    """Why SD3.5 LoKr on qkv is checked through PEFT below: diffusers 0.42's FusedJointAttnProcessor2_0,
    which ``load_lora_adapter`` switches to for a fused-qkv LoKr, skips the qk RMSNorm (SD3.5-L gives
    another function) and needs a context stream (SD3.5-M's image-only attn2 crashes)."""
    for variant in ("sd35-large", "sd35-medium"):
        files = tiny_models(variant)
        transformer = _diffusers_transformer(files.checkpoint, files.config)
        inputs = _inputs(files.config)
        before = _theirs(transformer, inputs)
        transformer.fuse_qkv_projections()  # what load_lora_adapter does for a to_qkv LoKr; weights unchanged
        if variant == "sd35-large":
            assert (_theirs(transformer, inputs) - before).abs().max() > 1e-2
        else:
            with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'ndim'"):
                _theirs(transformer, inputs)


def _merge_and_unfuse(transformer) -> None:
    """Fold every PEFT LoKr layer into its base weight, copy fused q/k/v weights back into the separate
    projections and return to the unfused (qk-norm aware) attention processors."""
    from peft.tuners.lokr.layer import LoKrLayer

    for module in transformer.modules():
        if isinstance(module, LoKrLayer):
            module.merge()
    for module in transformer.modules():
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")),
                             ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            layer = getattr(module, fused, None)
            if layer is None:
                continue
            weight = getattr(layer, "base_layer", layer).weight
            for name, chunk in zip(parts, weight.chunk(3)):
                getattr(module, name).weight.data.copy_(chunk)
    transformer.unfuse_qkv_projections()


@pytest.mark.parametrize("variant,network_args", [("sd35-medium", {"decompose_both": "True"}),
                                                  ("sd35-large", {"factor": "4"})])
def test_lokr_export_in_peft_lokr_model(models, tiny_models, variant, network_args):
    from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict

    mmdit, encoders = models(variant)
    network = _network("lokr", mmdit, encoders, **network_args)
    tensors, metadata = to_peft(network.state_dict_for_save())
    config = {k.removeprefix("transformer."): v for k, v in json.loads(metadata[PEFT_CONFIG_KEY]).items()
              if k.startswith("transformer.")}
    state = {k.removeprefix("transformer."): v for k, v in tensors.items() if k.startswith("transformer.")}
    transformer = _diffusers_transformer(tiny_models(variant).checkpoint, mmdit.config)
    transformer.fuse_qkv_projections()
    inject_adapter_in_model(LoKrConfig(**config), transformer, adapter_name="default")
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lokr_" in k]
    _merge_and_unfuse(transformer)
    inputs = _inputs(mmdit.config)
    base, ours = _ours_with(network, mmdit, inputs)
    assert (ours - base).abs().max() > 1e-2
    assert (_theirs(transformer, inputs) - ours).abs().max() <= TOL


def test_names_and_row_maps(models):
    mmdit, encoders = models("sd35-medium")
    names = {k.partition(".")[0] for k in _network("lora", mmdit, encoders, train_t5xxl="True").state_dict_for_save()}
    assert all(join_name(*split_name(n)) == n for n in names)
    assert split_name("lora_unet_joint_blocks_2_context_block_adaLN_modulation_1") == (
        "unet", "joint_blocks.2.context_block.adaLN_modulation.1")
    unet = UnetKeyMap()
    qkv = unet.to_diffusers("joint_blocks.3.context_block.attn.qkv", 96, 32)
    assert [(p.target, p.parts, p.blocks) for p in qkv] == [
        ("transformer_blocks.3.attn.add_q_proj", 3, (0,)), ("transformer_blocks.3.attn.add_k_proj", 3, (1,)),
        ("transformer_blocks.3.attn.add_v_proj", 3, (2,))]
    assert unet.fused_target(qkv) == "transformer_blocks.3.attn.to_added_qkv"
    last, = unet.to_diffusers("joint_blocks.2.context_block.adaLN_modulation.1", 64, 32)  # pre-only: 2·D rows
    full, = unet.to_diffusers("joint_blocks.2.context_block.adaLN_modulation.1", 192, 32)
    final, = unet.to_diffusers("final_layer.adaLN_modulation.1", 64, 32)
    assert (last.parts, last.blocks) == (final.parts, final.blocks) == (2, (1, 0)) and full.identity
    assert last.rows(4).tolist() == [2, 3, 0, 1] and final.target == "norm_out.linear"
    assert unet.to_sai("norm_out.linear", 64, 32)[0] == "final_layer.adaLN_modulation.1"
    assert unet.to_sai("transformer_blocks.1.attn2.to_v", 32, 32)[0] == "joint_blocks.1.x_block.attn2.qkv"


def test_permute_lokr_rows_is_the_row_permutation_of_the_kronecker_product():
    gen = torch.Generator().manual_seed(0)
    swap = torch.cat([torch.arange(12, 24), torch.arange(12)])
    for a, b in ((4, 6), (1, 24)):  # W1 rows even: W1's rows move; one W1 row: W2's rows move
        tensors = {"lokr_w1": torch.randn(a, 3, generator=gen), "lokr_w2_a": torch.randn(b, 2, generator=gen),
                   "lokr_w2_b": torch.randn(2, 5, generator=gen)}
        moved = permute_lokr_rows(tensors, swap)
        expected = torch.kron(tensors["lokr_w1"], tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])[swap]
        assert torch.equal(torch.kron(moved["lokr_w1"], moved["lokr_w2_a"] @ moved["lokr_w2_b"]), expected)
    odd = {"lokr_w1": torch.randn(3, 3, generator=gen), "lokr_w2": torch.randn(8, 5, generator=gen)}
    with pytest.raises(UserError, match="row swap"):
        permute_lokr_rows(odd, swap)


def test_lokr_config_reproduces_the_factor_shapes(models):
    mmdit, encoders = models("sd3-medium")
    tensors, _ = to_peft(_network("lokr", mmdit, encoders, factor="4", context_mlp_dim=2).state_dict_for_save())
    config = lokr_peft_config(tensors)
    assert config["transformer.decompose_factor"] in (-1, 4) and config["transformer.alpha"] == config["transformer.r"]
    assert "pos_embed.proj" in config["transformer.target_modules"]  # layer names below the prefix
    assert config["transformer.rank_pattern"]["^transformer_blocks\\.0\\.ff_context\\.net\\.2$"] == 2


def test_conversion_errors(models, tmp_path):
    mmdit, encoders = models("sd3-medium")
    lokr, _ = to_peft(_network("lokr", mmdit, encoders).state_dict_for_save())
    split = {k.replace("to_added_qkv", "add_q_proj"): v for k, v in lokr.items() if "blocks.0.attn.to_added_qkv" in k}
    split.update({k.replace("add_q_proj", "add_k_proj"): v for k, v in split.items()})
    with pytest.raises(UserError, match="to_q/to_k/to_v cannot be joined"):
        from_peft(split)
    with pytest.raises(UserError, match="not a diffusers/PEFT LoRA or LoKr tensor"):
        from_peft({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="not an SD3 LoRA/LoKr file"):
        to_peft({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="no counterpart"):
        from_peft({"transformer.transformer_blocks.0.attn.bogus.lora_A.weight": torch.zeros(2, 8),
                   "transformer.transformer_blocks.0.attn.bogus.lora_B.weight": torch.zeros(8, 2)})

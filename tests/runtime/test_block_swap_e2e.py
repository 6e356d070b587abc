"""--blocks_to_swap end to end on the miniatures (depth 3, so one block can swap): training, training
samples and inference give exactly what they give without it (fp32, CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sd3_train
import sd3_train_network
from tests.test_sd3_train import _plain
from tests.test_sd3_train_network import _argv as _network_argv


def _losses(state: Path) -> torch.Tensor:
    return torch.load(state / "extra.pt", weights_only=True)["loss_history"]


def _assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys() and first
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.mark.slow
def test_full_finetune_with_block_swap_is_bit_identical(tiny_models, tmp_path, caplog):
    """3 steps of 2 accumulated micro-batches: the swapped block's gradients land on the CPU, accumulate through
    the device, and its optimizer state lives on the CPU; weights and losses are the same bits."""
    files = tiny_models("sd3-medium")
    common = ("--gradient_accumulation_steps", "2", "--save_every_n_steps", "3", "--save_state")
    assert sd3_train.main(_plain(files, tmp_path / "plain", 3, *common)) == 0
    with caplog.at_level(logging.INFO):  # --lowram: the MMDiT streamed tensor by tensor to its device
        assert sd3_train.main(_plain(files, tmp_path / "swap", 3, *common, "--blocks_to_swap", "1", "--lowram")) == 0
    assert "block swap: joint_blocks 2-2 (1 of 3) on the CPU" in caplog.text
    assert "--lowram: loaded the MMDiT tensor by tensor onto cpu (joint blocks 2+ onto the CPU)" in caplog.text
    _assert_same_tensors(tmp_path / "plain" / "out" / "m.safetensors", tmp_path / "swap" / "out" / "m.safetensors")
    plain, swap = _losses(tmp_path / "plain" / "out" / "m-state"), _losses(tmp_path / "swap" / "out" / "m-state")
    assert len(plain) == 3 and torch.equal(plain, swap)
    optimizer = torch.load(tmp_path / "swap" / "out" / "m-state" / "optimizer.pt", weights_only=False)
    assert all(t.device.type == "cpu" for s in optimizer["state"].values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.slow
def test_lora_on_fp8_base_with_block_swap_and_samples_is_bit_identical(tiny_models, tmp_path, capsys):
    """LoRA over an fp8 base; samples rendered with all blocks resident (--blocks_to_swap_while_sampling 0),
    and in a run without swap with one block swapped only while sampling: same network, losses and images."""
    files = tiny_models("sd35-medium")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle --w 32 --h 32 --d 5 --s 2 --l 2\n")
    common = ("--network_module", "networks.lora_sd3", "--network_dim", "4", "--network_train_unet_only", "--fp8_base",
              "--max_train_steps", "3", "--save_every_n_steps", "3", "--save_state", "--sample_prompts", str(prompts),
              "--sample_every_n_steps", "3")
    runs = {"plain": (), "swap": ("--blocks_to_swap", "1", "--blocks_to_swap_while_sampling", "0"),
            "sampling": ("--blocks_to_swap_while_sampling", "1")}
    for name, extra in runs.items():  # separate folders: a run reusing another's caches would read them back
        code = sd3_train_network.main(_network_argv(files, tmp_path / name, *common, *extra, name=name))
        assert code == 0, capsys.readouterr().err
    images = {}
    for name in runs:
        out, plain = tmp_path / name / "out", tmp_path / "plain" / "out"
        if name != "plain":
            _assert_same_tensors(plain / "plain.safetensors", out / f"{name}.safetensors")
            assert torch.equal(_losses(plain / "plain-state"), _losses(out / f"{name}-state"))
        (png,) = sorted((out / "sample").glob(f"{name}_000003_00_*.png"))
        images[name] = np.asarray(Image.open(png))
    assert images["plain"].std() > 0
    assert all(np.array_equal(images["plain"], images[name]) for name in runs)


@pytest.mark.parametrize("extra, needle", [
    (("--blocks_to_swap", "2"), "--blocks_to_swap 2: this model has 3 joint blocks, so at most 1 can swap"),
    (("--blocks_to_swap", "1", "--fused_backward_pass"), "cannot be combined with --fused_backward_pass"),
])
def test_bad_block_swap_flags_are_one_line_errors(tiny_models, tmp_path, capsys, extra, needle):
    files = tiny_models("sd3-medium")
    code = sd3_train.main(_plain(files, tmp_path, 2, *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_full_finetune_with_block_swap_on_several_processes_is_refused():
    from library.config import ModelConfig, NetworkConfig, RunConfig
    from library.errors import UserError
    from library.training.engine import _check_block_swap

    cfg = RunConfig(model=ModelConfig(blocks_to_swap=2))
    with pytest.raises(UserError, match="one GPU only"):
        _check_block_swap(cfg, processes=2)
    _check_block_swap(cfg, processes=1)
    _check_block_swap(RunConfig(model=ModelConfig(blocks_to_swap=2), network=NetworkConfig()), processes=2)  # networks: DDP fine


def test_vae_kept_for_samples_waits_on_the_cpu_unless_highvram():
    from types import SimpleNamespace

    from library.config import ModelConfig, RunConfig
    from library.training.engine import _park_idle

    moves: list[str] = []
    vae = SimpleNamespace(to=moves.append)
    _park_idle(RunConfig(), SimpleNamespace(vae=None), (None, None, vae))  # latents cached: VAE only for samples
    _park_idle(RunConfig(model=ModelConfig(highvram=True)), SimpleNamespace(vae=None), (None, None, vae))
    _park_idle(RunConfig(), SimpleNamespace(vae=vae), (None, None, vae))  # encodes every batch: stays
    assert moves == ["cpu"]

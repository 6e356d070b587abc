"""Block swap on a miniature MMDiT (CPU: the same path as on a GPU, with CPU copies and no streams)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from library.errors import UserError
from library.models.mmdit import MMDiT
from library.models.tiny.mmdit import tiny_mmdit_config, tiny_mmdit_state_dict
from library.runtime.block_swap import BlockSwap, attach_block_swap, check_blocks_to_swap
from library.runtime.fp8 import store_linears_in_fp8

DEPTH = 6  # dual attention in blocks 0, 1 and 4: swapped blocks of different sizes (the last is smaller too)


def _model(seed: int = 0) -> MMDiT:
    cfg = replace(tiny_mmdit_config("sd35-medium"), depth=DEPTH, dual_attention_layers=(0, 1, 4))
    model = MMDiT(cfg)
    model.load_state_dict(tiny_mmdit_state_dict(cfg, seed))
    return model


def _inputs(seed: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, 12, generator=gen), torch.rand(batch, generator=gen) * 1000,
            torch.randn(batch, 5, 48, generator=gen), torch.randn(batch, 40, generator=gen))


def _pair(count: int, checkpointing: bool = False) -> tuple[MMDiT, MMDiT, BlockSwap]:
    ref = _model()
    swapped = copy.deepcopy(ref)
    ref.gradient_checkpointing = swapped.gradient_checkpointing = checkpointing
    swap = attach_block_swap(swapped, swapped.joint_blocks, count, "cpu")
    return ref, swapped, swap


def _within(t: torch.Tensor, flat: torch.Tensor) -> bool:
    return flat.data_ptr() <= t.data_ptr() < flat.data_ptr() + flat.numel()


def _on(block: torch.nn.Module, flat: torch.Tensor) -> bool:
    """Every tensor of ``block`` is a view of the byte buffer ``flat``."""
    return all(_within(p, flat) for p in block.parameters())


def test_weights_round_trip_bit_exact():
    ref, model, swap = _pair(4)
    assert list(swap.swapped) == [2, 3, 4, 5]
    assert all(_on(model.joint_blocks[j], swap._host[j]) for j in swap.swapped)  # parked on the host copies
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with swap.swapping(1):  # blocks 2-4 resident for a while (copies of their own), then back on the host copy
        assert not any(_within(p, swap._host[2]) for p in model.joint_blocks[2].parameters())
        for key, value in ref.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    assert swap.count == 4 and _on(model.joint_blocks[2], swap._host[2])
    swap.remove()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    copies = swap.stats.h2d_copies
    model(*_inputs(0))
    assert swap.stats.h2d_copies == copies  # hooks gone


@pytest.mark.parametrize("count, checkpointing", [(1, False), (4, False), (4, True)])
def test_training_steps_match_unswapped_bit_exactly(count, checkpointing):
    """Full fine-tuning: 3 AdamW steps of 2 accumulated micro-batches; outputs, gradients and weights equal."""
    ref, model, swap = _pair(count, checkpointing)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (ref, model)]
    grad_ptrs = []
    for step in range(3):
        for micro in range(2):
            inputs = _inputs(10 * step + micro)
            outs = [m(*inputs) for m in (ref, model)]
            assert torch.equal(outs[0], outs[1])
            for out in outs:
                out.square().mean().backward()
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        last = model.joint_blocks[DEPTH - 1].x_block.mlp.fc1.weight
        assert last.device.type == "cpu" and _within(last, swap._host[DEPTH - 1])
        grad_ptrs.append(last.grad.data_ptr())
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    grads = swap._grad_host[DEPTH - 1]  # the same host gradient buffer every step
    assert len(set(grad_ptrs)) == 1 and grads.data_ptr() <= grad_ptrs[0] < grads.data_ptr() + grads.numel()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert swap.stats.backward_passes == 6 and swap.stats.grad_h2d_bytes > 0  # accumulation went through the device


def test_device_buffers_stay_fixed():
    """Live swapped blocks always sit in the same two slot buffers: nothing is allocated per step."""
    _, model, swap = _pair(4)
    slots = [s.data_ptr() for s in swap._slots]
    seen: list[set[int]] = []

    def record(module, inputs):
        assert any(_on(module, slot) for slot in swap._slots)
        seen[-1].update(p.data_ptr() for p in module.parameters())

    handles = [model.joint_blocks[j].register_forward_pre_hook(record) for j in swap.swapped]
    for step in range(3):
        seen.append(set())
        model(*_inputs(step)).square().mean().backward()
        with torch.no_grad():
            model(*_inputs(step))
    for handle in handles:
        handle.remove()
    assert len(swap._slots) == 2 and [s.data_ptr() for s in swap._slots] == slots
    assert seen[0] and seen[1] == seen[0] and seen[2] == seen[0]
    assert swap.stats.h2d_copies == 3 * (4 + 2 + 4)  # per step: forward 4, backward 2 (2 still in place), no-grad 4


def test_too_many_blocks_is_a_user_error():
    model = _model()
    with pytest.raises(UserError, match=f"at most {DEPTH - 2} can swap"):
        BlockSwap(model.joint_blocks, DEPTH - 1, "cpu")
    with pytest.raises(UserError, match="--blocks_to_swap_while_sampling -1"):
        check_blocks_to_swap(-1, DEPTH, "--blocks_to_swap_while_sampling")
    swap = BlockSwap(model.joint_blocks, 2, "cpu")
    with pytest.raises(UserError, match="at most 4"):
        with swap.swapping(5):
            pass
    assert check_blocks_to_swap(None, DEPTH) == 0 and swap.count == 2


def test_no_grad_forward_parks_every_block_and_skips_layers():
    ref, model, swap = _pair(3)
    with torch.no_grad():
        for skip in (None, [4], [5], [3, 5]):
            inputs = _inputs(3)
            assert torch.equal(ref(*inputs, skip_layers=skip), model(*inputs, skip_layers=skip)), skip
            assert all(_on(model.joint_blocks[j], swap._host[j]) for j in swap.swapped)
        with swap.swapping(0):
            assert torch.equal(ref(*_inputs(4)), model(*_inputs(4)))
        with swap.swapping(4):
            assert torch.equal(ref(*_inputs(5)), model(*_inputs(5)))
    assert swap.count == 3


def test_frozen_fp8_base_with_lora_swaps_as_fp8():
    """A network over a frozen fp8 base: base weights swap in fp8, the adapters (on the device) train the same."""
    from networks.lora_sd3 import create_network

    models = []
    for swapped in (False, True):
        model = _model().requires_grad_(False)
        store_linears_in_fp8(model.joint_blocks)
        network = create_network(1.0, 4, 2.0, None, None, model)
        torch.manual_seed(0)
        for param in network.parameters():
            torch.nn.init.normal_(param, std=0.1)
        network.apply_to()
        swap = attach_block_swap(model, model.joint_blocks, 3, "cpu") if swapped else None
        models.append((model, network, swap))
    (ref, ref_net, _), (model, net, swap) = models
    assert swap._host[DEPTH - 1].numel() < sum(p.numel() * 4 for p in model.joint_blocks[DEPTH - 1].parameters()) / 2
    assert model.joint_blocks[DEPTH - 1].x_block.mlp.fc1.weight.dtype == torch.float8_e4m3fn
    for step in range(2):
        inputs = _inputs(step)
        outs = [m(*inputs) for m in (ref, model)]
        assert torch.equal(outs[0], outs[1])
        for out in outs:
            out.square().mean().backward()
        for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
            assert a.grad is not None and torch.equal(a.grad, b.grad), name
    assert all(p.grad is None for p in model.parameters())  # frozen base: host->device copies only
    assert swap.stats.grad_d2h_bytes == 0 and swap.stats.backward_passes == 2

"""Conv2d targets (the MMDiT's patch embedding): bypass == merged conv, file layout, LyCORIS oracles."""

from __future__ import annotations

import lycoris.functional.lokr as lycoris_lokr
import lycoris.modules.lokr as lycoris_modules
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.functional.conv import ConvSpec, as_matrix
from networks.functional.lokr import lokr_bypass, lokr_delta, lokr_init, lokr_scale, merge_lokr
from networks.functional.lora import lora_bypass, lora_init, lora_scale, merge_lora
from networks.modules import LoKrModule, LoRAModule, conv_spec_of

# (in, out, kernel, stride, padding): the SD3 patch embedding (kernel = stride = 2) and a padded 3×3
CONVS = [(16, 24, 2, 2, 0), (12, 20, 3, 1, 1)]
LOKR_LAYOUTS = [  # (rank, factor, full_matrix, decompose_both, expected names)
    (2, -1, False, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    (1, 8, False, True, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    (2, -1, True, False, {"lokr_w1", "lokr_w2"}),
    (8, 4, False, False, {"lokr_w1", "lokr_w2"}),
]
ORDER = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _conv(in_c: int, out_c: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_c, out_c, kernel, stride, padding).requires_grad_(False)


def _random_like(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = _gen(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in tensors.items()}


def _merged_forward(conv: nn.Conv2d, x: torch.Tensor, merged_matrix: torch.Tensor) -> torch.Tensor:
    weight = merged_matrix.reshape(conv.weight.shape)  # (out, in·kh·kw) -> (out, in, kh, kw)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("geometry", CONVS)
def test_lora_conv_bypass_equals_merged_conv(geometry) -> None:
    conv = _conv(*geometry)
    spec = conv_spec_of(conv)
    assert spec == ConvSpec((geometry[2],) * 2, (geometry[3],) * 2, (geometry[4],) * 2)
    gen = _gen(1)
    down = torch.randn(4, geometry[0] * geometry[2] ** 2, generator=gen)
    up = torch.randn(geometry[1], 4, generator=gen)
    x = torch.randn(2, geometry[0], 8, 8, generator=gen)
    scale = lora_scale(2.0, 4)
    bypass = lora_bypass(x, conv(x), down, up, scale, conv=spec)
    merged = _merged_forward(conv, x, merge_lora(as_matrix(conv.weight), down, up, scale))
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)
    # sd-scripts' conv LoRA: lora_down is a conv with the layer's geometry, lora_up a 1×1 conv
    down_conv = F.conv2d(x, down.reshape(4, geometry[0], geometry[2], geometry[2]), None, conv.stride, conv.padding)
    torch.testing.assert_close(bypass, conv(x) + F.conv2d(down_conv, up[:, :, None, None]) * scale,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", CONVS)
@pytest.mark.parametrize(("rank", "factor", "full", "both", "names"), LOKR_LAYOUTS)
def test_lokr_conv_bypass_equals_merged_conv(geometry, rank, factor, full, both, names) -> None:
    in_c, out_c, kernel = geometry[:3]
    conv = _conv(*geometry)
    fresh = lokr_init(out_c, in_c, rank, factor=factor, full_matrix=full, decompose_both=both, kernel_numel=kernel**2)
    assert set(fresh) == names
    assert torch.count_nonzero(lokr_delta(fresh, 1.0)) == 0
    tensors = _random_like(fresh, 4)
    scale = lokr_scale(1.5, rank, tensors)
    x = torch.randn(2, in_c, 8, 8, generator=_gen(2))
    bypass = lokr_bypass(x, conv(x), tensors, scale, conv=conv_spec_of(conv))
    merged = _merged_forward(conv, x, merge_lokr(as_matrix(conv.weight), tensors, scale))
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)


def _lycoris_conv_tensors(tensors: dict[str, torch.Tensor], kernel: int) -> dict[str, torch.Tensor]:
    """Our 2-D tensors in lycoris.functional's conv layout: w2 (b, d, k, k), w2_b (r, d, k, k)."""
    out = dict(tensors)
    for key in ("lokr_w2", "lokr_w2_b"):
        if key in out:
            out[key] = out[key].reshape(out[key].shape[0], -1, kernel, kernel)
    return out


@pytest.mark.parametrize(("rank", "factor", "full", "both", "names"), LOKR_LAYOUTS)
def test_lokr_conv_delta_matches_lycoris(rank, factor, full, both, names) -> None:
    in_c, out_c, kernel, stride, padding = CONVS[0]
    conv = _conv(in_c, out_c, kernel, stride, padding)
    fresh = lokr_init(out_c, in_c, rank, factor=factor, full_matrix=full, decompose_both=both, kernel_numel=kernel**2)
    tensors = {k: v.double() for k, v in _random_like(fresh, 5).items()}
    alpha = 3.0
    ours = lokr_delta(tensors, lokr_scale(alpha, rank, tensors)).reshape(conv.weight.shape)
    theirs = _lycoris_conv_tensors(tensors, kernel)
    oracle = lycoris_lokr.diff_weight(*(theirs.get(k) for k in ORDER), None, gamma=alpha, backend="torch")
    torch.testing.assert_close(ours, oracle, rtol=0, atol=1e-9)
    module = lycoris_modules.LokrModule("m", conv, lora_dim=rank, alpha=alpha, factor=factor, full_matrix=full,
                                        decompose_both=both).double()
    with torch.no_grad():
        for key, tensor in tensors.items():  # the module keeps w2_b flattened (r, d·k·k) and w2 as (b, d, k, k)
            getattr(module, key).copy_(tensor.reshape(getattr(module, key).shape))
    torch.testing.assert_close(ours, module.get_weight(module.shape), rtol=0, atol=1e-9)
    module.eval()
    x = torch.randn(2, in_c, 8, 8, generator=_gen(6), dtype=torch.float64)
    ours_out = lokr_bypass(x, conv.double()(x), tensors, lokr_scale(alpha, rank, tensors), conv=conv_spec_of(conv))
    torch.testing.assert_close(ours_out, module.bypass_forward(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("rank", "factor", "full", "both", "names"), LOKR_LAYOUTS)
def test_lokr_conv_init_matches_lycoris_module(rank, factor, full, both, names) -> None:
    in_c, out_c, kernel, stride, padding = CONVS[0]
    conv = _conv(in_c, out_c, kernel, stride, padding)
    torch.manual_seed(77)
    module = lycoris_modules.LokrModule("m", conv, lora_dim=rank, alpha=1, factor=factor, full_matrix=full,
                                        decompose_both=both)
    ours = lokr_init(out_c, in_c, rank, factor=factor, full_matrix=full, decompose_both=both,
                     kernel_numel=kernel**2, generator=_gen(77))
    theirs = {k: as_matrix(v.detach()) for k, v in module.named_parameters() if k.startswith("lokr_")}
    assert set(ours) == set(theirs) == names
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


def _conv_modules(conv: nn.Conv2d) -> list:
    in_c, out_c, kernel = conv.in_channels, conv.out_channels, conv.kernel_size[0]
    down, up = lora_init(out_c, in_c * kernel**2, 3)
    full = lokr_init(out_c, in_c, 2, full_matrix=True, kernel_numel=kernel**2)
    low = lokr_init(out_c, in_c, 2, kernel_numel=kernel**2)
    return [LoRAModule("lora_unet_x_embedder_proj", conv, [down], [up], 1.5),
            LoKrModule("lora_unet_x_embedder_proj", conv, full, 1.0, 2),
            LoKrModule("lora_unet_x_embedder_proj", conv, low, 1.0, 2)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_conv_module_forward_merge_and_file_layout(index) -> None:
    in_c, out_c, kernel, stride, padding = CONVS[0]
    conv = _conv(in_c, out_c, kernel, stride, padding)
    module = _conv_modules(conv)[index]
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=_gen(8)) * 0.2)
    x = torch.randn(2, in_c, 8, 8, generator=_gen(9))
    plain = conv(x)
    module.apply_to()
    bypass = conv(x)
    assert (bypass - plain).abs().max() > 1e-3
    saved = module.save_tensors()
    shapes = {k: tuple(v.shape) for k, v in saved.items() if k != "alpha"}
    d = in_c // 4  # factorization(16, -1) = (4, 4)
    expected = [{"lora_down.weight": (3, in_c, kernel, kernel), "lora_up.weight": (out_c, 3, 1, 1)},
                {"lokr_w1": (4, 4), "lokr_w2": (out_c // 4, d, kernel, kernel)},
                {"lokr_w1": (4, 4), "lokr_w2_a": (out_c // 4, 2), "lokr_w2_b": (2, d * kernel * kernel)}][index]
    assert shapes == expected
    other = _conv_modules(conv)[index]
    other.load_tensors(saved)
    for key, tensor in other.save_tensors().items():
        assert torch.equal(tensor, saved[key]), key
    module.restore()
    module.merge_to()
    torch.testing.assert_close(conv(x), bypass, rtol=1e-5, atol=1e-5)

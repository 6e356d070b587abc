"""MMDiT speed: our fwd+bwd time / diffusers' on the same weights, and achieved FLOP/s.

Run: python bench/bench_mmdit.py [--variant sd35-medium] [--repeats 7] [--no-record]

Part 1 times forward+backward under bf16 autocast for hidden 256 x 4 layers, a 32x32 latent and
154 context tokens at batch 1 and 4, ours and diffusers' SD3Transformer2DModel loaded from the
same SAI tensors through diffusers' converter, interleaved in one run. Part 2 counts the FLOPs of
fwd+bwd at full SD3.5-M width (2 layers, 512 px) with FlopCounterMode and divides the achieved
rate by this machine's measured bf16 matmul rate. A row goes to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_section, header  # noqa: E402

from library.models.loading import load_mmdit  # noqa: E402
from library.models.mmdit_config import MMDIT_PREFIX, MMDiTConfig, real_config, to_diffusers_config  # noqa: E402
from library.models.tiny.mmdit import tiny_mmdit_state_dict  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _bench_config(variant: str) -> MMDiTConfig:
    real = real_config(variant)
    dual = tuple(i for i in (0, 1) if real.dual_attention_layers)
    return MMDiTConfig(depth=4, hidden_size=256, num_heads=4, pos_embed_max_size=32, qk_norm=real.qk_norm, dual_attention_layers=dual)


def _models(cfg: MMDiTConfig):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = tiny_mmdit_state_dict(cfg, seed=0)
    ours = load_mmdit(sd, config=cfg).to(DEVICE).train()
    converted = convert_sd3_transformer_checkpoint_to_diffusers({MMDIT_PREFIX + k: v.clone() for k, v in sd.items()})
    theirs = SD3Transformer2DModel(**{k: v for k, v in to_diffusers_config(cfg).items() if not k.startswith("_")})
    theirs.load_state_dict(converted, strict=True)
    return ours, theirs.to(DEVICE).train()


def _inputs(cfg: MMDiTConfig, batch: int, latent: int, n_ctx: int = 154):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, latent, latent, generator=gen).to(DEVICE)
    t = (torch.rand(batch, generator=gen) * 1000).to(DEVICE)
    ctx = torch.randn(batch, n_ctx, cfg.context_dim, generator=gen).to(DEVICE)
    y = torch.randn(batch, cfg.pooled_dim, generator=gen).to(DEVICE)
    return x, t, ctx, y


def _step_ours(model, x, t, ctx, y) -> None:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(x, t, ctx, y)
    out.float().square().mean().backward()


def _step_theirs(model, x, t, ctx, y) -> None:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    out.float().square().mean().backward()


def _time(fn, model, inputs) -> float:
    model.zero_grad(set_to_none=True)
    _sync()
    start = time.perf_counter()
    fn(model, *inputs)
    _sync()
    return time.perf_counter() - start


def compare(cfg: MMDiTConfig, batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds of fwd+bwd, ours and diffusers', interleaved to share machine noise."""
    ours, theirs = _models(cfg)
    inputs = _inputs(cfg, batch, latent=32)
    for _ in range(2):
        _time(_step_ours, ours, inputs)
        _time(_step_theirs, theirs, inputs)
    a, b = [], []
    for _ in range(repeats):
        a.append(_time(_step_ours, ours, inputs))
        b.append(_time(_step_theirs, theirs, inputs))
    return statistics.median(a), statistics.median(b)


def matmul_rate(n: int = 2048, repeats: int = 12) -> float:
    """Measured bf16 matmul ceiling of this machine: FLOP/s of the fastest of ``repeats`` n³ products."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def full_width_efficiency(repeats: int) -> tuple[float, float, float]:
    """(achieved FLOP/s, matmul FLOP/s, ratio) for fwd+bwd of 2 SD3.5-M-width layers at 512 px."""
    from torch.utils.flop_counter import FlopCounterMode

    real = real_config("sd35-medium")
    cfg = MMDiTConfig(depth=2, hidden_size=real.hidden_size, num_heads=real.num_heads, pos_embed_max_size=64,
                      qk_norm=True, dual_attention_layers=(0,))
    model = load_mmdit(tiny_mmdit_state_dict(cfg), config=cfg).to(DEVICE).train()
    inputs = _inputs(cfg, batch=1, latent=64)
    with FlopCounterMode(display=False) as counter:
        _step_ours(model, *inputs)
    flops = counter.get_total_flops()
    times = [_time(_step_ours, model, inputs) for _ in range(repeats)]
    achieved = flops / statistics.median(times)
    peak = matmul_rate()
    return achieved, peak, achieved / peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sd35-medium", choices=["sd3-medium", "sd35-medium", "sd35-large"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = _bench_config(args.variant)
    rows = header("bench_mmdit")
    for batch in (1, 4):
        ours, theirs = compare(cfg, batch, args.repeats)
        rows.append(f"- {args.variant} hidden 256 x 4, 32x32 latent, 154 ctx, batch {batch}: ours {ours*1e3:.1f} ms, "
                    f"diffusers {theirs*1e3:.1f} ms, ratio **{ours / theirs:.3f}**")
        print(rows[-1], flush=True)
    achieved, peak, ratio = full_width_efficiency(max(3, args.repeats // 2))
    rows.append(f"- SD3.5-M width (1536), 2 layers, 512 px, batch 1 fwd+bwd: {achieved/1e9:.1f} GFLOP/s achieved, "
                f"bf16 matmul {peak/1e9:.1f} GFLOP/s, ratio **{ratio:.3f}**")
    print(rows[-1], flush=True)
    if not args.no_record:
        append_section(rows)


if __name__ == "__main__":
    main()

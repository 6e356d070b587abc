"""Training speed: s/step of our miniature full fine-tune vs a minimal loop over diffusers' SD3Transformer2DModel.

Run: python bench/bench_train.py [--steps 10] [--repeats 5] [--images 32] [--no-record]

A miniature sd35-medium set (``make_tiny_model(..., heads_equal_depth=True)``: the real head rule,
3 layers x 3 heads of 64, dual attention in layers 0-1) and a folder of drawn images with captions,
bucketed at 128 px, latents and text-encoder outputs (T5 77 tokens) cached once and kept in RAM.
Both sides do the same work per step on the same weights and batches: ``data.load_batch`` ->
``batch_latents`` -> ``batch_encoder_outputs`` + ``conditioning`` -> σ (``sample_sigmas``,
logit-normal, shift 3) and noise from a generator with the same seed -> model under bf16 autocast
-> sd3 flow-matching loss -> backward -> global-norm clipping at 1.0 -> AdamW (lr 1e-4) step.

- ours: ``library.training.loop.run_loop`` (the real loop) with accelerate, our MMDiT in
  ``FullModel``, the step closure of ``trainer._step_fn`` (``flow_step``), the optimizer and a
  constant lr scheduler from ``build_optimizer`` / ``build_scheduler``, no-op hooks;
- theirs: a hand-written loop over ``SD3Transformer2DModel`` loaded from the same SAI tensors via
  ``convert_sd3_transformer_checkpoint_to_diffusers``, ``torch.optim.AdamW``,
  ``torch.nn.utils.clip_grad_norm_``.

Timed windows of ``--steps`` steps alternate between the sides (order flipped every repeat), at batch
1 and 4; figures are medians of the windows' s/step and the median of per-repeat ratios ours ÷ theirs.
The first steps' losses of both sides are compared to show they do the same math. A row goes to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import draw_images  # noqa: E402
from results import append_section, header  # noqa: E402

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults  # noqa: E402
from library.data.dataset import CacheOptions, TrainingData  # noqa: E402
from library.flow.loss import LossSpec, flow_matching_loss, noisy_input  # noqa: E402
from library.flow.timesteps import TimestepSpec, sample_sigmas, sigma_to_timesteps  # noqa: E402
from library.models.loading import load_mmdit  # noqa: E402
from library.models.mmdit_config import MMDIT_PREFIX, to_diffusers_config  # noqa: E402
from library.models.prompt_encoding import layout_from_encoders  # noqa: E402
from library.models.text_encoders import load_text_encoders  # noqa: E402
from library.models.tiny.factory import make_tiny_model  # noqa: E402
from library.models.tokenizers import load_tokenizers  # noqa: E402
from library.models.vae import load_vae  # noqa: E402
from library.training.caching import (  # noqa: E402
    cache_latents,
    cache_text_outputs,
    empty_prompt_text,
    file_identity,
    text_encode_fn,
)
from library.training.full_finetune import FullModel, FullTrainSpec, param_groups  # noqa: E402
from library.training.loop import LoopHooks, LoopSettings, LoopState, run_loop  # noqa: E402
from library.training.optimizers import build_optimizer  # noqa: E402
from library.training.schedulers import SchedulerConfig, build_scheduler  # noqa: E402
from library.training.step import (  # noqa: E402
    StepSettings,
    batch_encoder_outputs,
    batch_latents,
    conditioning,
    flow_step,
)

RESOLUTION = 128
T5_LENGTH = 77
LR = 1e-4
MAX_GRAD_NORM = 1.0
SEED = 0
AUTOCAST = torch.bfloat16
SETTINGS = StepSettings(timesteps=TimestepSpec(sampling="logit_normal", shift=3.0), loss=LossSpec(objective="sd3"),
                        t5_max_length=T5_LENGTH)


# --- fixture ----------------------------------------------------------------------------------


class Fixture:
    """The miniature model files, cached data (one TrainingData per batch size), layout, empty prompt."""

    def __init__(self, tmp: Path, n_images: int, batch_sizes: tuple[int, ...]) -> None:
        self.files = make_tiny_model(tmp / "model", "sd35-medium", seed=0, heads_equal_depth=True)
        draw_images(tmp / "images" / "1_shapes", n_images)
        ckpt = self.files.checkpoint
        cache = CacheOptions(cache_latents=True, cache_text_encoder_outputs=True, t5_max_length=T5_LENGTH,
                             vae_identity=file_identity(ckpt, "fp32"), encoder_identity="tiny", keep_in_memory=True)
        self.data = {b: TrainingData(blueprint_from_defaults(self._defaults(tmp, b)), cache, seed=SEED)
                     for b in batch_sizes}
        first = self.data[batch_sizes[0]]
        encoders = load_text_encoders(ckpt)
        tokenizers = load_tokenizers(str(self.files.tokenizer_dir), t5_max_length=T5_LENGTH)
        cache_latents(first, load_vae(ckpt), batch_size=4, generator=torch.Generator().manual_seed(0), progress=False)
        cache_text_outputs(first, encoders, tokenizers, batch_size=16, progress=False)
        self.empty = empty_prompt_text(text_encode_fn(encoders, tokenizers, t5_max_length=T5_LENGTH))
        cfg = load_mmdit(ckpt, dtype=torch.float32, mmap=False).config
        self.config = cfg
        self.layout = replace(layout_from_encoders(encoders), context_dim=cfg.context_dim)

    @staticmethod
    def _defaults(tmp: Path, batch_size: int) -> DatasetDefaults:
        return DatasetDefaults(train_data_dir=tmp / "images", resolution=(RESOLUTION, RESOLUTION),
                               train_batch_size=batch_size, enable_bucket=True, min_bucket_reso=64,
                               max_bucket_reso=256, bucket_reso_steps=32)


# --- ours: the real loop --------------------------------------------------------------------------


class Ours:
    """Our full fine-tune as ``trainer.train_full`` assembles it (minus caching, saving, resume)."""

    def __init__(self, fx: Fixture, data: TrainingData, accelerator) -> None:
        self.accelerator, self.data = accelerator, data
        mmdit = load_mmdit(fx.files.checkpoint, dtype=torch.float32, device=str(accelerator.device), mmap=False)
        groups = param_groups(mmdit, None, FullTrainSpec(learning_rate=LR))
        model = FullModel(mmdit, None)
        optimizer = build_optimizer("AdamW", groups, LR, {}, max_grad_norm=MAX_GRAD_NORM)
        self.scheduler = build_scheduler(optimizer, SchedulerConfig(name="constant"), 10**9)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.generator = torch.Generator().manual_seed(SEED)
        self.state = LoopState()
        self.hooks = LoopHooks()
        device, empty, layout = accelerator.device, fx.empty, fx.layout

        def step(batch, generator):  # trainer._step_fn with cached latents and text
            x0 = batch_latents(batch, None, device)
            cond = conditioning(batch_encoder_outputs(batch, empty, None), layout, SETTINGS, device, generator)
            return flow_step(self.model, x0, cond, SETTINGS, loss_weights=batch.loss_weights, masks=batch.masks,
                             generator=generator, autocast_dtype=AUTOCAST)

        self.step_fn = step

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def losses(self) -> list[float]:
        return self.state.loss_history

    def run(self, steps: int) -> None:
        settings = LoopSettings(self.state.global_step + steps, 1, MAX_GRAD_NORM, 10, SEED)
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the loop's progress bar: drawn, not shown
            run_loop(self.accelerator, self.model, self.data, self.step_fn, self.optimizer, self.scheduler, settings,
                     self.state, self.generator, self.hooks)


# --- theirs: a minimal loop over diffusers -----------------------------------------------------------


def diffusers_model(fx: Fixture, device: torch.device):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    sai = {k: v for k, v in load_file(str(fx.files.checkpoint)).items() if k.startswith(MMDIT_PREFIX)}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sai)
    model = SD3Transformer2DModel(**{k: v for k, v in to_diffusers_config(fx.config).items() if not k.startswith("_")})
    model.load_state_dict(converted, strict=True)
    return model.to(device=device, dtype=torch.float32)


class Theirs:
    """The same batches, σ, noise, loss, clipping and AdamW around diffusers' transformer, by hand."""

    def __init__(self, fx: Fixture, data: TrainingData, device: torch.device) -> None:
        self.fx, self.data, self.device = fx, data, device
        self.model = diffusers_model(fx, device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.generator = torch.Generator().manual_seed(SEED)
        self.epoch, self.index, self.batches = 0, 0, data.epoch_batches(0)
        self.step_count = 0
        self.losses: list[float] = []

    def parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def run(self, steps: int) -> None:
        fx, gen, device = self.fx, self.generator, self.device
        for _ in range(steps):
            if self.index == len(self.batches):
                self.epoch, self.index = self.epoch + 1, 0
                self.batches = self.data.epoch_batches(self.epoch)
            batch = self.data.load_batch(self.batches[self.index], self.epoch, step=self.step_count)
            self.index += 1
            x0 = batch_latents(batch, None, device)
            cond = conditioning(batch_encoder_outputs(batch, fx.empty, None), fx.layout, SETTINGS, device)
            sigmas = sample_sigmas(x0.shape[0], SETTINGS.timesteps, generator=gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device)
            with torch.autocast(device.type, dtype=AUTOCAST):
                pred = self.model(hidden_states=noisy_input(x0, noise, sigmas), encoder_hidden_states=cond.context,
                                  pooled_projections=cond.pooled, timestep=sigma_to_timesteps(sigmas),
                                  return_dict=False)[0]
            loss = flow_matching_loss(pred.float(), x0, noise, sigmas, SETTINGS.loss, sample_weights=batch.loss_weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.item())
            self.step_count += 1


# --- timing -------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(side, steps: int) -> float:
    """Seconds per step over one window of ``steps`` steps."""
    _sync()
    start = time.perf_counter()
    side.run(steps)
    _sync()
    return (time.perf_counter() - start) / steps


def compare(fx: Fixture, batch: int, accelerator, steps: int, repeats: int) -> dict:
    data = fx.data[batch]
    ours, theirs = Ours(fx, data, accelerator), Theirs(fx, data, accelerator.device)
    check = 3  # the first steps (same weights, batches, σ, noise) give the same loss up to bf16 rounding
    ours.run(check)
    theirs.run(check)
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(ours.losses[:check], theirs.losses[:check]))
    ours.run(steps)  # warm-up windows (allocator, AdamW state, RAM caches)
    theirs.run(steps)
    a, b = [], []
    for r in range(repeats):
        pair = [(ours, a), (theirs, b)]
        for side, sink in pair if r % 2 == 0 else pair[::-1]:
            sink.append(timed(side, steps))
    med = statistics.median
    return {"ours": med(a), "theirs": med(b), "ratio": med(x / y for x, y in zip(a, b)), "loss_gap": loss_gap,
            "params": (ours.parameters(), theirs.parameters()), "batches": len(data.epoch_batches(0)),
            "buckets": sorted(set(data.buckets))}


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=7, help="timed windows per side and batch size")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rows = header("bench_train")

    def emit(line: str) -> None:
        rows.append(line)
        print(line, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_name:
        fx = Fixture(Path(tmp_name), args.images, (1, 4))
        cfg = fx.config
        emit(f"- miniature sd35-medium (heads = depth: {cfg.depth} layers x {cfg.num_heads} heads of {cfg.head_dim}, "
             f"hidden {cfg.hidden_size}, dual attention in {list(cfg.dual_attention_layers)}), {args.images} drawn "
             f"images at {RESOLUTION} px, cached latents + text (T5 {T5_LENGTH}) in RAM; bf16 autocast, AdamW lr {LR}, "
             f"clip {MAX_GRAD_NORM}, logit-normal σ shift 3, sd3 loss; {args.repeats} interleaved windows of "
             f"{args.steps} steps per side")
        for batch in (1, 4):
            r = compare(fx, batch, accelerator, args.steps, args.repeats)
            n_ours, n_theirs = r["params"]
            params = f"{n_ours:,} both" if n_ours == n_theirs else f"ours {n_ours:,}, theirs {n_theirs:,}"
            buckets = ", ".join(f"{w}x{h}" for w, h in r["buckets"])
            emit(f"- batch {batch} ({r['batches']} batches/epoch, buckets {buckets}; trained parameters "
                 f"{params}; first-3-step loss gap "
                 f"{r['loss_gap']:.1e}): ours (run_loop + accelerate + MMDiT) {r['ours']*1e3:.2f} ms/step, "
                 f"theirs (loop over diffusers SD3Transformer2DModel) {r['theirs']*1e3:.2f} ms/step, "
                 f"ratio ours ÷ theirs **{r['ratio']:.3f}**")
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if not args.no_record:
        append_section(rows)


if __name__ == "__main__":
    main()

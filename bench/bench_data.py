"""Data pipeline speed: latent caching vs a bare VAE encode loop, and cached batches vs the training step.

Run: python bench/bench_data.py [--images 64] [--repeats 5] [--batch-size 4] [--no-record]

Builds a miniature sd35-medium model set and a folder of drawn images (Pillow shapes, a few sizes,
captions) in a temp dir, bucketed at 128 px, with cached latents and text-encoder outputs (T5 32).
1. Caching: ``cache_latents`` on a fresh cache vs a bare loop that loads and prepares the same
   images (``load_for_cache``) and runs the same VAE encode on batches of the same buckets and size
   (the same work minus our validity checks, thread pool and npz writes); ratio of images/s, ours ÷
   bare (target ≥ 0.9).
2. Throughput: one epoch's batches through a ``torch.utils.data.DataLoader`` over
   ``TrainingData.load_batch`` (batch_size=None; 0 and 1 workers), seconds per batch, ÷ the miniature
   fp32 training step (conditioning assembly + forward + backward + AdamW) on the same batches
   (target < 0.05). Also the time a training loop with 1 worker actually waits for data.
All figures of one run are interleaved per repeat (ratios are medians of per-repeat ratios), so
machine noise hits both sides. A row goes to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from itertools import groupby
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import append_section, header  # noqa: E402

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults  # noqa: E402
from library.data.dataset import BatchData, CacheOptions, TrainingData  # noqa: E402
from library.flow.loss import LossSpec, flow_matching_loss, noisy_input  # noqa: E402
from library.flow.timesteps import TimestepSpec, sample_sigmas, sigma_to_timesteps  # noqa: E402
from library.models.loading import load_mmdit  # noqa: E402
from library.models.prompt_encoding import assemble_conditioning, layout_from_encoders  # noqa: E402
from library.models.text_encoders import load_text_encoders  # noqa: E402
from library.models.tiny.factory import make_tiny_model  # noqa: E402
from library.models.tokenizers import load_tokenizers  # noqa: E402
from library.models.vae import load_vae  # noqa: E402
from library.training.caching import (  # noqa: E402
    cache_latents,
    cache_text_outputs,
    encoder_outputs_from_cache,
    file_identity,
    training_latents,
    vae_encode_fn,
)

RESOLUTION = 128
T5_LENGTH = 32
SIZES = [(128, 128), (176, 128), (128, 176), (224, 160), (160, 224), (144, 144), (256, 128), (96, 160)]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "stripes"]


# --- fixture ----------------------------------------------------------------------------------


def draw_images(folder: Path, n: int, seed: int = 0, scale: float = 1.0) -> None:
    """``n`` drawn PNGs with ``.caption`` files in ``folder`` (a few sizes, so several buckets)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(v * scale) for v in SIZES[i % len(SIZES)])
        bg, fg = rng.sample(COLORS, 2)
        shape = SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.randrange(0, w // 3), rng.randrange(0, h // 3)
        x1, y1 = rng.randrange(2 * w // 3, w), rng.randrange(2 * h // 3, h)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fg)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fg)
        elif shape == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fg)
        else:
            for x in range(0, w, 12):
                draw.rectangle((x, 0, x + 5, h), fill=fg)
        for _ in range(40):  # some texture so the PNGs are not trivially compressible
            px, py = rng.randrange(w), rng.randrange(h)
            draw.point((px, py), fill=rng.choice(COLORS))
        name = f"img_{i:04d}"
        image.save(folder / f"{name}.png")
        (folder / f"{name}.caption").write_text(f"a {fg} {shape} on a {bg} background, drawing")


def build(tmp: Path, n_images: int, batch_size: int):
    files = make_tiny_model(tmp / "model", "sd35-medium", seed=0)
    draw_images(tmp / "images" / "1_shapes", n_images)
    defaults = DatasetDefaults(train_data_dir=tmp / "images", resolution=(RESOLUTION, RESOLUTION),
                               train_batch_size=batch_size, enable_bucket=True, min_bucket_reso=64,
                               max_bucket_reso=256, bucket_reso_steps=32)
    cache = CacheOptions(cache_latents=True, cache_text_encoder_outputs=True, t5_max_length=T5_LENGTH,
                         vae_identity=file_identity(files.checkpoint, "fp32"), encoder_identity="tiny")
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    return files, data


# --- 1. caching -------------------------------------------------------------------------------


def build_cache_data(tmp: Path, files, n_images: int, resolution: int) -> TrainingData:
    """A second image set at ``resolution`` for the caching figure only (the MMDiT grid caps training at 256 px)."""
    draw_images(tmp / f"images_{resolution}" / "1_shapes", n_images, scale=resolution / RESOLUTION)
    defaults = DatasetDefaults(train_data_dir=tmp / f"images_{resolution}", resolution=(resolution, resolution),
                               enable_bucket=True, min_bucket_reso=resolution // 2, max_bucket_reso=2 * resolution,
                               bucket_reso_steps=32)
    cache = CacheOptions(cache_latents=True, vae_identity=file_identity(files.checkpoint, "fp32"))
    return TrainingData(blueprint_from_defaults(defaults), cache, seed=0)


def compare_caching(data: TrainingData, vae, batch_size: int, repeats: int) -> tuple[float, float, float]:
    """(ours img/s, bare img/s, median per-repeat ratio), interleaved, alternating which goes first."""
    time_bare(data, vae, batch_size)  # warm-up: page cache, allocator, VAE kernels
    ours, bare = [], []
    for r in range(repeats):
        pair = [(time_ours, ours), (time_bare, bare)]
        for fn, sink in pair if r % 2 == 0 else pair[::-1]:
            sink.append(fn(data, vae, batch_size))
    n = len(data.records)
    ratio = statistics.median(b / o for o, b in zip(ours, bare))  # per repeat: the pair shares the noise
    return n / statistics.median(ours), n / statistics.median(bare), ratio


def _clear_latent_caches(data: TrainingData) -> None:
    for item in data.latent_cache_items():
        item.npz_path.unlink(missing_ok=True)


def time_ours(data: TrainingData, vae, batch_size: int) -> float:
    _clear_latent_caches(data)
    start = time.perf_counter()
    summary = cache_latents(data, vae, batch_size=batch_size, generator=torch.Generator().manual_seed(0), progress=False)
    elapsed = time.perf_counter() - start
    assert summary.encoded == len(data.records) and not summary.failed, summary
    return elapsed


def time_bare(data: TrainingData, vae, batch_size: int) -> float:
    """Load + prepare + encode the same images in the same bucket batches; nothing checked or written."""
    encode = vae_encode_fn(vae, torch.Generator().manual_seed(0))
    order = sorted(range(len(data.records)), key=lambda i: data.buckets[i])
    start = time.perf_counter()
    for _, group in groupby(order, key=lambda i: data.buckets[i]):
        members = list(group)
        for s in range(0, len(members), batch_size):
            images = torch.stack([data.load_for_cache(i)[0] for i in members[s:s + batch_size]])
            encode(images)
    return time.perf_counter() - start


# --- 2. throughput ------------------------------------------------------------------------------


class EpochBatches(torch.utils.data.Dataset):
    """Map-style view of one epoch: item i = ``data.load_batch(batches[i], epoch)``."""

    def __init__(self, data: TrainingData, epoch: int) -> None:
        self.data, self.epoch = data, epoch
        self.batches = data.epoch_batches(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> BatchData:
        return self.data.load_batch(self.batches[i], self.epoch)


def _as_is(batch: BatchData) -> BatchData:
    return batch


def make_loader(dataset: EpochBatches, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       persistent_workers=workers > 0, collate_fn=_as_is)


def time_loader(loader) -> float:
    """Seconds per batch over one pass of the loader."""
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return (time.perf_counter() - start) / n


class Trainer:
    """The miniature fp32 training step: conditioning, σ, noisy input, forward, loss, backward, AdamW."""

    def __init__(self, files, encoders) -> None:
        self.model = load_mmdit(files.checkpoint, dtype=torch.float32, mmap=False).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.layout = replace(layout_from_encoders(encoders), context_dim=self.model.config.context_dim)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator().manual_seed(0)
        self.spec, self.loss_spec = TimestepSpec(), LossSpec()

    def step(self, batch: BatchData) -> float:
        x0 = training_latents(batch.latents)
        cond = assemble_conditioning(encoder_outputs_from_cache(batch.text), self.layout, t5_length=T5_LENGTH)
        sigmas = sample_sigmas(x0.shape[0], self.spec, generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        pred = self.model(noisy_input(x0, noise, sigmas), sigma_to_timesteps(sigmas), cond.context, cond.pooled)
        loss = flow_matching_loss(pred, x0, noise, sigmas, self.loss_spec, sample_weights=batch.loss_weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def time_steps(trainer: Trainer, batches: list[BatchData]) -> float:
    start = time.perf_counter()
    for b in batches:
        trainer.step(b)
    return (time.perf_counter() - start) / len(batches)


def time_training_loop(trainer: Trainer, loader) -> tuple[float, float]:
    """(seconds per step waiting in next(loader), seconds per step computing) over one pass."""
    wait = compute = 0.0
    it = iter(loader)
    n = 0
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        trainer.step(batch)
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
        n += 1
    return wait / n, compute / n


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size = VAE caching batch size")
    parser.add_argument("--cache-resolution", type=int, default=512, help="second image size for the caching figure")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = header("bench_data")

    def emit(line: str) -> None:
        rows.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp_name:
        tmp = Path(tmp_name)
        files, data = build(tmp, args.images, args.batch_size)
        vae = load_vae(files.checkpoint)
        encoders = load_text_encoders(files.checkpoint)
        tokenizers = load_tokenizers(str(files.tokenizer_dir), t5_max_length=T5_LENGTH)
        cache_text_outputs(data, encoders, tokenizers, batch_size=16, progress=False)

        # 1. caching, ours vs bare load+encode: at the training resolution and at a larger one, where
        #    the VAE's work per image grows and the fixed per-file cost (create + rename) matters less
        for label, cache_data in (("", data), (" (caching only)", build_cache_data(tmp, files, args.images,
                                                                              args.cache_resolution))):
            ours_ips, bare_ips, ratio = compare_caching(cache_data, vae, args.batch_size, args.repeats)
            res = cache_data.blueprint.datasets[0].resolution[0]
            emit(f"- latent caching{label}, {len(cache_data.records)} images at {res} px "
                 f"({len(set(cache_data.buckets))} buckets), VAE batch {args.batch_size}: ours {ours_ips:.1f} img/s, "
                 f"bare load+encode {bare_ips:.1f} img/s, ratio **{ratio:.3f}** (target ≥ 0.9)")

        # 2. throughput: loader passes vs training steps, interleaved; caches read from disk every
        #    step, or decoded once and kept in RAM (keep_in_memory, sd-scripts' --cache_latents)
        dataset = EpochBatches(data, epoch=0)
        memory = TrainingData(data.blueprint, dataclasses.replace(data.cache, keep_in_memory=True), seed=0)
        dataset_mem = EpochBatches(memory, epoch=0)
        preloaded = [dataset[i] for i in range(len(dataset))]
        trainer = Trainer(files, encoders)
        time_steps(trainer, preloaded)  # warm-up (AdamW state, kernels)
        loader0, loader0m, loader1 = make_loader(dataset, 0), make_loader(dataset_mem, 0), make_loader(dataset_mem, 1)
        for loader in (loader0, loader0m, loader1):
            time_loader(loader)  # fills the RAM caches, starts the persistent worker
        steps, load0, load0m, load1, waits, computes = [], [], [], [], [], []
        for _ in range(args.repeats):
            steps.append(time_steps(trainer, preloaded))
            load0.append(time_loader(loader0))
            load0m.append(time_loader(loader0m))
            load1.append(time_loader(loader1))
            wait, compute = time_training_loop(trainer, loader0m)
            waits.append(wait)
            computes.append(compute)
        med = statistics.median
        step = med(steps)
        emit(f"- miniature training step (sd35-medium tiny, fp32, batch {args.batch_size}, {len(dataset)} batches/epoch, "
             f"fwd+bwd+AdamW): {step*1e3:.2f} ms/step")
        for label, loads in (("from disk, 0 workers", load0), ("in RAM, 0 workers", load0m), ("in RAM, 1 worker", load1)):
            d = med(loads)
            emit(f"- cached batches through the DataLoader, {label}: {d*1e3:.2f} ms/batch ({1/d:.0f} batches/s), "
                 f"÷ step **{med(x / y for x, y in zip(loads, steps)):.3f}** (target < 0.05)")
        emit(f"- training loop, in RAM, 0 workers: waits {med(waits)*1e3:.2f} ms/step for data beside "
             f"{med(computes)*1e3:.2f} ms/step computing, wait ÷ step **{med(w / c for w, c in zip(waits, computes)):.3f}**")
        del loader1
    if not args.no_record:
        append_section(rows)


if __name__ == "__main__":
    main()

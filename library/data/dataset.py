"""Training data: records + buckets + caches -> seeded, resumable batches (no model in sight).

:class:`TrainingData` resolves a :class:`DatasetBlueprint` once (records, image sizes, buckets,
samples with repeats) and then answers three questions: which batches make up epoch *e*
(:meth:`epoch_batches`), what must be cached (:meth:`latent_cache_items`, :meth:`te_cache_items`),
and what one batch holds (:meth:`load_batch`). Every random choice of a sample (flip, crop, caption
augmentation, cached caption variant) is seeded by (seed, epoch, sample), so any step can be
rebuilt exactly after a resume, in any DataLoader worker.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from library.data import images as img
from library.data.batching import Batch, expand_repeats, plan_epoch
from library.data.buckets import assign_buckets
from library.data.captions import caption_variants, is_dropped, needs_variants, process_caption
from library.data.latent_cache import LatentCacheItem, latent_cache_path, latent_cache_record, read_latent_cache
from library.data.sources import ImageRecord, blueprint_records
from library.data.spec import AugmentOptions, CaptionOptions, DatasetBlueprint, DatasetSpec, SubsetSpec
from library.data.te_cache import TeCacheItem, read_te_cache, te_cache_path, te_cache_record
from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_VARIANTS = 8


@dataclass(frozen=True)
class CacheOptions:
    """What is cached and what a cache must match (the provenance the caches record)."""

    cache_latents: bool = False
    cache_text_encoder_outputs: bool = False
    cache_dir: Path | None = None  # None: beside the images (sd-scripts' *_to_disk); else this folder
    caption_variants: int | None = None  # None: DEFAULT_CAPTION_VARIANTS when captions vary, else 1
    t5_max_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    te_parts: tuple[str, ...] = ("lg", "t5")  # ("t5",) for --use_t5xxl_cache_only
    vae_identity: str = ""
    encoder_identity: str = ""
    cache_check: str = "mtime"  # or "hash"
    skip_cache_check: bool = False  # trust files without our record (sd-scripts' caches)
    keep_in_memory: bool = False  # hold decoded caches in RAM after the first read (sd-scripts' --cache_latents)


@dataclass(frozen=True)
class Sample:
    """One appearance of an image in an epoch."""

    dataset: int
    record: int  # index into TrainingData.records
    bucket: tuple[int, int]


@dataclass
class BatchData:
    """One training batch. Exactly one of ``latents`` / ``images`` is set."""

    bucket: tuple[int, int]  # (width, height) in pixels
    captions: list[str]  # processed captions; "" = dropped (use the empty-prompt embedding)
    loss_weights: torch.Tensor  # (B,) prior_loss_weight for reg images, else 1
    latents: torch.Tensor | None = None  # (B, 16, h, w) raw VAE space (scale/shift not applied)
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    text: dict[str, torch.Tensor] | None = None  # cached encoder outputs, stacked (B, ...)
    masks: torch.Tensor | None = None  # (B, 1, H, W) alpha masks in [0, 1]
    paths: list[str] = field(default_factory=list)


def sample_rng(seed: int, epoch: int, sample: int) -> random.Random:
    """The random source of one sample in one epoch (string seeding is stable across processes)."""
    return random.Random(f"{seed}:{epoch}:{sample}")


class TrainingData:
    def __init__(self, blueprint: DatasetBlueprint, cache: CacheOptions = CacheOptions(), seed: int = 0) -> None:
        self._init_empty(blueprint, cache, seed)
        for group in blueprint_records(blueprint, seed):
            self._add_dataset(blueprint.datasets[group.dataset_index], group.dataset_index, group.train)
            self.validation.extend(group.validation)

    def _init_empty(self, blueprint: DatasetBlueprint, cache: CacheOptions, seed: int) -> None:
        self.blueprint, self.cache, self.seed = blueprint, cache, seed
        self.records: list[ImageRecord] = []
        self.buckets: list[tuple[int, int]] = []  # per record
        self.samples: list[Sample] = []
        self.validation: list[ImageRecord] = []
        self._variants: dict[int, list[str]] = {}
        self.skipped: list[tuple[str, str]] = []  # (image, reason) of unreadable images
        self._memory: dict[tuple, dict[str, torch.Tensor]] = {}  # decoded caches (keep_in_memory)

    def validation_data(self) -> TrainingData | None:
        """The held-out images (``validation_split``) as data of their own, or None: each image once, no
        augmentation and no caption randomness (shuffle, dropout, warm-up), so every pass sees the same
        inputs. Its caches are made like the training ones (same files beside the images)."""
        if not self.validation:
            return None
        plain = DatasetBlueprint(tuple(replace(spec, subsets=tuple(_plain_subset(s) for s in spec.subsets))
                                       for spec in self.blueprint.datasets))
        held = TrainingData.__new__(TrainingData)
        held._init_empty(plain, self.cache, self.seed)
        for index, spec in enumerate(plain.datasets):
            held._add_dataset(spec, index, [r for r in self.validation if r.dataset_index == index])
        return held

    def _readable(self, records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[tuple[int, int]]]:
        """Records whose size can be read, with their sizes; the others are reported and skipped."""
        kept, sizes = [], []
        for record in records:
            try:
                sizes.append(record.image_size or img.image_size(record.image_path))
                kept.append(record)
            except UserError as exc:
                self.skipped.append((str(record.image_path), str(exc)))
                logger.warning("skipping %s", exc)
        return kept, sizes

    def _add_dataset(self, spec: DatasetSpec, index: int, records: Sequence[ImageRecord]) -> None:
        records, sizes = self._readable(records)
        if not records:
            return
        per_image, _ = assign_buckets(sizes, spec.buckets, spec.resolution)
        first = len(self.records)
        self.records.extend(records)
        self.buckets.extend(per_image)
        for local in expand_repeats([r.num_repeats for r in records]):
            self.samples.append(Sample(index, first + local, per_image[local]))

    def subset(self, record: ImageRecord) -> SubsetSpec:
        return self.blueprint.datasets[record.dataset_index].subsets[record.subset_index]

    def dataset_spec(self, record: ImageRecord) -> DatasetSpec:
        return self.blueprint.datasets[record.dataset_index]

    # --- batches ------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """All batches of ``epoch``: each dataset cut with its own batch size, then interleaved."""
        batches: list[Batch] = []
        for index, spec in enumerate(self.blueprint.datasets):
            ids = [i for i, s in enumerate(self.samples) if s.dataset == index]
            plan = plan_epoch([self.samples[i].bucket for i in ids], spec.batch_size, self.seed + index, epoch)
            batches.extend(Batch((index, b.bucket), tuple(ids[j] for j in b.samples)) for b in plan)
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 7919]).permutation(len(batches))
        return [batches[i] for i in order]

    def bucket_counts(self) -> dict[tuple[int, tuple[int, int]], int]:
        """Samples per (dataset, bucket), for the debug view and logs."""
        counts: dict[tuple[int, tuple[int, int]], int] = {}
        for s in self.samples:
            counts[(s.dataset, s.bucket)] = counts.get((s.dataset, s.bucket), 0) + 1
        return dict(sorted(counts.items()))

    # --- caches -------------------------------------------------------------------------------

    def _cache_file(self, default: Path) -> Path:
        if self.cache.cache_dir is None:
            return default
        tag = hashlib.sha1(str(default.parent.resolve()).encode()).hexdigest()[:10]  # same-named images apart
        return self.cache.cache_dir / f"{tag}_{default.name}"

    def latent_record(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        subset = self.subset(record)
        return latent_cache_record(
            record.image_path, self.buckets[index], vae_identity=self.cache.vae_identity,
            flip=subset.augment.flip_aug, alpha_mask=subset.alpha_mask, random_crop=subset.augment.random_crop,
            resize_interpolation=subset.resize_interpolation or self.dataset_spec(record).resize_interpolation,
            check=self.cache.cache_check,
        )

    def latent_cache_items(self) -> list[LatentCacheItem]:
        """One item per image (at its bucket), whose ``source`` is the record index."""
        items = []
        for i, record in enumerate(self.records):
            path = self._cache_file(latent_cache_path(record.image_path, self.buckets[i]))
            items.append(LatentCacheItem(path, self.buckets[i], self.latent_record(i), i))
        return items

    def variants_of(self, index: int) -> list[str]:
        """The processed captions cached for record ``index`` (always at least one; memoised)."""
        if index not in self._variants:
            self._variants[index] = self._make_variants(index)
        return self._variants[index]

    def _make_variants(self, index: int) -> list[str]:
        record = self.records[index]
        options = self.subset(record).captions
        k = self.cache.caption_variants
        if k is None:
            k = DEFAULT_CAPTION_VARIANTS if needs_variants(options) else 1
        return caption_variants(record.caption, options, k, seed=self.seed + index, is_reg=record.is_reg)

    def te_cache_items(self) -> list[TeCacheItem]:
        items = []
        for i, record in enumerate(self.records):
            rec = te_cache_record(self.variants_of(i), self.cache.t5_max_length, self.cache.apply_lg_attn_mask,
                                  self.cache.apply_t5_attn_mask, self.cache.encoder_identity, parts=self.cache.te_parts)
            items.append(TeCacheItem(self._cache_file(te_cache_path(record.image_path)), rec))
        return items

    # --- loading ------------------------------------------------------------------------------

    def _remember(self, key: tuple, read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not self.cache.keep_in_memory:
            return read()
        if key not in self._memory:
            self._memory[key] = read()
        return self._memory[key]

    def prepare_image(self, index: int, rng: random.Random | None = None, *, flip: bool = False):
        """(image tensor (3, H, W) in [-1, 1], original size, crop, alpha (H, W) or None) at the record's bucket."""
        record = self.records[index]
        subset = self.subset(record)
        keep_alpha = subset.alpha_mask
        image = img.load_image(record.image_path, keep_alpha=keep_alpha)
        interp = subset.resize_interpolation or self.dataset_spec(record).resize_interpolation
        w, h = self.buckets[index]
        prepared = img.resize_and_crop(image, w, h, interpolation=interp,
                                       random_crop=subset.augment.random_crop and rng is not None, rng=rng)
        picture = prepared.image
        if subset.augment.color_aug and rng is not None:
            picture = img.color_aug(picture.convert("RGB"), rng)
        tensor = img.to_tensor(picture.convert("RGB"))
        alpha = img.alpha_mask(prepared.image) if keep_alpha else None
        if flip:
            tensor = img.hflip_tensor(tensor)
            alpha = None if alpha is None else img.hflip_tensor(alpha)
        return tensor, prepared.original_size, prepared.crop_ltrb, alpha

    def load_for_cache(self, index: int):
        """``load_fn`` for :func:`library.data.latent_cache.encode_missing_latents` (no augmentation)."""
        tensor, original, _, alpha = self.prepare_image(index)
        return tensor, original, img.sd_scripts_crop_ltrb(self.buckets[index], original), alpha

    def _caption_and_text(
        self, index: int, sample: int, epoch: int, step: int, max_steps: int | None
    ) -> tuple[str, dict[str, torch.Tensor] | None]:
        """The sample's caption and, with cached encoder outputs, one cached variant chosen at random.

        Whole-caption dropout gives ``""``; the trainer then uses the empty-prompt embedding.
        """
        record = self.records[index]
        options = self.subset(record).captions
        rng = random.Random(f"{self.seed}:{epoch}:{sample}:caption")
        if not self.cache.cache_text_encoder_outputs:
            caption = process_caption(record.caption, options, rng, epoch=epoch + 1, step=step, max_steps=max_steps,
                                      is_reg=record.is_reg)  # caption epochs are 1-based, as in sd-scripts
            return caption, None
        variants = self.variants_of(index)
        k = rng.randrange(len(variants))
        path = self._cache_file(te_cache_path(record.image_path))
        text = self._remember(("te", path, k), lambda: read_te_cache(path, k))
        return ("" if is_dropped(options, rng, epoch + 1) else variants[k]), text

    def load_batch(self, batch: Batch, epoch: int, step: int = 0, max_steps: int | None = None) -> BatchData:
        """Everything one step needs for ``batch`` (seeded per sample; safe in DataLoader workers)."""
        latents, pictures, masks, texts, captions, weights, paths = [], [], [], [], [], [], []
        for sample_id in batch.samples:
            sample = self.samples[sample_id]
            index, record = sample.record, self.records[sample.record]
            rng = sample_rng(self.seed, epoch, sample_id)
            subset = self.subset(record)
            flip = subset.augment.flip_aug and rng.random() < 0.5
            if self.cache.cache_latents:
                path = self._cache_file(latent_cache_path(record.image_path, self.buckets[index]))
                cached = self._remember(("latents", path, flip),
                                        lambda: read_latent_cache(path, self.buckets[index], flipped=flip))
                latents.append(cached["latents"])
                alpha = cached.get("alpha_mask") if subset.alpha_mask else None
            else:
                tensor, _, _, alpha = self.prepare_image(index, rng, flip=flip)
                pictures.append(tensor)
            masks.append(alpha)
            caption, text = self._caption_and_text(index, sample_id, epoch, step, max_steps)
            captions.append(caption)
            if text is not None:
                texts.append(text)
            weights.append(self.dataset_spec(record).prior_loss_weight if record.is_reg else 1.0)
            paths.append(str(record.image_path))
        return BatchData(
            bucket=batch.bucket[1],
            captions=captions,
            loss_weights=torch.tensor(weights, dtype=torch.float32),
            latents=torch.stack(latents) if latents else None,
            images=torch.stack(pictures) if pictures else None,
            text={k: torch.stack([t[k] for t in texts]) for k in texts[0]} if texts else None,
            masks=_stack_masks(masks),
            paths=paths,
        )


def _plain_subset(subset: SubsetSpec) -> SubsetSpec:
    """``subset`` without augmentation or caption randomness (how a validation image is read)."""
    c = subset.captions
    captions = CaptionOptions(caption_extension=c.caption_extension, caption_prefix=c.caption_prefix,
                              caption_suffix=c.caption_suffix, caption_separator=c.caption_separator,
                              keep_tokens_separator=c.keep_tokens_separator, secondary_separator=c.secondary_separator)
    return replace(subset, captions=captions, augment=AugmentOptions())


def _stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(m is None for m in masks):
        return None
    ref = next(m for m in masks if m is not None)
    return torch.stack([torch.ones_like(ref) if m is None else m.float() for m in masks]).unsqueeze(1)

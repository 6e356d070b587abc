"""``--debug_dataset``: a bucket report and a contact sheet of the first batches, instead of training.

:func:`bucket_report` tabulates, per dataset, each bucket's samples and batches, the image / repeat /
regularization counts and the number of batches per epoch. :func:`contact_sheet` draws the first
batches of an epoch, one row per batch, each picture with its processed caption, bucket size, file
name, a ``reg`` marker, a ``flip`` marker and (with ``alpha_mask``) a small inset of the mask.

The pictures are the ones the batch gets: without cached latents they come from
:meth:`TrainingData.load_batch` (crop, flip and colour augmentation included). With cached latents
the batch holds no pixels, so each picture is rebuilt with :meth:`TrainingData.prepare_image` and the
batch's own seeded flip decision (the first draw of :func:`sample_rng`); caching rules out random
crop and colour augmentation, so this is the picture the cached latents were encoded from. When a
cache the batch needs is missing, the view falls back to the uncached pipeline (live captions
instead of a cached caption variant) and says so in the log.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from library.data.batching import Batch
from library.data.dataset import BatchData, CacheOptions, TrainingData, sample_rng
from library.errors import UserError

logger = logging.getLogger(__name__)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Box = tuple[int, int, int, int]  # left, top, right, bottom
PAD = 6
INFO_LINES = 2  # file name; bucket + markers
CAPTION_LINES = 5
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
FAINT = (110, 110, 110)
BORDER = (200, 200, 200)
MARK = (200, 30, 30)


def _font() -> Font:
    return ImageFont.load_default()


# --- report -----------------------------------------------------------------------------------


def _counts_line(label: str, records: list, samples: int) -> str:
    repeats = sorted({r.num_repeats for r in records})
    shown = ",".join(str(n) for n in repeats) if repeats else "-"
    return f"  {label} {len(records)}  repeats {shown}  samples {samples}"


def bucket_report(data: TrainingData) -> str:
    """Per dataset: buckets with samples and batches; images, repeats, reg images; batches per epoch."""
    counts = data.bucket_counts()
    lines = [f"debug dataset: {len(data.blueprint.datasets)} dataset(s), seed {data.seed}"]
    total_samples = total_batches = 0
    for index, spec in enumerate(data.blueprint.datasets):
        w, h = spec.resolution
        lines.append(f"dataset {index}: resolution {w}x{h}  batch size {spec.batch_size}")
        samples = batches = 0
        for (dataset, (bw, bh)), n in counts.items():
            if dataset != index:
                continue
            cut = math.ceil(n / spec.batch_size)
            lines.append(f"  bucket {bw}x{bh}  samples {n}  batches {cut}")
            samples, batches = samples + n, batches + cut
        lines.append(f"  total  samples {samples}  batches {batches}")
        records = [r for r in data.records if r.dataset_index == index]
        train = [r for r in records if not r.is_reg]
        reg = [r for r in records if r.is_reg]
        lines.append(_counts_line("images", train, sum(r.num_repeats for r in train)))
        lines.append(_counts_line("reg images", reg, sum(r.num_repeats for r in reg)))
        total_samples, total_batches = total_samples + samples, total_batches + batches
    images = sum(not r.is_reg for r in data.records)
    reg_images = len(data.records) - images
    lines.append(f"all datasets: images {images}  reg images {reg_images}  samples {total_samples}  "
                 f"batches {total_batches}")
    lines.append(f"batches per epoch: {len(data.epoch_batches(0))}")  # the same count every epoch
    return "\n".join(lines)


# --- the pictures of a batch ------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """What one contact-sheet cell shows."""

    picture: Image.Image
    mask: Image.Image | None
    caption: str
    name: str
    bucket: tuple[int, int]
    is_reg: bool
    flip: bool


def _to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB picture."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """(H, W) or (1, H, W) in [0, 1] -> greyscale picture."""
    array = (mask.detach().float().reshape(mask.shape[-2:]).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.numpy(), "L")


def _flip_of(data: TrainingData, sample_id: int, epoch: int) -> bool:
    """The batch's flip decision: the first draw of the sample's seeded random source."""
    record = data.records[data.samples[sample_id].record]
    return data.subset(record).augment.flip_aug and sample_rng(data.seed, epoch, sample_id).random() < 0.5


def _load(data: TrainingData, batch: Batch, epoch: int) -> BatchData:
    try:
        return data.load_batch(batch, epoch)
    except UserError as error:
        logger.warning("debug view: %s; showing the uncached pipeline instead", error)
        uncached = copy.copy(data)
        uncached.cache = CacheOptions()
        return uncached.load_batch(batch, epoch)


def batch_cells(data: TrainingData, batch: Batch, epoch: int) -> list[Cell]:
    """The cells of one batch, pictures as the batch got them (see the module docstring)."""
    loaded = _load(data, batch, epoch)
    cells = []
    for i, sample_id in enumerate(batch.samples):
        index = data.samples[sample_id].record
        record = data.records[index]
        flip = _flip_of(data, sample_id, epoch)
        if loaded.images is not None:
            tensor = loaded.images[i]
            alpha = loaded.masks[i] if loaded.masks is not None else None
        else:
            tensor, _, _, alpha = data.prepare_image(index, flip=flip)
        if not data.subset(record).alpha_mask or alpha is None or bool((alpha >= 1).all()):
            alpha = None  # no inset for images without transparency
        cells.append(Cell(
            picture=_to_pil(tensor), mask=None if alpha is None else _mask_to_pil(alpha),
            caption=loaded.captions[i], name=record.image_path.name, bucket=tuple(loaded.bucket),
            is_reg=record.is_reg, flip=flip,
        ))
    return cells


# --- layout and drawing -----------------------------------------------------------------------


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of a contact sheet: a header line above each row of ``thumb``-sized cells."""

    thumb: int
    line: int

    @classmethod
    def for_thumb(cls, thumb: int, font: Font | None = None) -> SheetLayout:
        if thumb < 16:
            raise ValueError(f"thumb must be at least 16 pixels, got {thumb}")
        box = (font or _font()).getbbox("Ag|")
        return cls(thumb, int(box[3]) + 3)

    @property
    def cell_w(self) -> int:
        return self.thumb + 2 * PAD

    @property
    def cell_h(self) -> int:
        return PAD + self.thumb + PAD + (INFO_LINES + CAPTION_LINES) * self.line + PAD

    @property
    def header_h(self) -> int:
        return self.line + PAD

    @property
    def row_h(self) -> int:
        return self.header_h + self.cell_h

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        return columns * self.cell_w, rows * self.row_h

    def cell_box(self, row: int, column: int) -> Box:
        """(left, top, right, bottom) of one cell, below its row's header."""
        left, top = column * self.cell_w, row * self.row_h + self.header_h
        return left, top, left + self.cell_w, top + self.cell_h


def _fit(text: str, font: Font, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def wrap_text(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are cut; the last line gets "..." if cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = max(k for k in range(1, len(current) + 1) if k == 1 or font.getlength(current[:k]) <= width)
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " ...", font, width)
    return lines


def _paste_fitted(sheet: Image.Image, picture: Image.Image, box: Box) -> Box:
    """Paste ``picture`` scaled (aspect kept) and centred into ``box``; returns where it went."""
    left, top, right, bottom = box
    scale = min((right - left) / picture.width, (bottom - top) / picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    shown = picture.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    x, y = left + (right - left - size[0]) // 2, top + (bottom - top - size[1]) // 2
    sheet.paste(shown, (x, y))
    return x, y, x + size[0], y + size[1]


def _draw_cell(sheet: Image.Image, cell: Cell, box: Box, layout: SheetLayout, font: Font) -> None:
    draw = ImageDraw.Draw(sheet)
    left, top = box[0] + PAD, box[1] + PAD
    thumb_box = (left, top, left + layout.thumb, top + layout.thumb)
    placed = _paste_fitted(sheet, cell.picture, thumb_box)
    draw.rectangle((placed[0] - 1, placed[1] - 1, placed[2], placed[3]), outline=BORDER)
    if cell.mask is not None:
        inset = max(8, layout.thumb // 3)
        corner = (thumb_box[2] - inset, thumb_box[3] - inset, thumb_box[2], thumb_box[3])
        drawn = _paste_fitted(sheet, cell.mask.convert("RGB"), corner)
        draw.rectangle((drawn[0] - 1, drawn[1] - 1, drawn[2], drawn[3]), outline=MARK)
    y = top + layout.thumb + PAD
    draw.text((left, y), _fit(cell.name, font, layout.thumb), fill=TEXT, font=font)
    y += layout.line
    size = f"{cell.bucket[0]}x{cell.bucket[1]}"
    draw.text((left, y), size, fill=FAINT, font=font)
    x = left + font.getlength(size + "  ")
    for marker, on in (("reg", cell.is_reg), ("flip", cell.flip), ("mask", cell.mask is not None)):
        if on:
            draw.text((x, y), marker, fill=MARK, font=font)
            x += font.getlength(marker + "  ")
    caption = cell.caption if cell.caption else "(caption dropped)"
    for line in wrap_text(caption, font, layout.thumb, CAPTION_LINES):
        y += layout.line
        draw.text((left, y), line, fill=TEXT if cell.caption else FAINT, font=font)


def contact_sheet(data: TrainingData, *, epoch: int = 0, max_batches: int = 4, thumb: int = 192) -> Image.Image:
    """One row per batch (the first ``max_batches`` of ``epoch``), one column per batch slot.

    Columns = the largest batch size of any dataset; short batches leave white cells.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    font = _font()
    layout = SheetLayout.for_thumb(thumb, font)
    batches = data.epoch_batches(epoch)[:max_batches]
    columns = max(spec.batch_size for spec in data.blueprint.datasets)
    if not batches:
        sheet = Image.new("RGB", layout.size(1, columns), BACKGROUND)
        ImageDraw.Draw(sheet).text((PAD, PAD), "no batches", fill=TEXT, font=font)
        return sheet
    sheet = Image.new("RGB", layout.size(len(batches), columns), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for row, batch in enumerate(batches):
        dataset, (w, h) = batch.bucket
        header = f"epoch {epoch}  batch {row + 1}  dataset {dataset}  bucket {w}x{h}  {len(batch.samples)} sample(s)"
        draw.text((PAD, row * layout.row_h + PAD // 2), _fit(header, font, sheet.width - 2 * PAD), fill=TEXT, font=font)
        for column, cell in enumerate(batch_cells(data, batch, epoch)):
            _draw_cell(sheet, cell, layout.cell_box(row, column), layout, font)
    return sheet


def write_debug_view(data: TrainingData, out_dir: Path, *, epoch: int = 0, max_batches: int = 4) -> tuple[str, Path]:
    """Log the bucket report and write ``out_dir/debug_dataset_epoch{epoch}.png`` atomically."""
    report = bucket_report(data)
    logger.info("%s", report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"debug_dataset_epoch{epoch}.png"
    sheet = contact_sheet(data, epoch=epoch, max_batches=max_batches)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(handle, "wb") as stream:
            sheet.save(stream, format="PNG")
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    logger.info("debug view: contact sheet written to %s", target)
    return report, target

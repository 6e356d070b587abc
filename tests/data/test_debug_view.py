"""--debug_dataset view: bucket report numbers, contact sheet geometry and content, cached latents."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults
from library.data.dataset import CacheOptions, TrainingData
from library.data.debug_view import (
    SheetLayout, batch_cells, bucket_report, contact_sheet, wrap_text, write_debug_view,
)
from library.data.latent_cache import encode_missing_latents

SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (48, 96), (64, 64)]
THUMB = 64


def _draw(path: Path, size: tuple[int, int], seed: int, alpha: bool) -> None:
    w, h = size
    if alpha:
        image = Image.new("RGBA", size, (255, 255, 255, 0))
        box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
        ImageDraw.Draw(image).rectangle(box, fill=(30, 160, (seed * 50) % 255, 255))
    else:
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=((seed * 40) % 255, 80, 200))
    image.save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    train = tmp_path / "train" / "2_shapes"
    train.mkdir(parents=True)
    for i, size in enumerate(SIZES):
        _draw(train / f"img{i}.png", size, i, alpha=i % 3 == 1)
        (train / f"img{i}.caption").write_text(f"a drawn shape number {i}, circle or square, white background, tag{i}")
    reg = tmp_path / "reg" / "1_shapes"
    reg.mkdir(parents=True)
    for i in range(3):
        _draw(reg / f"reg{i}.png", (64, 64), 10 + i, alpha=False)
    return tmp_path


def _data(folder: Path, cache: CacheOptions = CacheOptions(), **changes) -> TrainingData:
    defaults = DatasetDefaults(train_data_dir=folder / "train", reg_data_dir=folder / "reg", resolution=(64, 64),
                               enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                               train_batch_size=2)
    return TrainingData(blueprint_from_defaults(replace(defaults, **changes)), cache, seed=5)


def fake_encode(images: torch.Tensor) -> torch.Tensor:
    """The stand-in VAE of test_dataset.py: 8x average pool, 3 -> 16 channels."""
    pooled = F.avg_pool2d(images, 8)
    return torch.cat([pooled * (k + 1) for k in range(6)], dim=1)[:, :16]


def _check_sheet(data: TrainingData, sheet: Image.Image, max_batches: int) -> None:
    batches = data.epoch_batches(0)[:max_batches]
    rows, columns = len(batches), max(spec.batch_size for spec in data.blueprint.datasets)
    layout = SheetLayout.for_thumb(THUMB)
    assert rows == min(max_batches, len(data.epoch_batches(0)))
    assert sheet.size == layout.size(rows, columns) == (columns * layout.cell_w, rows * layout.row_h)
    pixels = np.asarray(sheet.convert("RGB"))
    for row, batch in enumerate(batches):
        for column in range(columns):
            left, top, right, bottom = layout.cell_box(row, column)
            cell = pixels[top:bottom, left:right]
            used = column < len(batch.samples)
            assert (cell < 250).any() == used, (row, column)


def test_report_counts_match_the_data(folder):
    data = _data(folder)
    report = bucket_report(data)
    counts = data.bucket_counts()
    for (dataset, (w, h)), n in counts.items():
        match = re.search(rf"bucket {w}x{h}  samples (\d+)  batches (\d+)", report)
        assert match and int(match[1]) == n and int(match[2]) == math.ceil(n / 2)
    assert f"total  samples {len(data.samples)}  batches {len(data.epoch_batches(0))}" in report
    assert f"images {len(SIZES)}  repeats 2  samples {2 * len(SIZES)}" in report
    reg = [r for r in data.records if r.is_reg]
    assert f"reg images 3  repeats" in report and f"samples {sum(r.num_repeats for r in reg)}" in report
    assert f"batches per epoch: {len(data.epoch_batches(0))}" in report.splitlines()[-1]


def test_contact_sheet_grid_and_cells(folder):
    data = _data(folder, flip_aug=True)
    for max_batches in (3, 100):
        _check_sheet(data, contact_sheet(data, max_batches=max_batches, thumb=THUMB), max_batches)
    cells = [c for b in data.epoch_batches(0) for c in batch_cells(data, b, 0)]
    assert any(c.flip for c in cells) and not all(c.flip for c in cells)
    assert any(c.is_reg for c in cells) and all(c.caption for c in cells)


def test_alpha_masks_get_an_inset(folder):
    data = _data(folder, alpha_mask=True, reg_data_dir=None)
    batches = data.epoch_batches(0)
    sheet = contact_sheet(data, max_batches=len(batches), thumb=THUMB)
    _check_sheet(data, sheet, len(batches))
    layout, pixels, insets = SheetLayout.for_thumb(THUMB), np.asarray(sheet), 0
    for row, batch in enumerate(batches):
        for column, cell in enumerate(batch_cells(data, batch, 0)):
            transparent = int(cell.name[3:-4]) % 3 == 1  # img1, img4: RGBA
            assert (cell.mask is not None) == transparent
            if transparent:
                assert cell.mask.size == cell.picture.size
                _, top, right, _ = layout.cell_box(row, column)
                corner = pixels[top:top + THUMB + 8, right - THUMB // 3 - 8:right]
                assert ((corner[..., 0] > 150) & (corner[..., 1] < 80)).any()  # the red frame of the inset
                insets += 1
    assert insets == 4  # two RGBA images, two repeats


def test_write_debug_view(folder, tmp_path, caplog):
    data = _data(folder)
    with caplog.at_level(logging.INFO, logger="library.data.debug_view"):
        report, path = write_debug_view(data, tmp_path / "out" / "debug", epoch=1, max_batches=2)
    assert path == tmp_path / "out" / "debug" / "debug_dataset_epoch1.png" and path.is_file()
    assert report == bucket_report(data) and "batches per epoch" in caplog.text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with Image.open(path) as sheet:
        layout = SheetLayout.for_thumb(192)
        assert sheet.size == layout.size(2, 2)


def test_cached_latents_show_the_same_pictures(folder):
    cache = CacheOptions(cache_latents=True, vae_identity="x")
    data = _data(folder, cache, flip_aug=True)
    summary = encode_missing_latents(data.latent_cache_items(), fake_encode, data.load_for_cache, batch_size=4,
                                     progress=False)
    assert summary.encoded == len(data.records)
    uncached = _data(folder, flip_aug=True)
    for batch in data.epoch_batches(0)[:4]:
        assert data.load_batch(batch, 0).images is None
        for a, b in zip(batch_cells(data, batch, 0), batch_cells(uncached, batch, 0)):
            assert a.flip == b.flip and a.caption == b.caption
            assert np.array_equal(np.asarray(a.picture), np.asarray(b.picture))
    _check_sheet(data, contact_sheet(data, max_batches=4, thumb=THUMB), 4)


def test_missing_cache_falls_back_with_a_warning(folder, caplog):
    data = _data(folder, CacheOptions(cache_latents=True, vae_identity="x"))
    with caplog.at_level(logging.WARNING, logger="library.data.debug_view"):
        sheet = contact_sheet(data, max_batches=1, thumb=THUMB)
    _check_sheet(data, sheet, 1)
    assert "uncached pipeline" in caplog.text


def test_wrap_text_stays_inside_the_width():
    font = ImageFont.load_default()
    text = "supercalifragilisticexpialidocious " + "word " * 60
    lines = wrap_text(text, font, 60, 4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 60 for line in lines)
    assert wrap_text("", font, 60, 4) == [] and wrap_text("short", font, 60, 4) == ["short"]
    with pytest.raises(ValueError):
        SheetLayout.for_thumb(4)

"""Image loading (orientation, modes, corrupt files) and resize/crop to buckets."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.images import (
    INTERPOLATIONS,
    alpha_mask,
    check_augment_with_cache,
    color_aug,
    covering_size,
    hflip_tensor,
    image_size,
    load_image,
    load_mask_image,
    resize_and_crop,
    resize_and_crop_at,
    resolve_interpolation,
    sd_scripts_crop_ltrb,
    to_tensor,
)
from library.data.spec import AugmentOptions
from library.errors import UserError


def column_image(width: int, height: int) -> Image.Image:
    """R = column index (mod 256), G = row index: positions are readable from pixels."""
    cols = np.tile(np.arange(width, dtype=np.uint8), (height, 1))
    rows = np.tile(np.arange(height, dtype=np.uint8)[:, None], (1, width))
    return Image.fromarray(np.stack([cols, rows, np.full_like(cols, 7)], axis=-1), "RGB")


def png16(path, width: int, height: int, rgb: tuple[int, int, int]) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + struct.pack(">3H", *rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.mark.parametrize(
    "size, bucket, resized, crop",
    [
        ((200, 100), (64, 64), (128, 64), (32, 0, 96, 64)),  # wide: height matches, width cropped
        ((100, 300), (64, 128), (64, 192), (0, 32, 64, 160)),  # tall
        ((256, 256), (128, 128), (128, 128), (0, 0, 128, 128)),  # square: no crop
        ((32, 16), (128, 64), (128, 64), (0, 0, 128, 64)),  # enlarged exactly
        ((1000, 997), (512, 512), (514, 512), (1, 0, 513, 512)),
    ],
)
def test_resize_and_crop_size_and_crop(size, bucket, resized, crop):
    out = resize_and_crop(column_image(*size), *bucket)
    assert out.image.size == bucket and out.original_size == size
    assert covering_size(size, bucket) == resized
    assert out.crop_ltrb == crop
    assert crop[2] - crop[0] == bucket[0] and crop[3] - crop[1] == bucket[1]


def test_centre_crop_content():
    image = column_image(256, 128)  # columns 0..255
    out = resize_and_crop(image, 64, 128, interpolation="nearest")  # no scaling: crop 96..160
    assert out.crop_ltrb == (96, 0, 160, 128)
    red = np.asarray(out.image)[0, :, 0]
    assert red[0] == 96 and red[-1] == 159


def test_random_crop_seeded_and_within_bounds():
    image = column_image(300, 100)
    offsets = set()
    for seed in range(40):
        a = resize_and_crop(image, 64, 64, random_crop=True, rng=random.Random(seed))
        b = resize_and_crop(image, 64, 64, random_crop=True, rng=random.Random(seed))
        assert a.crop_ltrb == b.crop_ltrb
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        left, top, right, bottom = a.crop_ltrb
        assert 0 <= left and right <= 192 and top == 0 and bottom == 64  # resized 192x64
        assert a.image.size == (64, 64)
        offsets.add(left)
    assert len(offsets) > 10


def test_interpolation_names_and_default_direction():
    for name in ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"):
        assert name in INTERPOLATIONS
        out = resize_and_crop(column_image(90, 50), 32, 32, interpolation=name)
        assert out.image.size == (32, 32)
    assert resolve_interpolation(None, shrinking=True) == Image.Resampling.BOX
    assert resolve_interpolation(None, shrinking=False) == Image.Resampling.LANCZOS
    with pytest.raises(UserError, match="resize_interpolation"):
        resolve_interpolation("hamming", shrinking=True)


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # left half red
    stored[:, 32:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    assert image_size(path) == (32, 64)
    image = load_image(path)
    assert image.size == (32, 64) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert pixels[4, 16, 0] > 200 and pixels[4, 16, 2] < 60  # stored left (red) is now on top
    assert pixels[60, 16, 2] > 200 and pixels[60, 16, 0] < 60


def _assert_one_line_error(path):
    with pytest.raises(UserError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_corrupt_files_raise_one_line_user_error(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\nsecond line\n")
    _assert_one_line_error(text)
    with pytest.raises(UserError):
        image_size(text)

    noise = tmp_path / "noise.jpg"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    _assert_one_line_error(noise)

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert image_size(truncated) == (64, 64)  # the header is intact
    _assert_one_line_error(truncated)

    header_only = tmp_path / "header_only.png"
    header_only.write_bytes(good.read_bytes()[:40])
    _assert_one_line_error(header_only)

    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_rgba_alpha_mask_cropped_consistently(tmp_path):
    rgba = np.zeros((100, 200, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :100, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    image = load_image(path, keep_alpha=True)
    assert image.mode == "RGBA"
    out = resize_and_crop(image, 64, 64)  # resized 128x64, crop 32..96: alpha edge at x = 32
    assert out.image.mode == "RGBA" and out.crop_ltrb == (32, 0, 96, 64)
    mask = alpha_mask(out.image)
    assert mask.shape == (64, 64) and mask.dtype == torch.float32
    assert torch.all(mask[:, :31] == 1.0) and torch.all(mask[:, 33:] == 0.0)
    pixels = to_tensor(out.image)
    expected = torch.tensor([200, 100, 50], dtype=torch.float32) / 127.5 - 1.0
    assert torch.allclose(pixels, expected[:, None, None].expand(3, 64, 64), atol=2 / 255)  # not premultiplied

    assert load_image(path).mode == "RGB"
    assert torch.all(alpha_mask(load_image(path)) == 1.0)


def test_palette_and_high_bit_depth_load(tmp_path):
    palette = Image.new("P", (20, 10))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 10, 10))
    palette.info["transparency"] = 0
    ppath = tmp_path / "palette.png"
    palette.save(ppath, transparency=0)
    rgb = np.asarray(load_image(ppath))
    assert rgb.shape == (10, 20, 3) and tuple(rgb[0, 0]) == (255, 0, 0)
    rgba = load_image(ppath, keep_alpha=True)
    assert rgba.mode == "RGBA"
    assert alpha_mask(rgba)[0, 0] == 1.0 and alpha_mask(rgba)[0, 15] == 0.0

    gray16 = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    gpath = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(gpath)
    assert Image.open(gpath).mode.startswith("I")
    loaded = np.asarray(load_image(gpath))
    assert loaded.shape == (4, 4, 3)
    assert list(loaded[0, :, 0]) == [0, 128, 255, 4]  # scaled by 1/257, not clipped

    cpath = tmp_path / "rgb16.png"
    png16(cpath, 8, 4, (65535, 32896, 0))
    loaded = np.asarray(load_image(cpath))
    assert loaded.shape == (4, 8, 3) and tuple(loaded[0, 0]) == (255, 128, 0)


def test_la_cmyk_and_bilevel_load(tmp_path):
    Image.new("LA", (8, 6), (120, 40)).save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[0, 0].tolist() == [120, 120, 120]
    assert alpha_mask(load_image(tmp_path / "la.png", keep_alpha=True))[0, 0] == pytest.approx(40 / 255)
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert cmyk.shape == (6, 8, 3) and cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 60
    Image.new("1", (8, 6), 1).save(tmp_path / "bw.png")
    assert np.asarray(load_image(tmp_path / "bw.png")).min() == 255


def test_to_tensor_and_flip():
    image = Image.fromarray(np.array([[[0, 255, 0], [255, 0, 255]]], np.uint8))  # 1x2
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [-1.0, 1.0, -1.0] and tensor[:, 0, 1].tolist() == [1.0, -1.0, 1.0]
    assert torch.equal(hflip_tensor(tensor)[:, 0, 0], tensor[:, 0, 1])
    assert torch.equal(hflip_tensor(torch.arange(6.0).reshape(2, 3)), torch.tensor([[2.0, 1, 0], [5, 4, 3]]))


def test_mask_image_follows_the_image_geometry(tmp_path):
    mask = np.zeros((100, 300, 3), np.uint8)
    mask[:, :150, 0] = 255  # left half weighted (red channel)
    mask[:, :150, 1] = 17  # other channels ignored
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    image = column_image(300, 100)
    out = resize_and_crop(image, 64, 64, random_crop=True, rng=random.Random(3))
    weights = load_mask_image(path, (64, 64), original_size=out.original_size, crop_ltrb=out.crop_ltrb)
    assert weights.shape == (64, 64) and weights.dtype == torch.float32
    edge = 96 - out.crop_ltrb[0]  # the mask edge (x = 150) is at 96 in the 192x64 resized image
    columns = weights[0]
    assert torch.all(columns[: max(edge - 1, 0)] == 1.0) and torch.all(columns[edge + 1 :] == 0.0)
    replay = resize_and_crop_at(image, out.crop_ltrb)
    assert np.array_equal(np.asarray(replay), np.asarray(out.image))
    centred = load_mask_image(path, (64, 64))  # no geometry: cover + centre crop, edge at 96 - 64
    assert torch.all(centred[:, :31] == 1.0) and torch.all(centred[:, 33:] == 0.0)
    small = tmp_path / "small_mask.png"
    Image.fromarray(mask).resize((150, 50), Image.Resampling.NEAREST).save(small)
    scaled = load_mask_image(small, (64, 64), original_size=(300, 100), crop_ltrb=out.crop_ltrb)
    assert (scaled - weights).abs().mean() < 0.02  # a smaller mask is first scaled to the image size


def test_sd_scripts_crop_ltrb_is_the_letterbox_rectangle():
    assert sd_scripts_crop_ltrb((1024, 1024), (2000, 1000)) == (0, 256, 1024, 768)
    assert sd_scripts_crop_ltrb((1024, 512), (1000, 1000)) == (256, 0, 768, 512)


def test_color_aug_seeded_and_cache_rule():
    image = column_image(32, 16)
    outs = [np.asarray(color_aug(image, random.Random(seed))) for seed in range(30)]
    again = [np.asarray(color_aug(image, random.Random(seed))) for seed in range(30)]
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))
    changed = sum(not np.array_equal(o, np.asarray(image)) for o in outs)
    assert 0 < changed < 30  # applied with probability 0.33
    check_augment_with_cache(AugmentOptions(flip_aug=True))
    for options in (AugmentOptions(color_aug=True), AugmentOptions(random_crop=True)):
        with pytest.raises(UserError, match="cached latents"):
            check_augment_with_cache(options)

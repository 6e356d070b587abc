"""Image loading and preparation for training: decode, orient, resize to cover a bucket, crop.

Loading (:func:`load_image`): EXIF orientation is applied (sd-scripts does not); the result is RGB,
or RGBA with ``keep_alpha``. Palette, LA, CMYK and 1-bit images go through Pillow's conversions
(palette via RGBA so palette transparency becomes alpha); 16-bit grayscale (``I;16*``) is scaled to
8 bits (Pillow itself would clip it); 32-bit ``I`` is scaled when its maximum exceeds 255 and ``F``
when its maximum is at most 1. Any decoding problem becomes a one-line
:class:`~library.errors.UserError` naming the file, so callers can skip the image.

Resizing (:func:`resize_and_crop`, sd-scripts' ``trim_and_resize_if_required``): the image is scaled
by ``max(bucket_w / w, bucket_h / h)`` so that it covers the bucket (each side rounded to the
nearest pixel, never below the bucket), then cropped to the bucket, centred (``(excess) // 2``) or
at a uniformly random offset ``randint(0, excess)`` (width first, then height) with
``random_crop``. Interpolation names are sd-scripts' ``resize_interpolation`` values; ``None`` means
area (Pillow ``BOX``) when shrinking on both sides and lanczos otherwise. RGBA is resized per
channel group (RGB and alpha apart, not premultiplied), so the alpha mask stays aligned with the RGB.

``crop_ltrb`` convention (ours): ``(l, t, r, b)`` is the crop window in the *resized* image's pixel
coordinates, ``r − l = bucket_w`` and ``b − t = bucket_h``; the resized size is
:func:`covering_size` ``(original_size, bucket)``. For a horizontally flipped sample the window is
``(resized_w − r, t, resized_w − l, b)``. sd-scripts stores a different quantity under the same cache
key (:func:`sd_scripts_crop_ltrb`); SD3 does not condition on it, so either may be written.

Augmentation: :func:`color_aug` is sd-scripts' hue/gamma jitter with a seeded ``random.Random``.
It (and ``random_crop``) cannot be combined with cached latents, see
:func:`check_augment_with_cache`.
"""

from __future__ import annotations

import logging
import random
import struct
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.spec import AugmentOptions
from library.errors import UserError

logger = logging.getLogger(__name__)

Size = tuple[int, int]
Box = tuple[int, int, int, int]

INTERPOLATIONS: Mapping[str, Image.Resampling] = MappingProxyType(
    {
        "lanczos": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "linear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "cubic": Image.Resampling.BICUBIC,
        "area": Image.Resampling.BOX,  # Pillow's BOX averages like OpenCV's INTER_AREA when shrinking
        "box": Image.Resampling.BOX,
    }
)
"""sd-scripts' ``resize_interpolation`` names → Pillow filters."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90°
_EXIF_ORIENTATION = 0x0112
_HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units (0..180), sd-scripts' value
_COLOR_AUG_PROBABILITY = 0.33


class PreparedImage(NamedTuple):
    image: Image.Image  # exactly the bucket size
    original_size: Size  # (w, h) before resizing (after EXIF rotation)
    crop_ltrb: Box  # crop window in the resized image's coordinates


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unreadable(path: Path, error: BaseException) -> UserError:
    return UserError(f"cannot read image {path}: {_one_line(error)} (fix or remove the file)")


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes (I;16*, I, F) to 8-bit ``L`` by scaling, not clipping."""
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255.0):
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _convert(image: Image.Image, keep_alpha: bool) -> Image.Image:
    target = "RGBA" if keep_alpha else "RGB"
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency becomes alpha
    return image if image.mode == target else image.convert(target)


def load_image(path: str | Path, *, keep_alpha: bool = False) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as RGB, or RGBA with ``keep_alpha``."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return _convert(upright if upright is not None else opened, keep_alpha)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error) from error


def _orientation(image: Image.Image) -> int:
    """EXIF orientation without decoding pixels (PNG: only an eXIf chunk before the image data)."""
    if image.format == "PNG":
        data = image.info.get("exif")
        if not data:
            return 1
        exif = Image.Exif()
        exif.load(data)
    else:
        exif = image.getexif()
    value = exif.get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def image_size(path: str | Path) -> Size:
    """``(w, h)`` as displayed (EXIF rotation applied), read from the header only.

    A file whose pixel data is damaged passes here; :func:`load_image` reports it.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            swapped = _orientation(opened) in _SWAPPED_ORIENTATIONS
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error) from error
    return (height, width) if swapped else (width, height)


def resolve_interpolation(name: str | None, shrinking: bool) -> Image.Resampling:
    """Pillow filter for a ``resize_interpolation`` name; ``None``: area when shrinking, else lanczos."""
    if name is None:
        name = "area" if shrinking else "lanczos"
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise UserError(f"unknown resize_interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}") from None


def covering_size(image_size_wh: Size, bucket: Size) -> Size:
    """Size of the image scaled by ``max(bw / w, bh / h)``: the smallest that covers the bucket."""
    (width, height), (bucket_w, bucket_h) = image_size_wh, bucket
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5))


def _resize(image: Image.Image, size: Size, resample: Image.Resampling) -> Image.Image:
    """Resize; RGBA as RGB + alpha separately so hidden colours are kept (no premultiplication)."""
    if image.size == size:
        return image.copy()
    if image.mode != "RGBA":
        return image.resize(size, resample=resample)
    rgb = image.convert("RGB").resize(size, resample=resample)
    rgb.putalpha(image.getchannel("A").resize(size, resample=resample))
    return rgb


def _crop_window(resized: Size, bucket: Size, random_crop: bool, rng: random.Random | None) -> Box:
    excess_w, excess_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        rng = rng if rng is not None else random.Random()
        left = rng.randint(0, excess_w) if excess_w > 0 else 0
        top = rng.randint(0, excess_h) if excess_h > 0 else 0
    else:
        left, top = excess_w // 2, excess_h // 2
    return left, top, left + bucket[0], top + bucket[1]


def resize_and_crop(
    image: Image.Image,
    bucket_w: int,
    bucket_h: int,
    *,
    interpolation: str | None = None,
    random_crop: bool = False,
    rng: random.Random | None = None,
) -> PreparedImage:
    """Scale ``image`` to cover ``(bucket_w, bucket_h)`` and crop it to exactly that size.

    Works for any mode (RGB, RGBA, L masks). ``rng`` seeds the random crop (a fresh unseeded one
    when ``None``); ``crop_ltrb`` follows the convention of the module doc.
    """
    if bucket_w <= 0 or bucket_h <= 0:
        raise ValueError(f"bucket size {bucket_w}x{bucket_h} is empty")
    original = image.size
    bucket = (bucket_w, bucket_h)
    resized_size = covering_size(original, bucket)
    shrinking = resized_size[0] <= original[0] and resized_size[1] <= original[1]
    resized = _resize(image, resized_size, resolve_interpolation(interpolation, shrinking))
    box = _crop_window(resized_size, bucket, random_crop, rng)
    return PreparedImage(resized.crop(box), original, box)


def resize_and_crop_at(image: Image.Image, crop_ltrb: Box, *, interpolation: str | None = None) -> Image.Image:
    """Replay a :func:`resize_and_crop` geometry on another image of the same original size (masks)."""
    left, top, right, bottom = crop_ltrb
    bucket = (right - left, bottom - top)
    resized_size = covering_size(image.size, bucket)
    if left < 0 or top < 0 or right > resized_size[0] or bottom > resized_size[1]:
        raise ValueError(f"crop {crop_ltrb} lies outside the resized size {resized_size}")
    shrinking = resized_size[0] <= image.size[0] and resized_size[1] <= image.size[1]
    resized = _resize(image, resized_size, resolve_interpolation(interpolation, shrinking))
    return resized.crop(crop_ltrb)


def sd_scripts_crop_ltrb(bucket: Size, original_size: Size) -> tuple[float, float, float, float]:
    """The value sd-scripts stores as ``crop_ltrb`` (``BucketManager.get_crop_ltrb``).

    It is the image *fitted inside* the bucket (letterbox), centred, in bucket coordinates: with
    ``a = w/h``, the fitted size is ``(bh·a, bh)`` when the bucket is wider than the image, else
    ``(bw, bw/a)``; left/top are ``(bucket − fitted) // 2``. It ignores the random crop.
    """
    (bucket_w, bucket_h), (width, height) = bucket, original_size
    image_ar = width / height
    if bucket_w / bucket_h > image_ar:
        fitted_w, fitted_h = bucket_h * image_ar, float(bucket_h)
    else:
        fitted_w, fitted_h = float(bucket_w), bucket_w / image_ar
    left, top = (bucket_w - fitted_w) // 2, (bucket_h - fitted_h) // 2
    return left, top, left + fitted_w, top + fitted_h


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → float32 ``(3, H, W)`` in [-1, 1] (x/255 normalised with mean 0.5, std 0.5)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    # numpy only: torch ops here would start an OpenMP pool in every caching thread and starve the VAE
    array = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def hflip_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Mirror the last (width) axis: images ``(C, H, W)``, masks ``(H, W)``, latents alike."""
    return torch.flip(tensor, dims=(-1,))


def alpha_mask(image: Image.Image) -> torch.Tensor:
    """float32 ``(H, W)`` in [0, 1] from the alpha channel; all ones when there is none."""
    width, height = image.size
    if "A" not in image.getbands():
        return torch.ones((height, width), dtype=torch.float32)
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    return torch.from_numpy(alpha)


def load_mask_image(
    path: str | Path,
    size: Size,
    *,
    original_size: Size | None = None,
    crop_ltrb: Box | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """A ``--masked_loss`` mask as float32 ``(H, W)`` in [0, 1] for a bucket of ``size = (w, h)``.

    As in sd-scripts the weight is the red channel / 255 (a grayscale mask works as is). With
    ``crop_ltrb`` the mask goes through the image's own geometry (first scaled to ``original_size``
    when given and different); otherwise it covers ``size`` and is centre-cropped.
    """
    mask = load_image(path).getchannel("R")
    if crop_ltrb is None:
        mask = resize_and_crop(mask, size[0], size[1], interpolation=interpolation).image
    else:
        if original_size is not None and mask.size != tuple(original_size):
            logger.debug("mask %s resized from %s to the image size %s", path, mask.size, original_size)
            mask = mask.resize(tuple(original_size), resample=Image.Resampling.BILINEAR)
        mask = resize_and_crop_at(mask, crop_ltrb, interpolation=interpolation)
    if mask.size != tuple(size):
        raise ValueError(f"crop {crop_ltrb} does not give the bucket size {size}")
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' colour jitter, seeded: with probability 0.33, half the time a hue shift of
    U(−8, 8) OpenCV hue units (±16°), else a gamma ``U(0.95, 1.05)``.

    The gamma is applied to values normalised to [0, 1]; sd-scripts raises the raw 0..255 values to
    the power (so 255 → 193 at 0.95), which we consider a bug. Alpha, if any, is kept.
    """
    if rng.random() > _COLOR_AUG_PROBABILITY:
        return image
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    rgb = image.convert("RGB")
    if rng.random() > 0.5:
        shift = rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT) * 256.0 / 180.0  # to Pillow's 0..255 hue
        hsv = np.asarray(rgb.convert("HSV")).copy()
        hsv[..., 0] = np.rint(hsv[..., 0].astype(np.float64) + shift).astype(np.int64) % 256
        rgb = Image.fromarray(hsv, "HSV").convert("RGB")
    else:
        gamma = rng.uniform(0.95, 1.05)
        values = (np.asarray(rgb, dtype=np.float64) / 255.0) ** gamma
        rgb = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "RGB")
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def check_augment_with_cache(options: AugmentOptions, where: str = "dataset") -> None:
    """sd-scripts' rule: cached latents are computed once, so ``color_aug`` and ``random_crop``
    (augmentations of the pixels) cannot be used with them; ``flip_aug`` can (flipped latents).
    """
    for name in ("color_aug", "random_crop"):
        if getattr(options, name):
            raise UserError(f"{name} cannot be used with cached latents ({where}); disable {name} or latent caching")

"""Aspect-ratio buckets for SD3 training, following kohya-ss/sd-scripts' rules.

Generation (:func:`make_bucket_resolutions`, sd-scripts' rule): with ``max_area = W·H`` of the base
resolution ``(W, H)`` and ``d = bucket_reso_steps``,

1. the square bucket ``(s, s)``, ``s = floor(floor(sqrt(max_area)) / d)·d`` — always added (it is
   the base resolution itself when that is square and a multiple of ``d``);
2. for ``w = min_size, min_size + d, …, ≤ max_size``:
   ``h = min(max_size, floor(floor(max_area / w) / d)·d)``; when ``h ≥ min_size`` both ``(w, h)``
   and ``(h, w)`` are added;
3. the set is sorted ascending by ``(w, h)``.

Every bucket is therefore a multiple of ``d`` on both sides with area ≤ ``max_area``. SD3 needs
``d`` to be a multiple of 16 (8 px per VAE latent × the 2×2 patch of the MMDiT), checked here.
Before generation, ``min_bucket_reso`` is rounded *down* and ``max_bucket_reso`` rounded *up* to a
multiple of ``d`` (with a warning), and the base resolution must lie within them (sd-scripts).

Selection (:func:`select_bucket`, sd-scripts' ``BucketManager.select_bucket``): a bucket equal to
the image size is taken as is; otherwise the bucket of least ``|w_b/h_b − w/h|``; ties go to the
first bucket in list order (the sorted list: smallest width first), as ``numpy.argmin`` does.

``bucket_no_upscale`` (:func:`no_upscale_bucket`): every image gets its own bucket from its own size:
an image larger than ``max_area`` is first scaled (aspect kept) to area ``max_area`` with one side
rounded to the step as sd-scripts does; the size is then rounded *down* to multiples of ``d``.
The bucket is never larger than the image on either side; ``min/max_bucket_reso`` do not apply.
One deviation: sd-scripts' rounding can overshoot ``max_area`` by a fraction of a step (about 0.1 %
of large images at step 16); such a bucket loses one step on the side that keeps the aspect
closest, so the area never exceeds ``max_area``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

from library.data.spec import BucketOptions
from library.errors import UserError

logger = logging.getLogger(__name__)

SD3_BUCKET_MULTIPLE = 16
"""Bucket sides must be multiples of this: 8 px per latent × the MMDiT's 2×2 patch."""

Size = tuple[int, int]


class BucketError(UserError, ValueError):
    """An invalid bucket setting or an image that cannot be bucketed (a one-line user error)."""


def check_divisible(divisible: int, name: str = "bucket_reso_steps") -> None:
    """Raise :class:`BucketError` unless ``divisible`` is a positive multiple of 16 (SD3)."""
    if divisible <= 0 or divisible % SD3_BUCKET_MULTIPLE != 0:
        raise BucketError(
            f"{name} = {divisible} must be a positive multiple of {SD3_BUCKET_MULTIPLE} for SD3 "
            f"(8 px per latent x 2x2 patch); use e.g. 64"
        )


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """sd-scripts' bucket list for base resolution ``max_reso = (w, h)`` (rule in the module doc)."""
    check_divisible(divisible)
    max_area = max_reso[0] * max_reso[1]
    side = (math.isqrt(max_area) // divisible) * divisible
    resos: set[Size] = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, ((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution: Size, min_size: int, max_size: int, divisible: int) -> tuple[int, int]:
    """Round min down / max up to multiples of ``divisible`` and check the base resolution fits."""
    check_divisible(divisible)
    if min_size % divisible:
        adjusted = min_size - min_size % divisible
        logger.warning("min_bucket_reso %d adjusted to %d (a multiple of bucket_reso_steps)", min_size, adjusted)
        min_size = adjusted
    if max_size % divisible:
        adjusted = max_size + divisible - max_size % divisible
        logger.warning("max_bucket_reso %d adjusted to %d (a multiple of bucket_reso_steps)", max_size, adjusted)
        max_size = adjusted
    if min(resolution) < min_size:
        raise BucketError(f"min_bucket_reso {min_size} is larger than the resolution {resolution}; lower it")
    if max(resolution) > max_size:
        raise BucketError(f"max_bucket_reso {max_size} is smaller than the resolution {resolution}; raise it")
    return min_size, max_size


def aspect_error(bucket: Size, image_w: int, image_h: int) -> float:
    """``|w_b/h_b − w/h|``, the quantity sd-scripts minimises."""
    return abs(bucket[0] / bucket[1] - image_w / image_h)


def select_bucket(image_w: int, image_h: int, buckets: Sequence[Size]) -> Size:
    """The bucket for an image: an exact size match, else least aspect error (ties: first in list)."""
    if not buckets:
        raise ValueError("select_bucket needs at least one bucket")
    if image_w <= 0 or image_h <= 0:
        raise BucketError(f"image size {image_w}x{image_h} is empty")
    exact = (image_w, image_h)
    if exact in buckets:
        return exact
    best = buckets[0]
    best_error = aspect_error(best, image_w, image_h)
    for bucket in buckets[1:]:
        error = aspect_error(bucket, image_w, image_h)
        if error < best_error:
            best, best_error = bucket, error
    return best


def _round_to_steps(x: float, divisible: int) -> int:
    """sd-scripts' ``round_to_steps``: round to the nearest integer, then down to a multiple."""
    value = int(x + 0.5)
    return value - value % divisible


def _fit_area_size(image_w: int, image_h: int, max_area: int, divisible: int) -> tuple[int, int]:
    """sd-scripts' resized size for an image larger than ``max_area`` under ``bucket_no_upscale``.

    The image is scaled to area ``max_area`` (aspect kept); either its width or its height is
    rounded to the step, whichever keeps the aspect ratio closer (the height on a tie).
    """
    aspect = image_w / image_h
    resized_w = math.sqrt(max_area * aspect)
    resized_h = max_area / resized_w
    width_rounded = _round_to_steps(resized_w, divisible)
    height_in_wr = _round_to_steps(width_rounded / aspect, divisible)
    height_rounded = _round_to_steps(resized_h, divisible)
    width_in_hr = _round_to_steps(height_rounded * aspect, divisible)
    error_w = abs(width_rounded / height_in_wr - aspect) if height_in_wr else math.inf
    error_h = abs(width_in_hr / height_rounded - aspect) if height_rounded else math.inf
    if error_w < error_h:
        return width_rounded, int(width_rounded / aspect + 0.5)
    return int(height_rounded * aspect + 0.5), height_rounded


def _shrink_to_area(bucket: Size, aspect: float, max_area: int, divisible: int) -> Size:
    """Step a side down until the area fits (sd-scripts' rounding can overshoot ``max_area`` by a
    fraction of a step); the side whose removal keeps the aspect closer to the image's goes first."""
    width, height = bucket
    while width * height > max_area and width > divisible and height > divisible:
        narrower = abs((width - divisible) / height - aspect)
        shorter = abs(width / (height - divisible) - aspect)
        if narrower <= shorter:
            width -= divisible
        else:
            height -= divisible
    return width, height


def no_upscale_bucket(image_w: int, image_h: int, max_area: int, divisible: int) -> Size:
    """The ``bucket_no_upscale`` bucket of one image (never larger than the image on either side)."""
    check_divisible(divisible)
    if image_w <= 0 or image_h <= 0:
        raise BucketError(f"image size {image_w}x{image_h} is empty")
    if image_w * image_h > max_area:
        resized_w, resized_h = _fit_area_size(image_w, image_h, max_area, divisible)
    else:
        resized_w, resized_h = image_w, image_h
    bucket = (min(resized_w, image_w), min(resized_h, image_h))
    bucket = (bucket[0] - bucket[0] % divisible, bucket[1] - bucket[1] % divisible)
    bucket = _shrink_to_area(bucket, image_w / image_h, max_area, divisible)
    if bucket[0] == 0 or bucket[1] == 0:
        raise BucketError(
            f"image {image_w}x{image_h} is too small or too thin for bucket_reso_steps {divisible} "
            f"with bucket_no_upscale (a side would be 0)"
        )
    return bucket


def base_bucket(resolution: Size) -> Size:
    """The single bucket used without bucketing: the base resolution, a multiple of 16 on each side."""
    width, height = resolution
    if width <= 0 or height <= 0 or width % SD3_BUCKET_MULTIPLE or height % SD3_BUCKET_MULTIPLE:
        raise BucketError(
            f"resolution {width}x{height} must be a multiple of {SD3_BUCKET_MULTIPLE} on each side for SD3 "
            f"(or enable_bucket)"
        )
    return width, height


def assign_buckets(sizes: Sequence[Size], options: BucketOptions, resolution: Size) -> tuple[list[Size], list[Size]]:
    """Bucket of every image (by index) and the sorted list of the distinct buckets in use.

    ``sizes`` are the images' ``(w, h)`` after EXIF rotation; ``resolution`` is the base ``(w, h)``.
    Without ``enable_bucket`` every image goes to the base resolution; with ``bucket_no_upscale``
    each image gets :func:`no_upscale_bucket`; otherwise :func:`select_bucket` over
    :func:`make_bucket_resolutions` (after :func:`adjust_min_max_bucket_reso`).
    """
    if not options.enable_bucket:
        bucket = base_bucket(resolution)
        chosen = [bucket for _ in sizes]
    elif options.bucket_no_upscale:
        check_divisible(options.bucket_reso_steps)
        max_area = resolution[0] * resolution[1]
        chosen = [no_upscale_bucket(w, h, max_area, options.bucket_reso_steps) for w, h in sizes]
    else:
        min_size, max_size = adjust_min_max_bucket_reso(
            resolution, options.min_bucket_reso, options.max_bucket_reso, options.bucket_reso_steps
        )
        predefined = make_bucket_resolutions(resolution, min_size, max_size, options.bucket_reso_steps)
        chosen = [select_bucket(w, h, predefined) for w, h in sizes]
    counts = Counter(chosen)
    for bucket in sorted(counts):
        logger.debug("bucket %dx%d: %d images", bucket[0], bucket[1], counts[bucket])
    logger.info("%d images in %d buckets", len(chosen), len(counts))
    return chosen, sorted(counts)

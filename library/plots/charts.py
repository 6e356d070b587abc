"""Minimal line / step charts with Pillow: panels stacked vertically, ticks, a legend, atomic PNG writes.

Data are plain float sequences. ``Series.kind`` is "line" (a polyline), "steps" (a histogram outline:
``xs`` are the n + 1 bin edges, ``ys`` the n bin heights) or "points" (a polyline with markers).
Values outside the panel's range are clipped to its border, so one spike cannot flatten the rest.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]  # left, top, right, bottom
PALETTE: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                              (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
MARGIN = (70, 34, 20, 46)  # left, top, right, bottom around each plot area


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    kind: str = "line"  # line | steps | points
    color: int = 0  # index into PALETTE
    width: int = 2


@dataclass(frozen=True)
class Panel:
    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def data_range(series: Sequence[Series], axis: str) -> tuple[float, float]:
    """(min, max) of the finite values of ``axis`` ("x" or "y") over ``series``, widened if flat."""
    values = [float(v) for s in series for v in (s.xs if axis == "x" else s.ys) if math.isfinite(float(v))]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _mapper(box: Box, x_range: tuple[float, float], y_range: tuple[float, float]):
    left, top, right, bottom = box
    (x0, x1), (y0, y1) = x_range, y_range

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        x = min(max(x, x0), x1)
        y = min(max(y, y0), y1) if math.isfinite(y) else y1
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    return to_pixel


def _series_points(series: Series) -> list[tuple[float, float]]:
    if series.kind != "steps":
        return [(float(x), float(y)) for x, y in zip(series.xs, series.ys)]
    points = []
    for i, y in enumerate(series.ys):
        points += [(float(series.xs[i]), float(y)), (float(series.xs[i + 1]), float(y))]
    return points


def _axes(draw: ImageDraw.ImageDraw, box: Box, panel: Panel, ranges, font) -> None:
    left, top, right, bottom = box
    to_pixel = _mapper(box, *ranges)
    for x in nice_ticks(*ranges[0]):
        px, _ = to_pixel(x, ranges[1][0])
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.text((px, bottom + 4), f"{x:g}", fill=INK, font=font, anchor="ma")
    for y in nice_ticks(*ranges[1]):
        _, py = to_pixel(ranges[0][0], y)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((left - 6, py), f"{y:g}", fill=INK, font=font, anchor="rm")
    draw.rectangle(box, outline=INK)
    draw.text(((left + right) / 2, top - 8), panel.title, fill=INK, font=font, anchor="md")
    draw.text(((left + right) / 2, bottom + 22), panel.x_label, fill=INK, font=font, anchor="ma")
    draw.text((left - 62, top - 8), panel.y_label, fill=INK, font=font, anchor="ld")


def _legend(draw: ImageDraw.ImageDraw, box: Box, series: Sequence[Series], font) -> None:
    labelled = [s for s in series if s.label]
    x, y = box[2] - 8, box[1] + 8
    for s in labelled:
        draw.text((x, y), s.label, fill=INK, font=font, anchor="ra")
        swatch_x = x - draw.textlength(s.label, font=font) - 26
        draw.line([(swatch_x, y + 7), (swatch_x + 18, y + 7)], fill=PALETTE[s.color % len(PALETTE)], width=3)
        y += 17


def draw_panel(draw: ImageDraw.ImageDraw, box: Box, panel: Panel, font=None) -> None:
    """One panel (axes, grid, series, legend) inside the pixel ``box`` of its plot area."""
    font = font or _font()
    ranges = (panel.x_range or data_range(panel.series, "x"), panel.y_range or data_range(panel.series, "y"))
    _axes(draw, box, panel, ranges, font)
    to_pixel = _mapper(box, *ranges)
    for s in panel.series:
        color = PALETTE[s.color % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in _series_points(s)]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=s.width, joint="curve")
        if s.kind == "points":
            for px, py in pixels:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    _legend(draw, box, panel.series, font)


def render(panels: Sequence[Panel], width: int = 960, panel_height: int = 340) -> Image.Image:
    """All panels stacked vertically on one white RGB image."""
    if width < 300 or panel_height < 150:
        raise ValueError(f"a chart needs at least 300 x 150 pixels per panel, got {width} x {panel_height}")
    image = Image.new("RGB", (width, panel_height * max(1, len(panels))), BACKGROUND)
    draw, font = ImageDraw.Draw(image), _font()
    left, top, right, bottom = MARGIN
    for i, panel in enumerate(panels):
        y = i * panel_height
        draw_panel(draw, (left, y + top, width - right, y + panel_height - bottom), panel, font)
    return image


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path

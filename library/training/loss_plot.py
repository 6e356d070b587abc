"""The loss plot written at the end of training (``loss.png``), drawn with Pillow only.

Two panels sharing the step axis: the loss per step in a light colour with its smoothed curve (a
bias-corrected exponential moving average, as TensorBoard's smoothing slider) in a strong colour, and
the learning rate below. Non-finite values are skipped (lines break there); empty input gives empty
panels that say so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from library.errors import UserError

LOSS_COLOUR = (160, 196, 232)
SMOOTH_COLOUR = (16, 82, 168)
LR_COLOUR = (214, 96, 32)
AXIS_COLOUR = (60, 60, 60)
GRID_COLOUR = (228, 228, 228)
TEXT_COLOUR = (20, 20, 20)


def smoothed(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected EMA: m_k = s·m_{k-1} + (1 − s)·v_k, m_0 = 0, output m_k / (1 − s^k).

    k counts finite values only; a non-finite input gives NaN at its position and leaves m unchanged."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"loss plot smoothing must be in [0, 1), got {smoothing}")
    out: list[float] = []
    mean, count = 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        count += 1
        mean = smoothing * mean + (1.0 - smoothing) * value
        out.append(mean / (1.0 - smoothing**count))
    return out


@dataclass(frozen=True)
class _Panel:
    left: int
    top: int
    right: int
    bottom: int
    count: int  # points on the x axis
    low: float
    high: float

    def x(self, index: int) -> float:
        if self.count <= 1:
            return (self.left + self.right) / 2
        return self.left + (self.right - self.left) * index / (self.count - 1)

    def y(self, value: float) -> float:
        inset = 6  # keep the extremes off the frame
        span = self.bottom - self.top - 2 * inset
        return self.bottom - inset - span * (value - self.low) / (self.high - self.low)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _value_range(*series: Sequence[float]) -> tuple[float, float] | None:
    finite = [v for values in series for v in values if math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        pad = abs(high) * 0.05 or 1.0
        return low - pad, high + pad
    return low, high


def _draw_series(draw: ImageDraw.ImageDraw, panel: _Panel, values: Sequence[float], colour: tuple, width: int) -> None:
    """Polylines through runs of finite points; a lone finite point is drawn as a dot."""
    run: list[tuple[float, float]] = []
    for index, value in enumerate([*values, math.nan]):
        if math.isfinite(value):
            run.append((panel.x(index), panel.y(value)))
            continue
        if len(run) == 1:
            (x, y), r = run[0], width + 1
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif run:
            draw.line(run, fill=colour, width=width, joint="curve")
        run = []


def _draw_axes(draw: ImageDraw.ImageDraw, panel: _Panel, first_step: int, fmt: str, font, label: str) -> None:
    for i in range(1, 4):
        y = panel.top + (panel.bottom - panel.top) * i / 4
        draw.line((panel.left, y, panel.right, y), fill=GRID_COLOUR)
    draw.rectangle((panel.left, panel.top, panel.right, panel.bottom), outline=AXIS_COLOUR)
    draw.text((panel.left - 8, panel.top), format(panel.high, fmt), fill=TEXT_COLOUR, font=font, anchor="rt")
    draw.text((panel.left - 8, panel.bottom), format(panel.low, fmt), fill=TEXT_COLOUR, font=font, anchor="rb")
    draw.text((panel.left - 8, (panel.top + panel.bottom) / 2), label, fill=TEXT_COLOUR, font=font, anchor="rm")
    last = first_step + max(panel.count, 1) - 1
    ticks = sorted({first_step, (first_step + last) // 2, last}) if panel.count > 1 else [first_step]
    for step in ticks:
        x = panel.x(step - first_step)
        draw.line((x, panel.bottom, x, panel.bottom + 5), fill=AXIS_COLOUR)
        draw.text((x, panel.bottom + 8), str(step), fill=TEXT_COLOUR, font=font, anchor="mt")


def _draw_legend(draw: ImageDraw.ImageDraw, panel: _Panel, entries: list[tuple[str, tuple]], font) -> None:
    y = panel.top + 10
    for text, colour in entries:
        width = int(draw.textlength(text, font=font))
        x = panel.right - 10 - width
        draw.line((x - 34, y + 7, x - 8, y + 7), fill=colour, width=4)
        draw.text((x, y), text, fill=TEXT_COLOUR, font=font)
        y += 20


def _panel_or_note(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], count: int,
                   series: list[Sequence[float]], font, what: str) -> _Panel | None:
    value_range = _value_range(*series)
    if value_range is None:
        draw.rectangle(box, outline=AXIS_COLOUR)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), f"no finite {what} values", fill=TEXT_COLOUR,
                  font=font, anchor="mm")
        return None
    return _Panel(*box, count=count, low=value_range[0], high=value_range[1])


def loss_plot(losses: Sequence[float], lrs: Sequence[float], path: str | os.PathLike, *, smoothing: float = 0.9,
              first_step: int = 1, size: tuple[int, int] = (1200, 800)) -> Path:
    """Draw loss (raw + smoothed) over the learning rate and write a PNG at ``path`` (temp file + rename).

    ``losses[i]`` and ``lrs[i]`` belong to optimizer step ``first_step + i``."""
    width, height = size
    smooth = smoothed(losses, smoothing)
    count = max(len(losses), len(lrs))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, title_font = _font(14), _font(20)
    left, right = 110, width - 30
    split = 50 + int((height - 130) * 0.68)
    title = f"training loss ({len(losses)} {'step' if len(losses) == 1 else 'steps'})"
    draw.text((width / 2, 14), title, fill=TEXT_COLOUR, font=title_font, anchor="mt")
    loss_panel = _panel_or_note(draw, (left, 50, right, split), count, [losses, smooth], font, "loss")
    if loss_panel is not None:
        _draw_axes(draw, loss_panel, first_step, ".4g", font, "loss")
        _draw_series(draw, loss_panel, losses, LOSS_COLOUR, 1)
        _draw_series(draw, loss_panel, smooth, SMOOTH_COLOUR, 3)
        _draw_legend(draw, loss_panel, [("loss", LOSS_COLOUR), (f"smoothed ({smoothing:g})", SMOOTH_COLOUR)], font)
    lr_panel = _panel_or_note(draw, (left, split + 40, right, height - 50), count, [lrs], font, "learning rate")
    if lr_panel is not None:
        _draw_axes(draw, lr_panel, first_step, ".2e", font, "lr")
        _draw_series(draw, lr_panel, lrs, LR_COLOUR, 2)
        _draw_legend(draw, lr_panel, [("learning rate", LR_COLOUR)], font)
    draw.text((width / 2, height - 6), "step", fill=TEXT_COLOUR, font=font, anchor="mb")
    return _write_png(image, Path(path))


def _write_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

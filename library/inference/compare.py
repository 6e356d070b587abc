"""Render the same prompts and seeds with every checkpoint or network file of a folder: one labelled
grid (rows: prompts, columns: files in training order).

Files are ordered by the step they were saved at (``ss_steps`` metadata, else ``-step<N>`` in the
name), then by epoch (``ss_epoch``, else a trailing ``-<N>``), then files with neither (the final
save) by name. Full checkpoints each bring their MMDiT (and their text encoders when they hold
them); network files (LoRA / LoKr) are attached one at a time to the base model by a caller-supplied
``attach`` callable, so this module never imports ``networks``. Every column re-encodes the prompts,
since a network or a checkpoint may change the text encoders. The seeds are fixed once for all columns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from library.errors import UserError
from library.inference.images import save_png
from library.inference.pipeline import LoadOptions, ModelSet, ModelSources, _t5_dtype, load_models, render
from library.inference.prompts import PromptSpec
from library.inference.run import encode_all, model_default_params, params_for
from library.inference.sampling import SamplingParams, initial_noise
from library.models.safetensors_io import read_metadata, read_shapes

logger = logging.getLogger(__name__)
CHECKPOINT, NETWORK = "checkpoint", "network"
NETWORK_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")
FONT_SIZE = 14
LINE = FONT_SIZE + 4
PAD = 4
# attach(models, network file) hooks the network into the models and returns the function that unhooks it
Attach = Callable[[ModelSet, Path], Callable[[], None]]


@dataclass(frozen=True)
class Candidate:
    """One file to compare: what it is and when in training it was saved."""

    path: Path
    kind: str
    step: int | None = None
    epoch: int | None = None

    def label(self) -> tuple[str, str]:
        """(file name without .safetensors, "step N" / "epoch N" / "") for the column header."""
        detail = f"step {self.step}" if self.step is not None else f"epoch {self.epoch}" if self.epoch is not None else ""
        return self.path.stem, detail


@dataclass(frozen=True)
class CompareJob:
    prompts: tuple[PromptSpec, ...]
    defaults: SamplingParams  # shift / cfg_scale None -> the model's defaults; seed < 0 -> one random seed
    output: Path
    negative_prompt: str = ""
    include_base: bool = False  # networks: a first column without any network


def file_kind(keys: Sequence[str]) -> str | None:
    """NETWORK (sd-scripts LoRA / LoKr keys), CHECKPOINT (an SAI single file) or None."""
    if any(k.startswith(NETWORK_PREFIXES) for k in keys):
        return NETWORK
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return CHECKPOINT
    return None


def _number(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def describe(path: Path) -> Candidate | None:
    """The file as a Candidate (kind, step, epoch from metadata or its name); None if it is neither kind."""
    kind = file_kind(list(read_shapes(path, what="checkpoint or network file")))
    if kind is None:
        return None
    meta = read_metadata(path, what="checkpoint or network file")
    step_match, epoch_match = re.search(r"-step(\d+)", path.stem), re.search(r"-(\d+)$", path.stem)
    step = _number(meta.get("ss_steps")) if "ss_steps" in meta else _number(step_match and step_match.group(1))
    epoch = _number(meta.get("ss_epoch")) if "ss_epoch" in meta else _number(epoch_match and epoch_match.group(1))
    return Candidate(path, kind, step, epoch)


def order_key(candidate: Candidate) -> tuple[int, int, str]:
    if candidate.step is not None:
        return 0, candidate.step, candidate.path.name
    if candidate.epoch is not None:
        return 1, candidate.epoch, candidate.path.name
    return 2, 0, candidate.path.name


def find_checkpoints(folder: str | Path, pattern: str = "*.safetensors") -> list[Candidate]:
    """Every checkpoint or network file in ``folder`` matching ``pattern``, in training order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--checkpoint_dir {folder}: folder not found")
    found: list[Candidate] = []
    for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
        candidate = describe(path)
        if candidate is None:
            logger.info("skipping %s: neither an SD3 checkpoint nor an SD3 LoRA/LoKr file", path.name)
        else:
            found.append(candidate)
    if not found:
        raise UserError(f"--checkpoint_dir {folder} has no SD3 checkpoint or network files matching {pattern!r}")
    if len({c.kind for c in found}) > 1:
        raise UserError(f"--checkpoint_dir {folder} holds both full checkpoints and network files; "
                        "use --pattern to pick one kind")
    return sorted(found, key=order_key)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def label_bands(cell_width: int) -> tuple[int, int]:
    """(width of the row-label band on the left, height of the column-label band on top)."""
    return max(160, min(cell_width, 320)), 2 * LINE + 2 * PAD


def _fit(text: str, font, width: int, middle: bool = False) -> str:
    """``text`` shortened with "…" (at the end, or in the middle) until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    head, tail = (text[:(len(text) + 1) // 2], text[(len(text) + 1) // 2:]) if middle else (text, "")
    while (head or tail) and font.getlength(head + "…" + tail) > width:
        if middle and len(tail) >= len(head):
            tail = tail[1:]
        else:
            head = head[:-1]
    return head + "…" + tail


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return [_fit(line, font, width) for line in lines]


def labelled_grid(columns: list[list[Image.Image]], column_labels: Sequence[tuple[str, str]],
                  row_labels: Sequence[str]) -> Image.Image:
    """Cells (column c, row r) = columns[c][r] on a canvas of (left + C·W, top + R·H), W×H the largest
    cell; column headers (file name, step) on top, the prompts on the left."""
    from library.training.sampling import image_grid

    rows = [[column[r] for column in columns] for r in range(len(row_labels))]
    body = image_grid(rows)
    cell_w, cell_h = body.width // len(columns), body.height // len(rows)
    left, top = label_bands(cell_w)
    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw, font = ImageDraw.Draw(canvas), _font()
    for c, (name, detail) in enumerate(column_labels):
        x = left + c * cell_w + PAD
        for line, text in enumerate((name, detail)):
            draw.text((x, PAD + line * LINE), _fit(text, font, cell_w - 2 * PAD, middle=True), fill="black", font=font)
    for r, prompt in enumerate(row_labels):
        lines = _wrap(prompt, font, left - 2 * PAD, max(1, (cell_h - 2 * PAD) // LINE))
        for line, text in enumerate(lines):
            draw.text((PAD, top + r * cell_h + PAD + line * LINE), text, fill="black", font=font)
    return canvas


def fixed_plans(job: CompareJob, variant: str) -> list[SamplingParams]:
    """One SamplingParams per prompt (model defaults filled, seeds drawn once) shared by every column."""
    defaults = model_default_params(variant, job.defaults.shift, job.defaults.cfg_scale, job.defaults)
    return [params_for(spec, defaults) for spec in job.prompts]


def render_column(models: ModelSet, job: CompareJob, plans: Sequence[SamplingParams]) -> list[Image.Image]:
    """One image per prompt with the models as they are now (prompts encoded with their encoders)."""
    negatives = [spec.negative_prompt or job.negative_prompt for spec in job.prompts]
    table = encode_all(models, [spec.prompt for spec in job.prompts] + negatives)
    images = []
    for spec, params, negative in zip(job.prompts, plans, negatives):
        noise = initial_noise(1, params.height, params.width, params.seed)
        _, rendered = render(models, table[spec.prompt], table[negative], params, noise)
        images.append(rendered[0])
    return images


def _has_text_encoders(path: Path) -> bool:
    return any(k.startswith("text_encoders.") for k in read_shapes(path, what="checkpoint"))


def _switch_checkpoint(models: ModelSet, path: Path, sources: ModelSources, reload_encoders: bool) -> None:
    """Replace the MMDiT (and, when asked, the text encoders) of ``models`` by those of ``path``."""
    from library.inference.pipeline import load_placed_mmdit
    from library.models.text_encoders import load_text_encoders

    opts, config = models.options, models.mmdit.config
    models.mmdit, models.swap = None, None  # type: ignore[assignment]  # free the previous weights first
    models.mmdit, models.swap = load_placed_mmdit(path, opts)
    if models.mmdit.config != config:
        raise UserError(f"{path} is a different model architecture than the first checkpoint; compare one model's saves")
    if reload_encoders:
        models.encoders = None
        models.encoders = load_text_encoders(path, sources.clip_l, sources.clip_g, sources.t5xxl, dtype=opts.dtype,
                                             t5_dtype=_t5_dtype(opts.dtype), device="cpu", mmap=opts.mmap)


def _checkpoint_columns(candidates: Sequence[Candidate], sources: ModelSources, options: LoadOptions,
                        job: CompareJob) -> list[list[Image.Image]]:
    models = load_models(replace(sources, ckpt_path=str(candidates[0].path)), options)
    plans = fixed_plans(job, models.variant)
    columns, had_encoders = [], _has_text_encoders(candidates[0].path)
    for index, candidate in enumerate(candidates):
        if index:
            has_encoders = _has_text_encoders(candidate.path)
            _switch_checkpoint(models, candidate.path, sources, has_encoders or had_encoders)
            had_encoders = has_encoders
        logger.info("rendering %s", candidate.path.name)
        columns.append(render_column(models, job, plans))
    return columns


def _network_columns(candidates: Sequence[Candidate], sources: ModelSources, options: LoadOptions,
                     job: CompareJob, attach: Attach) -> list[list[Image.Image]]:
    models = load_models(sources, options)
    plans = fixed_plans(job, models.variant)
    columns = [render_column(models, job, plans)] if job.include_base else []
    for candidate in candidates:
        logger.info("rendering %s", candidate.path.name)
        detach = attach(models, candidate.path)
        try:
            columns.append(render_column(models, job, plans))
        finally:
            detach()
    return columns


def compare_checkpoints(candidates: Sequence[Candidate], sources: ModelSources, options: LoadOptions,
                        job: CompareJob, attach: Attach | None = None) -> Path:
    """Render every candidate's column and write the labelled grid to ``job.output`` (atomically)."""
    labels, names = [c.label() for c in candidates], [c.path.name for c in candidates]
    if candidates[0].kind == NETWORK:
        if not sources.ckpt_path or attach is None:
            raise UserError("the folder holds network files: pass the base model they were trained on with --ckpt_path")
        columns = _network_columns(candidates, sources, options, job, attach)
        if job.include_base:
            labels, names = [("base model", Path(sources.ckpt_path).stem)] + labels, ["base model"] + names
    else:
        columns = _checkpoint_columns(candidates, sources, options, job)
    grid = labelled_grid(columns, labels, [spec.prompt for spec in job.prompts])
    text = "columns: " + ", ".join(names) + "\nrows: " + " | ".join(s.prompt for s in job.prompts)
    return save_png(grid, job.output, text)

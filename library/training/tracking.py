"""Training logs for TensorBoard and Weights & Biases (``--log_with tensorboard|wandb|all``).

:func:`open_tracker` turns the ``--log_*`` flags into a :class:`Tracker` that fans scalars, histograms,
images and text out to the chosen sinks; it does nothing on non-main processes. The run folder is
``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`` (sd-scripts' naming); TensorBoard's event files go to
``<run folder>/<tracker name>/`` as accelerate writes them, W&B gets the run folder as ``dir``. The
tracker name is ``--log_tracker_name``, else the trainer's default ("finetuning", "network_train").
``--log_tracker_config`` is a TOML file of extra init kwargs per tracker (``[tensorboard]`` for
``SummaryWriter``, ``[wandb]`` for ``wandb.init``), as in sd-scripts.

With ``--log_config`` the run's settings are recorded (TensorBoard: text ``config``; W&B: ``config=``)
after :func:`redact`: every key whose name contains token, key, secret, passw, api, auth or credential
(any case, at any depth) has its value replaced by ``"***"``, and any occurrence of such a string value
(6 characters or more) inside another string is replaced as well. A few known harmless names (token
counts, the tokenizer folder, ``metadata_author``) are kept.

:class:`TrackerHooks` logs per optimizer step ``loss/current``, ``loss/average``, ``lr/<group>``,
``grad_norm`` (before clipping) and the histogram ``sigma``; per epoch ``loss/epoch``; on request
``loss/validation`` and sample images ``samples/<index:02d>``; and writes ``loss.png`` at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from PIL import Image

from library.config import LogConfig
from library.config_values import read_toml_file, unknown_name_error
from library.errors import UserError
from library.training.loop import LoopHooks, LoopState, average_loss

logger = logging.getLogger(__name__)

REDACTED = "***"
_SECRET_NAME = re.compile(r"token|key|secret|passw|api|auth|credential", re.IGNORECASE)
_NOT_SECRET = frozenset({
    "t5xxl_max_token_length", "t5xxl_token_length", "max_token_length", "tokenizer_cache_dir", "keep_tokens",
    "keep_tokens_separator", "class_tokens", "token_warmup_min", "token_warmup_step", "metadata_author",
})
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_TENSORBOARD_KWARGS = ("comment", "purge_step", "max_queue", "flush_secs", "filename_suffix")


def is_secret_name(name: str) -> bool:
    """Whether a setting called ``name`` may hold a credential (see the module docstring)."""
    return bool(_SECRET_NAME.search(name)) and name.lower() not in _NOT_SECRET


def redact(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``settings`` with every secret value replaced by ``"***"`` (nested dicts/lists too)."""
    secrets: set[str] = set()
    _collect_secrets(settings, secrets, False)
    return _scrub(settings, sorted(secrets, key=len, reverse=True))


def _collect_secrets(value: Any, found: set[str], secret: bool) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _collect_secrets(item, found, secret or is_secret_name(str(key)))
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _collect_secrets(item, found, secret)
    elif secret and isinstance(value, str) and len(value) >= 6:  # short values would scrub ordinary text
        found.add(value)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if is_secret_name(str(k)) and v not in (None, "") else _scrub(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_scrub(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _scrub(str(value), secrets)  # paths and other objects as text, scrubbed too


class Sink(Protocol):
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def histogram(self, tag: str, values: list[float], step: int) -> None: ...

    def images(self, tag: str, images: list[Image.Image], step: int, caption: str | None) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Fans log calls out to its sinks; a tracker of a non-main process has none and does nothing."""

    def __init__(self, sinks: Sequence[Sink], *, is_main: bool = True, run_dir: Path | None = None) -> None:
        self.sinks: list[Sink] = list(sinks) if is_main else []
        self.run_dir = run_dir

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if values:
            for sink in self.sinks:
                sink.scalars({k: float(v) for k, v in values.items()}, step)

    def histogram(self, tag: str, values: Sequence[float], step: int) -> None:
        finite = [float(v) for v in values if math.isfinite(v)]
        if finite:
            for sink in self.sinks:
                sink.histogram(tag, finite, step)

    def images(self, tag: str, images: list[Image.Image], step: int, caption: str | None = None) -> None:
        if images:
            for sink in self.sinks:
                sink.images(tag, [im.convert("RGB") for im in images], step, caption)

    def text(self, tag: str, text: str, step: int) -> None:
        for sink in self.sinks:
            sink.text(tag, text, step)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


class _TensorBoardSink:
    def __init__(self, log_dir: Path, kwargs: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), **kwargs)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: list[float], step: int) -> None:
        import numpy as np

        self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def images(self, tag: str, images: list[Image.Image], step: int, caption: str | None) -> None:
        import numpy as np

        height, width = max(im.height for im in images), max(im.width for im in images)
        batch = np.zeros((len(images), height, width, 3), dtype=np.uint8)  # (N, H, W, C), smaller ones padded black
        for i, image in enumerate(images):
            batch[i, : image.height, : image.width] = np.asarray(image)
        self.writer.add_images(tag, batch, step, dataformats="NHWC")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandbSink:
    def __init__(self, wandb: Any, init_kwargs: Mapping[str, Any]) -> None:
        self.wandb = wandb
        try:
            self.run = wandb.init(**init_kwargs)
        except TypeError as error:
            raise UserError(f"--log_tracker_config [wandb]: wandb.init rejected the settings: {error}") from None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def histogram(self, tag: str, values: list[float], step: int) -> None:
        self.run.log({tag: self.wandb.Histogram(values)}, step=step)

    def images(self, tag: str, images: list[Image.Image], step: int, caption: str | None) -> None:
        self.run.log({tag: [self.wandb.Image(im, caption=caption) for im in images]}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.run.log({tag: self.wandb.Html(f"<pre>{escaped}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


def tracker_kinds(log_with: str | None) -> tuple[str, ...]:
    """The sinks a ``--log_with`` value asks for ("all": TensorBoard and W&B)."""
    if log_with is None:
        return ()
    return ("tensorboard", "wandb") if log_with == "all" else (log_with,)


def _require_package(kind: str) -> None:
    package = _PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--log_with {kind} needs the {package} package: pip install {package}")


def read_tracker_config(path: str | None, kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Init kwargs per tracker from a ``--log_tracker_config`` TOML (``[tensorboard]`` / ``[wandb]`` tables)."""
    if not path:
        return {kind: {} for kind in kinds}
    data = read_toml_file(path, f"--log_tracker_config {path}")
    for name, table in data.items():
        if name not in _PACKAGES:
            raise unknown_name_error(f"tracker table in {path}:", name, _PACKAGES)
        if not isinstance(table, dict):
            raise UserError(f"--log_tracker_config {path}: [{name}] must be a table of init arguments")
    for key in data.get("tensorboard", {}):
        if key not in _TENSORBOARD_KWARGS:
            raise unknown_name_error(f"[tensorboard] key in {path}:", key, _TENSORBOARD_KWARGS)
    return {kind: dict(data.get(kind, {})) for kind in kinds}


def _settings_text(config: Mapping[str, Any]) -> str:
    """Settings as JSON, indented as a markdown code block (TensorBoard renders text as markdown)."""
    body = json.dumps(config, indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in body.splitlines())


def _open_tensorboard(log: LogConfig, name: str, run_dir: Path | None, kwargs: dict[str, Any],
                      config: dict[str, Any] | None) -> Sink:
    assert run_dir is not None  # checked by open_tracker
    sink = _TensorBoardSink(run_dir / name, kwargs)
    if config is not None:
        sink.text("config", _settings_text(config), 0)
    return sink


def _open_wandb(log: LogConfig, name: str, run_dir: Path | None, kwargs: dict[str, Any],
                config: dict[str, Any] | None) -> Sink:
    import wandb

    if log.wandb_api_key:
        wandb.login(key=log.wandb_api_key)
    init: dict[str, Any] = {"project": name}
    if log.wandb_run_name:
        init["name"] = log.wandb_run_name
    if run_dir is not None:
        init["dir"] = str(run_dir)
    if config is not None:
        init["config"] = config
    return _WandbSink(wandb, {**init, **kwargs})


_OPENERS: dict[str, Callable[..., Sink]] = {"tensorboard": _open_tensorboard, "wandb": _open_wandb}


def open_tracker(log: LogConfig, *, default_name: str, settings: Mapping[str, Any], is_main: bool) -> Tracker | None:
    """The tracker the ``--log_*`` flags ask for (None without --log_with).

    Every process checks the flags (so all ranks fail alike); only the main process opens sinks."""
    kinds = tracker_kinds(log.log_with)
    if not kinds:
        return None
    if "tensorboard" in kinds and not log.logging_dir:
        raise UserError(f"--log_with {log.log_with} writes TensorBoard event files: set --logging_dir DIR")
    for kind in kinds:
        _require_package(kind)
    init_kwargs = read_tracker_config(log.log_tracker_config, kinds)
    if not is_main:
        return Tracker([], is_main=False)
    name = log.log_tracker_name or default_name
    run_dir = None
    if log.logging_dir:
        run_dir = Path(log.logging_dir) / f"{log.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=True)
    config = redact(settings) if log.log_config else None
    sinks = [_OPENERS[kind](log, name, run_dir, init_kwargs[kind], config) for kind in kinds]
    logger.info("logging to %s%s", ", ".join(kinds), f" in {run_dir}" if run_dir else "")
    return Tracker(sinks, run_dir=run_dir)


class TrackerHooks(LoopHooks):
    """Logs the loop's numbers to a tracker and writes the loss plot at the end (main process only).

    ``loss/epoch`` averages the losses recorded since the previous epoch ended (after a resume in the
    middle of an epoch: since the resume). Sample images go to one tag per prompt, ``samples/<index:02d>``,
    so TensorBoard's step slider shows how each prompt develops; W&B gets ``<label>_<index:02d>`` captions."""

    def __init__(self, tracker: Tracker | None, *, plot_path: Path | None, is_main: bool) -> None:
        self.tracker = tracker if is_main else None
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.is_main = is_main
        self._epoch_start = 0  # index into state.loss_history where the running epoch began
        self._lrs: list[float] = []  # learning rate of the first group per step of this process

    def on_train_start(self, state: LoopState) -> None:
        self._epoch_start = len(state.loss_history)

    def on_step_end(self, state: LoopState, loss: float, lr: float) -> None:
        self._lrs.append(float(lr))
        if self.tracker is None:
            return
        values = {"loss/current": loss, "loss/average": average_loss(state.loss_history)}
        lrs = state.lrs or {"group0": lr}
        values.update({f"lr/{name}": value for name, value in lrs.items()})
        if state.grad_norm is not None:
            values["grad_norm"] = state.grad_norm
        self.tracker.scalars(values, state.global_step)
        self.tracker.histogram("sigma", state.sigmas, state.global_step)

    def on_epoch_end(self, state: LoopState, epoch: int) -> None:
        start = min(self._epoch_start, len(state.loss_history))
        losses = [x for x in state.loss_history[start:] if math.isfinite(x)]
        self._epoch_start = len(state.loss_history)
        if self.tracker is not None and losses:
            self.tracker.scalars({"loss/epoch": sum(losses) / len(losses)}, state.global_step)

    def log_validation(self, step: int, value: float) -> None:
        if self.tracker is not None:
            self.tracker.scalars({"loss/validation": value}, step)

    def log_images(self, label: str, step: int, images: list[Image.Image]) -> None:
        if self.tracker is not None:
            for index, image in enumerate(images):
                self.tracker.images(f"samples/{index:02d}", [image], step, caption=f"{label}_{index:02d}")

    def on_train_end(self, state: LoopState) -> None:
        try:
            if self.is_main and self.plot_path is not None and state.loss_history:
                self._write_plot(state)
        finally:
            self.close()

    def _write_plot(self, state: LoopState) -> None:
        from library.training.loss_plot import loss_plot

        losses = list(state.loss_history)  # restored history included after a resume
        lrs = self._lrs[-len(losses):]
        lrs = [math.nan] * (len(losses) - len(lrs)) + lrs  # no lr known for steps before a resume
        path = loss_plot(losses, lrs, self.plot_path, first_step=state.global_step - len(losses) + 1)
        logger.info("loss plot: %s", path)

    def close(self) -> None:
        """Close the tracker (idempotent; call it from a ``finally`` when training stops early)."""
        if self.tracker is not None:
            self.tracker.close()

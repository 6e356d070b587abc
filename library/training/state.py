"""Training states: save and resume a run exactly where it stopped.

A state folder (``<name>-…-state/``) holds:

- ``train_state.json``: format, trainer name/version, model kind ("full", "lora", "lokr") and
  signature, ``epoch`` (completed epochs), ``global_step`` (optimizer steps done) and
  ``data_position`` (the epoch and batch index of the next batch in the data order);
- ``model.safetensors``: the trainable tensors only;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``;
- ``rng.pt``: python ``random``, numpy, torch CPU, torch CUDA (when in use) and the named
  ``torch.Generator`` states the loop passes (see :func:`capture_rng`);
- ``extra.pt`` (optional): whatever else the loop needs (e.g. running loss averages).

The RNG states live in ``rng.pt`` (byte tensors), not in the JSON. ``.pt`` files are read with
``weights_only=True``; an optimizer/scheduler/extra state holding other objects (some third-party
optimizers) is then read as a trusted file of the user's own run, with a warning (never ``rng.pt``). The folder is written as a temp
folder beside the target and renamed into place; an existing folder of the same name is renamed
aside first and deleted afterwards, so a failed save (a full disk) leaves the old state intact and
no partial folder. Problems on resume are one-line :class:`UserError` messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from library.data.batching import DataPosition
from library.errors import UserError
from library.models.mmdit_config import MMDiTConfig
from library.models.safetensors_io import load_safetensors, save_safetensors
from library.training.checkpoints import save_error

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
EXTRA_FILE = "extra.pt"
STATE_FORMAT = "sd3_trainer.train_state"
STATE_FORMAT_VERSION = 1
TRAINER_NAME = "sd3-trainer"
MODEL_KINDS = ("full", "lora", "lokr")
_SCRIPT_FOR_KIND = MappingProxyType(
    {"full": "sd3_train.py", "lora": "sd3_train_network.py", "lokr": "sd3_train_network.py"}
)


@dataclass(frozen=True)
class TrainState:
    """Counters and identity of a run; ``rng`` is :func:`capture_rng`'s dict (saved in ``rng.pt``)."""

    epoch: int
    global_step: int
    data_position: DataPosition
    model_kind: str
    model_signature: str
    trainer: str = TRAINER_NAME
    trainer_version: str = "unversioned"
    output_name: str = ""  # --output_name of the run that saved it (a curriculum finds the stage by it)
    rng: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "rng"}
        data.update(format=STATE_FORMAT, format_version=STATE_FORMAT_VERSION, rng=RNG_FILE)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], rng: Mapping[str, Any]) -> "TrainState":
        pos = data["data_position"]
        return cls(
            epoch=int(data["epoch"]),
            global_step=int(data["global_step"]),
            data_position=DataPosition(int(pos["epoch"]), int(pos["batch_index"])),
            model_kind=str(data["model_kind"]),
            model_signature=str(data["model_signature"]),
            trainer=str(data.get("trainer", TRAINER_NAME)),
            trainer_version=str(data.get("trainer_version", "unversioned")),
            output_name=str(data.get("output_name", "")),
            rng=rng,
        )


@dataclass(frozen=True)
class LoadedState:
    """Everything :func:`load_state` read back from a state folder."""

    path: Path
    state: TrainState
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    extra: dict[str, Any]


def model_signature(cfg: MMDiTConfig, trainable_shapes: Mapping[str, Sequence[int]]) -> str:
    """``<variant> depth=<d> hidden=<h> tensors=<hash>``: the model size plus a hash of the names and
    shapes of the trainable tensors (so another network rank or target set is also a mismatch)."""
    text = "\n".join(f"{k}:{tuple(int(d) for d in trainable_shapes[k])}" for k in sorted(trainable_shapes))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return f"{cfg.variant} depth={cfg.depth} hidden={cfg.hidden_size} tensors={digest}"


# --- RNG


def _numpy_state() -> dict[str, Any]:
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    return {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The states of python ``random``, numpy's global RNG, torch CPU, torch CUDA (if initialised)
    and each named generator, in a form :func:`torch.save` stores and ``weights_only`` loads."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_cuda(cuda_states: Sequence[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        logger.warning("the state has CUDA RNG states but CUDA is not available; they are not restored")
    elif len(cuda_states) != torch.cuda.device_count():
        logger.warning("the state has CUDA RNG states for %d devices, this machine has %d; not restored",
                       len(cuda_states), torch.cuda.device_count())
    else:
        torch.cuda.set_rng_state_all(list(cuda_states))


def restore_rng(states: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put every RNG back to the captured state, so a resumed run draws the same numbers."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        keys = np.asarray(n["keys"].numpy() if torch.is_tensor(n["keys"]) else n["keys"], dtype=np.uint32)
        np.random.set_state((n["algorithm"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states:
        _restore_cuda(states["cuda"])
    saved = states.get("generators", {})
    for name, generator in (generators or {}).items():
        if name in saved:
            generator.set_state(saved[name])
        else:
            logger.warning("the state has no RNG state for generator %r; it keeps its current seed", name)


# --- saving


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def _write_files(tmp: Path, state: TrainState, model_state: Mapping[str, torch.Tensor],
                 optimizer_state: Mapping[str, Any], scheduler_state: Mapping[str, Any],
                 extra: Mapping[str, Any] | None) -> None:
    save_safetensors(model_state, tmp / MODEL_FILE, {"sd3_trainer.model_signature": state.model_signature})
    _write_torch(dict(optimizer_state), tmp / OPTIMIZER_FILE)
    _write_torch(dict(scheduler_state), tmp / SCHEDULER_FILE)
    _write_torch(dict(state.rng), tmp / RNG_FILE)
    if extra is not None:
        _write_torch(dict(extra), tmp / EXTRA_FILE)
    (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")  # last: marks a complete folder


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def save_state(
    directory: str | os.PathLike,
    *,
    state: TrainState,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a state folder (temp folder, then rename; an existing one is replaced) and return it."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    logger.info("saving state: %s (epoch %d, step %d)", target, state.epoch, state.global_step)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, state, model_state, optimizer_state, scheduler_state, extra)
        _swap_into_place(tmp, target)
    except OSError as exc:
        raise save_error(target, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- loading


def _read_json(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise UserError(f"--resume {directory} is not a folder; pass a <name>-…-state folder saved with --save_state")
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume {directory} is not a training state folder ({STATE_FILE} is missing); "
                        f"pass a folder saved with --save_state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "current_step" in data and "format" not in data:
            raise UserError(f"--resume {directory} is an sd-scripts (accelerate) state, which cannot be resumed "
                            f"here; start from the model saved with it and --initial_step {data['current_step']}")
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {STATE_FORMAT!r}")
        return data
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(f"state file {path} is corrupt or truncated ({exc}); resume from another state") from None


def _check_identity(directory: Path, data: Mapping[str, Any], expected_kind: str, expected_signature: str) -> None:
    kind = data.get("model_kind")
    if kind != expected_kind:
        script = _SCRIPT_FOR_KIND.get(str(kind))
        if script is not None and script != _SCRIPT_FOR_KIND.get(expected_kind):
            raise UserError(f"--resume {directory} is a {kind} training state; resume it with {script}")
        raise UserError(f"--resume {directory} is a {kind} training state, but this run trains {expected_kind}; "
                        f"use the same network type as the run that saved it")
    signature = data.get("model_signature")
    if signature != expected_signature:
        raise UserError(f"--resume {directory} was saved for another model ({signature}) than the one being "
                        f"trained ({expected_signature}); resume with the same model and network settings")


def _read_torch(path: Path, *, required: bool = True, trusted_types: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise UserError(f"state file {path} is missing; resume from a complete state folder")
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        if trusted_types and "Weights only load failed" in str(exc):
            logger.warning("%s holds non-tensor objects; loading it as a trusted file of this run", path)
            return _read_torch_trusted(path)
        raise UserError(f"state file {path} is corrupt or truncated ({_first_line(exc)}); "
                        f"resume from another state") from None


def _read_torch_trusted(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"state file {path} is corrupt or truncated ({_first_line(exc)}); "
                        f"resume from another state") from None


def _read_model(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"state file {path} is missing; resume from a complete state folder")
    try:
        return load_safetensors(path, mmap=False, what="state model file")
    except UserError:
        raise UserError(f"state file {path} is corrupt or truncated; resume from another state") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_state(directory: str | os.PathLike, *, expected_kind: str, expected_signature: str) -> LoadedState:
    """Read a state folder after checking it belongs to this kind of run and this model."""
    directory = Path(directory)
    data = _read_json(directory)
    _check_identity(directory, data, expected_kind, expected_signature)
    model_state = _read_model(directory / MODEL_FILE)
    optimizer_state = _read_torch(directory / OPTIMIZER_FILE)
    scheduler_state = _read_torch(directory / SCHEDULER_FILE)
    rng = _read_torch(directory / RNG_FILE, trusted_types=False)
    extra = _read_torch(directory / EXTRA_FILE, required=False)
    try:
        state = TrainState.from_json_dict(data, rng)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"state file {directory / STATE_FILE} is corrupt or truncated ({exc!r}); "
                        f"resume from another state") from None
    logger.info("resuming from %s: epoch %d, step %d, next batch %d of epoch %d", directory, state.epoch,
                state.global_step, state.data_position.batch_index, state.data_position.epoch)
    return LoadedState(directory, state, model_state, optimizer_state, scheduler_state, extra)

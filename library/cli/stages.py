"""``--stages stages.toml``: a training curriculum, several runs in one invocation.

The file is a list of ``[[stage]]`` tables, run top to bottom::

    [[stage]]
    name = "512px"                          # required: unique, letters/digits/._- (a folder and file name)
    dataset_config = "datasets/512.toml"    # any trainer flag, valued as in a --config_file
    training_shift = 2.5

    [[stage]]
    name = "1024px"
    dataset_config = "datasets/1024.toml"
    training_shift = 7.0
    optimizer_args = ["weight_decay=0.01"]  # nargs flags take lists; switches take true

Stage ``i`` runs the trainer with the command line (without ``--stages``/``--resume``), then the
stage's keys as flags (later flags win), then ``--output_dir <output_dir>/<name>`` and ``--output_name
<output_name>_<name>`` unless the stage sets them. Every stage after the first starts from the
previous stage's final file: a network run gets ``--network_weights <previous>``; a full fine-tune gets
``--pretrained_model_name_or_path <previous>``, ``--vae`` at the original VAE and ``--clip_l/--clip_g/
--t5xxl`` at the file each encoder came from, or at the previous checkpoint when that stage trained
the encoder (it must then save it: ``save_clip`` / ``save_t5xxl``). A stage may not set ``stages``,
``config_file``, ``output_config`` or ``resume``; ``pretrained_model_name_or_path`` and
``network_weights`` only in the first stage. Relative paths in the file resolve against its folder.

Every stage is parsed and checked before the first one trains. ``--resume DIR`` finds the stage whose
output name saved ``DIR`` (``train_state.json``), checks the earlier stages' final files, resumes that
stage and runs the rest. The stage runner works on argument lists only: each stage is an ordinary run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence


from library.cli import config_file
from library.config import unknown_name_error
from library.config_values import read_toml_file
from library.errors import UserError

logger = logging.getLogger(__name__)

FORBIDDEN = {"stages": "stages do not nest", "config_file": "put shared flags on the command line or in its "
             "--config_file", "output_config": "it writes a config instead of training",
             "resume": "pass --resume DIR on the command line; the stage is found from the state"}
FIRST_STAGE_ONLY = ("pretrained_model_name_or_path", "network_weights")
PATH_FLAGS = ("pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "vae", "tokenizer_cache_dir",
              "dataset_config", "train_data_dir", "reg_data_dir", "in_json", "sample_prompts", "output_dir",
              "logging_dir", "log_tracker_config", "network_weights", "base_weights")
INPUT_FILES = ("pretrained_model_name_or_path", "clip_l", "clip_g", "t5xxl", "vae", "in_json", "sample_prompts",
               "log_tracker_config", "network_weights", "base_weights")
# encoder flag -> (the switch that trains it in a full fine-tune, the switch that saves it in the checkpoint)
ENCODERS = {"clip_l": ("train_text_encoder", "save_clip"), "clip_g": ("train_text_encoder", "save_clip"),
            "t5xxl": ("train_t5xxl", "save_t5xxl")}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Stage:
    """One ``[[stage]]`` table: its keys (paths resolved) and those keys as arguments."""

    name: str
    values: dict[str, Any]
    argv: tuple[str, ...]


@dataclass(frozen=True)
class StageRun:
    """A stage ready to run: the trainer's full argument list and the final file it will write."""

    index: int
    stage: Stage
    argv: tuple[str, ...]
    output_name: str
    final: Path
    start: Path | None  # the previous stage's final file (None for the first stage)


def _fail(prefix: str) -> Callable[[str], NoReturn]:
    def error(message: str) -> NoReturn:
        raise UserError(f"{prefix}: {message}")

    return error


def _resolve(key: str, value: Any, folder: Path) -> Any:
    if key not in PATH_FLAGS or isinstance(value, bool):
        return value
    if isinstance(value, list):
        return [_resolve(key, item, folder) for item in value]
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _stage(table: Any, index: int, path: Path, parser: argparse.ArgumentParser, seen: set[str]) -> Stage:
    if not isinstance(table, dict):
        raise UserError(f"{path}: stage {index + 1} is not a table; write each stage as a [[stage]] table")
    name = table.get("name")
    where = f"{path}: stage {index + 1}"
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{where}: name = {name!r}: give each stage a name of letters, digits, '.', '_' or '-' "
                        "(it names the stage's folder and files)")
    if name in seen:
        raise UserError(f"{where}: the name {name!r} is used twice; stage names must be unique")
    where = f"{path}: stage '{name}'"
    keys = config_file.file_keys(parser)
    values, argv = {}, []
    for key, value in table.items():
        if key == "name":
            continue
        if key in FORBIDDEN:
            raise UserError(f"{where}: {key!r} cannot be set in a stage ({FORBIDDEN[key]})")
        if key in FIRST_STAGE_ONLY and index > 0:
            raise UserError(f"{where}: {key!r} is only allowed in the first stage; later stages start from the "
                            "previous stage's final file")
        if key not in keys:
            raise UserError(f"{where}: {unknown_name_error('key', key, [*keys, 'name'])}")
        values[key] = _resolve(key, value, path.parent)
        try:
            argv += config_file.arguments_for(key, values[key], keys[key])
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    parser.error = _fail(where)  # type: ignore[method-assign]
    parser.parse_args(argv)
    return Stage(name, values, tuple(argv))


def read_stages(path: str | Path, parser_factory: Callable[[], argparse.ArgumentParser]) -> list[Stage]:
    """The ``[[stage]]`` tables of ``path``, each checked against a fresh trainer parser."""
    path = Path(path)
    data = read_toml_file(path, f"--stages {path}")
    for key in data:
        if key != "stage":
            raise UserError(f"{path}: unknown top-level key {key!r}; write each stage as a [[stage]] table")
    tables = data.get("stage")
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: no [[stage]] tables; add one [[stage]] table (with a name) per stage")
    stages: list[Stage] = []
    for index, table in enumerate(tables):
        stages.append(_stage(table, index, path, parser_factory(), {s.name for s in stages}))
    return stages


def base_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--stages X`` / ``--resume X`` (either spelling: ``--flag X`` or ``--flag=X``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--stages", "--resume"):
            skip = True
        elif not arg.startswith(("--stages=", "--resume=")):
            out.append(arg)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings while stages are only checked (each stage logs its own when it runs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _parse(argv: Sequence[str], network: bool, where: str) -> argparse.Namespace:
    from library.cli import data as data_flags
    from library.cli.train import parse_train_args

    try:
        with _quiet():
            _, ns = parse_train_args(argv, network)
            data_flags.dataset_blueprint(ns)
            _check_optimizer(ns)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return ns


def _check_optimizer(ns: argparse.Namespace) -> None:
    """The optimizer imports and accepts its --optimizer_args; the scheduler args parse."""
    from library.training.optimizer_args import check_optimizer_args, parse_optimizer_args
    from library.training.optimizers import resolve_optimizer_class
    from library.training.schedulers import parse_scheduler_args

    check_optimizer_args(resolve_optimizer_class(ns.optimizer_type), parse_optimizer_args(ns.optimizer_args or ()))
    parse_scheduler_args(ns.lr_scheduler_args)


def _encoders_in(checkpoint: str) -> set[str]:
    """The text encoders an all-in-one checkpoint holds (read from its header)."""
    from library.models.safetensors_io import read_shapes
    from library.models.text_encoders import CHECKPOINT_PREFIXES

    keys = read_shapes(checkpoint, what="--pretrained_model_name_or_path file")
    return {name for name, prefix in CHECKPOINT_PREFIXES.items() if any(k.startswith(prefix) for k in keys)}


def _loaded_from(ns: argparse.Namespace, first: bool) -> dict[str, str | None]:
    """Where a full fine-tune stage loads its VAE and encoders from (None: that encoder is absent)."""
    ckpt = ns.pretrained_model_name_or_path
    inside = _encoders_in(ckpt) if first and ckpt else set()
    sources = {name: getattr(ns, name) or (ckpt if name in inside else None) for name in ENCODERS}
    return {"vae": ns.vae or ckpt, **sources}


def _full_handover(prev: argparse.Namespace, prev_final: Path, first: bool, stage: Stage,
                   where: str) -> list[str]:
    """A full fine-tune stage's start: the previous checkpoint, the original VAE, and each encoder from
    the file it was loaded from, or from the previous checkpoint when the previous stage trained it."""
    sources = _loaded_from(prev, first)
    argv = ["--pretrained_model_name_or_path", str(prev_final)]
    if "vae" not in stage.values and sources["vae"]:
        argv += ["--vae", str(sources["vae"])]
    for name, (trains, saves) in ENCODERS.items():
        source = sources[name]
        if name in stage.values:
            continue
        if source is not None and getattr(prev, trains):
            if not getattr(prev, saves):
                raise UserError(f"{where}: it trains {name} (--{trains}) but does not save it, so the next stage "
                                f"would lose it; add {saves} = true to the stage")
            source = str(prev_final)
        if source is not None:
            argv += [f"--{name}", str(source)]
    return argv


def _check_inputs(ns: argparse.Namespace, produced: set[str], where: str) -> None:
    for key in INPUT_FILES:
        value = getattr(ns, key, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item and str(item) not in produced and not Path(item).exists():
                raise UserError(f"{where}: --{key} {item}: file not found")


def plan_stages(argv: Sequence[str], stages_path: str, *, network: bool) -> list[StageRun]:
    """Every stage's argument list, each parsed and checked (nothing is trained)."""
    from library.cli.train import parse_train_args, train_parser

    base = base_argv(argv)
    with _quiet():
        _, ns = parse_train_args(base, network)
    if ns.stages or ns.resume:
        raise UserError("with --stages, write --stages and --resume in full on the command line (not abbreviated, "
                        "not in a --config_file)")
    if ns.output_config or ns.debug_dataset:
        raise UserError("--stages trains; --output_config and --debug_dataset work on one run's flags, not a curriculum")
    stages = read_stages(stages_path, lambda: train_parser(network))
    runs: list[StageRun] = []
    prev: argparse.Namespace | None = None
    for index, stage in enumerate(stages):
        where = f"stage '{stage.name}'"
        argv_i = [*base, *stage.argv]
        if "output_dir" not in stage.values:
            argv_i += ["--output_dir", str(Path(ns.output_dir) / stage.name)]
        if "output_name" not in stage.values:
            argv_i += ["--output_name", f"{ns.output_name}_{stage.name}"]
        start = runs[-1].final if runs else None
        if start is not None and network:
            argv_i += ["--network_weights", str(start)]
        elif start is not None:
            argv_i += _full_handover(prev, start, index == 1, stage, f"stage '{runs[-1].stage.name}'")
        prev = _parse(argv_i, network, where)
        _check_switches(prev, stage, where)
        _check_inputs(prev, {str(r.final) for r in runs}, where)
        final = Path(prev.output_dir) / f"{prev.output_name}.safetensors"
        runs.append(StageRun(index, stage, tuple(argv_i), prev.output_name, final, start))
    _check_unique(runs)
    return runs


def _check_switches(ns: argparse.Namespace, stage: Stage, where: str) -> None:
    for key, value in stage.values.items():
        if value is False and getattr(ns, key, None) is True:
            raise UserError(f"{where}: {key} = false cannot switch off --{key} given on the command line or in "
                            "--config_file; set it in the stages that need it instead")


def _check_unique(runs: list[StageRun]) -> None:
    for i, run in enumerate(runs):
        for other in runs[:i]:
            if run.output_name == other.output_name or run.final == other.final:
                raise UserError(f"stages '{other.stage.name}' and '{run.stage.name}' write the same output "
                                f"({run.final}); give them different output_name / output_dir")


def _resume_index(runs: list[StageRun], directory: str) -> int:
    """The stage that saved the state ``directory``; the earlier stages' final files must exist."""
    state = Path(directory) / "train_state.json"
    try:
        name = json.loads(state.read_text(encoding="utf-8")).get("output_name", "")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--resume {directory}: no readable train_state.json there; pass a *-state folder") from None
    names = [run.output_name for run in runs]
    if name not in names:
        raise UserError(f"--resume {directory}: it was saved by output_name {name!r}, which is none of the "
                        f"stages' ({', '.join(names)}); resume it without --stages or pass a state of this curriculum")
    index = names.index(name)
    for run in runs[:index]:
        if not run.final.is_file():
            raise UserError(f"--resume {directory} continues stage '{runs[index].stage.name}', but the final file "
                            f"of stage '{run.stage.name}' is missing: {run.final}")
    return index


def _describe(run: StageRun, total: int) -> str:
    overrides = ", ".join(f"{k}={v}" for k, v in run.stage.values.items()) or "no overrides"
    start = f"; starts from {run.start}" if run.start else ""
    return f"stage {run.index + 1}/{total} '{run.stage.name}': {overrides}{start}; writes {run.final}"


def _wait_for_every_process() -> None:
    """Under ``accelerate launch`` with several processes, no rank starts the next stage (which reads this
    stage's final file) before the main process has written it; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stages(argv: Sequence[str] | None, run: Callable[[list[str]], Any], *, network: bool) -> Path:
    """Run the curriculum of ``--stages`` in ``argv``: ``run(stage_argv)`` trains one stage and returns its
    final file. Returns the last stage's final file."""
    from library.cli.train import parse_train_args

    argv = list(sys.argv[1:] if argv is None else argv)
    with _quiet():
        _, ns = parse_train_args(argv, network)
    if not ns.stages:
        raise UserError("--stages needs a TOML file of [[stage]] tables")
    runs = plan_stages(argv, ns.stages, network=network)
    first = _resume_index(runs, ns.resume) if ns.resume else 0
    logger.info("curriculum %s: %d stages checked (%s)", ns.stages, len(runs), ", ".join(r.stage.name for r in runs))
    for stage_run in runs[first:]:
        resume = ["--resume", ns.resume] if ns.resume and stage_run.index == first else []
        logger.info("%s%s", _describe(stage_run, len(runs)), f" (resuming {ns.resume})" if resume else "")
        final = run([*stage_run.argv, *resume])
        _wait_for_every_process()
        if final is None or Path(final).resolve() != stage_run.final.resolve() or not stage_run.final.is_file():
            raise UserError(f"stage '{stage_run.stage.name}' did not write {stage_run.final}; stopping the curriculum")
    return runs[-1].final

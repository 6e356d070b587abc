"""Learning-rate schedules: sd-scripts' ``--lr_scheduler`` names as pure multiplier functions.

Each schedule is a pure ``multiplier(step, **params) -> float`` (factor of each group's initial lr);
a registry maps the name to a factory binding its params; torch's ``LambdaLR`` applies it. Formulas
are transformers'/diffusers' (which sd-scripts calls), so lr curves match sd-scripts. Decisions:

- ``--lr_warmup_steps``/``--lr_decay_steps``: a count, a ratio < 1 or "N%" of the total; ratios
  floor as sd-scripts' ``int(ratio * total)`` (with a 1e-9 tolerance, so 0.29·100 = 29).
- Step the scheduler once per optimizer step; ``total_steps`` counts optimizer steps. (sd-scripts
  scales totals by ``num_processes`` as accelerate steps a prepared scheduler that many times: do not
  ``accelerator.prepare`` it.) ``num_processes``/``gradient_accumulation_steps`` change nothing.
- Warmup for a schedule without one (constant, piecewise_constant, adafactor, a class) is an error,
  as in sd-scripts; ``--lr_decay_steps`` for one without a decay phase is ignored with a warning.
- ``cosine`` is a half cosine (arg ``num_cycles``, default 0.5; the flag is unused, as sd-scripts);
  ``cosine_with_min_lr`` and ``warmup_stable_decay`` use ``--lr_scheduler_num_cycles / 2``.
- ``polynomial`` decays to the arg ``lr_end`` (absolute, default 1e-7 as transformers), or to
  ``--lr_scheduler_min_lr_ratio``·lr when that is given and ``lr_end`` is not.
- ``adafactor[:initial_lr]`` is transformers' ``AdafactorSchedule`` (its Adafactor with
  ``relative_step=True`` only); such an optimizer gets it whatever the name, as in sd-scripts.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.errors import UserError

logger = logging.getLogger(__name__)

Multiplier = Callable[[int], float]


@dataclass(frozen=True)
class SchedulerConfig:
    """The ``--lr_scheduler*`` flags; warmup/decay stay raw (count, ratio or "N%") until the total is known."""

    name: str = "constant"
    warmup_steps: int | float | str | None = 0
    decay_steps: int | float | str | None = 0
    num_cycles: float = 1
    power: float = 1.0
    min_lr_ratio: float | None = None
    timescale: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # --lr_scheduler_args
    scheduler_type: str | None = None


def parse_scheduler_args(items: Sequence[str] | None) -> dict[str, Any]:
    """["k=v", ...] -> {k: literal_eval(v)}; a value that is not a Python literal stays a string."""
    parsed: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise UserError(f"--lr_scheduler_args {item!r} is not key=value")
        try:
            parsed[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed[key] = raw
    return parsed


def resolve_steps(value: int | float | str | None, total_steps: int, name: str) -> int:
    """A step count from a count (≥ 1), a ratio in (0, 1), "N%" or None (0); floors like sd-scripts."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{name} must be a step count, a ratio < 1 or 'N%', got {value!r}")
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"{name} must be a step count, a ratio < 1 or 'N%', got {value!r}") from None
    if not number >= 0:  # also NaN
        raise UserError(f"{name} must not be negative, got {value!r}")
    if text.endswith("%") or number < 1:
        if number > 1:
            raise UserError(f"{name}={value!r} is more than 100% of the training steps")
        steps = math.floor(number * total_steps + 1e-9)  # 0.29 * 100 = 28.999...
    elif number.is_integer():
        steps = int(number)
    else:
        raise UserError(f"{name}={value!r}: give a whole step count or a ratio < 1")
    if steps > total_steps:  # legal in sd-scripts (the lr never finishes ramping): say so and go on
        logger.warning("%s=%s is longer than the %d training steps: the schedule never completes", name, value, total_steps)
    return steps


# Pure multipliers: step -> factor of the initial lr.

def warmup_ramp(step: int, warmup: int) -> float:
    """Linear warmup 0 -> 1 over ``warmup`` steps (transformers' form: step / warmup)."""
    return float(step) / float(max(1, warmup))


def constant(step: int) -> float:
    return 1.0


def constant_with_warmup(step: int, *, warmup: int) -> float:
    return warmup_ramp(step, warmup) if step < warmup else 1.0


def linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return warmup_ramp(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_ratio: float = 0.0) -> float:
    """Warmup, then ``num_cycles`` cosine waves (0.5 = a half cosine) from 1 down to ``min_ratio``."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, factor * (1.0 - min_ratio) + min_ratio)


def cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: float) -> float:
    """Warmup, then ``num_cycles`` half cosines 1 -> 0, each restarting at 1; 0 after the end."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def polynomial(step: int, *, warmup: int, total: int, power: float, end_ratio: float) -> float:
    """Warmup, then (1 − end)·(1 − progress)^power + end; ``end`` after the last step."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    if step > total:
        return end_ratio
    remaining = 1.0 - (step - warmup) / max(1, total - warmup)
    return (1.0 - end_ratio) * remaining**power + end_ratio


def inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    """Warmup, then 1 / sqrt((step − warmup + timescale) / timescale)."""
    if step < warmup:
        return warmup_ramp(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


_WARMUP_SHAPES: Mapping[str, Callable[[float], float]] = MappingProxyType({
    "linear": lambda p: p, "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(1.0 - p)})
_DECAY_SHAPES: Mapping[str, Callable[[float, float], float]] = MappingProxyType({
    "linear": lambda p, cycles: 1.0 - p, "cosine": lambda p, cycles: 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * p)),
    "1-sqrt": lambda p, cycles: 1.0 - math.sqrt(p)})


def warmup_stable_decay(
    step: int, *, warmup: int, stable: int, decay: int, min_ratio: float = 0.0,
    warmup_type: str = "linear", decay_type: str = "cosine", num_cycles: float = 0.5,
) -> float:
    """min_ratio -> 1 over ``warmup``, 1 for ``stable`` steps, 1 -> min_ratio over ``decay``, then min_ratio."""
    if step < warmup:
        factor = _WARMUP_SHAPES[warmup_type](float(step) / float(max(1, warmup)))
    elif step < warmup + stable:
        return 1.0
    elif step < warmup + stable + decay:
        factor = _DECAY_SHAPES[decay_type](float(step - warmup - stable) / float(max(1, decay)), float(num_cycles))
    else:
        return min_ratio
    return max(0.0, factor * (1.0 - min_ratio) + min_ratio)


def piecewise_constant(step: int, *, rules: tuple[tuple[int, float], ...], last: float) -> float:
    """``rules`` = ((until_step, factor), ...) ascending: factor while step < until_step, then ``last``."""
    for until, factor in rules:
        if step < until:
            return factor
    return last


def parse_step_rules(text: str) -> tuple[tuple[tuple[int, float], ...], float]:
    """diffusers' "1:10,0.1:20,0.01" -> (((10, 1.0), (20, 0.1)), 0.01): 1 until step 10, 0.1 until 20, then 0.01."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        rules: dict[int, float] = {}
        for part in parts[:-1]:
            factor, until = part.split(":")
            rules[int(until)] = float(factor)
        last = float(parts[-1])
    except ValueError:
        raise UserError(f"--lr_scheduler_args step_rules={text!r} is not like '1:10,0.1:20,0.01'") from None
    return tuple(sorted(rules.items())), last


# Factories: resolved settings -> the multiplier bound to them.

@dataclass(frozen=True)
class SchedulePlan:
    """Everything a factory needs: resolved step counts, flag values and the schedule's own args."""

    warmup: int
    decay: int
    total: int
    num_cycles: float
    power: float
    min_lr_ratio: float | None
    timescale: int | None
    base_lr: float | None
    options: Mapping[str, Any]


def _absolute_to_ratio(plan: SchedulePlan, key: str, value: float) -> float:
    if not plan.base_lr:
        raise UserError(f"--lr_scheduler_args {key}={value} needs a positive --learning_rate")
    return float(value) / plan.base_lr


def _make_polynomial(plan: SchedulePlan) -> Multiplier:
    if "lr_end" in plan.options:
        end_ratio = _absolute_to_ratio(plan, "lr_end", plan.options["lr_end"])
    elif plan.min_lr_ratio is not None:
        end_ratio = plan.min_lr_ratio
    else:
        end_ratio = _absolute_to_ratio(plan, "lr_end", 1e-7)
    if end_ratio >= 1.0:
        raise UserError(f"polynomial: the end lr ({end_ratio:g}·lr) must be below --learning_rate")
    return partial(polynomial, warmup=plan.warmup, total=plan.total, power=plan.power, end_ratio=end_ratio)


def _make_cosine_with_min_lr(plan: SchedulePlan) -> Multiplier:
    if ("min_lr" in plan.options) == (plan.min_lr_ratio is not None):
        raise UserError("--lr_scheduler cosine_with_min_lr needs one of --lr_scheduler_min_lr_ratio (e.g. 0.1) "
                        "or --lr_scheduler_args min_lr=<absolute lr>")
    min_ratio = _absolute_to_ratio(plan, "min_lr", plan.options["min_lr"]) if "min_lr" in plan.options else plan.min_lr_ratio
    return partial(cosine, warmup=plan.warmup, total=plan.total, num_cycles=plan.num_cycles / 2, min_ratio=min_ratio)


def _make_warmup_stable_decay(plan: SchedulePlan) -> Multiplier:
    stable = plan.total - plan.warmup - plan.decay
    if stable < 0:
        raise UserError(f"--lr_warmup_steps ({plan.warmup}) + --lr_decay_steps ({plan.decay}) exceed the "
                        f"{plan.total} training steps")
    if plan.decay == 0:
        logger.warning("warmup_stable_decay with --lr_decay_steps 0 never decays")
    kinds = {"warmup_type": str(plan.options.get("warmup_type", "linear")),
             "decay_type": str(plan.options.get("decay_type", "cosine"))}
    for (key, kind), shapes in zip(kinds.items(), (_WARMUP_SHAPES, _DECAY_SHAPES)):
        if kind not in shapes:
            raise UserError(f"--lr_scheduler_args {key}={kind!r}: choose one of {', '.join(shapes)}")
    return partial(warmup_stable_decay, warmup=plan.warmup, stable=stable, decay=plan.decay,
                   min_ratio=plan.min_lr_ratio or 0.0, num_cycles=plan.num_cycles / 2, **kinds)


def _make_piecewise_constant(plan: SchedulePlan) -> Multiplier:
    if "step_rules" not in plan.options:
        raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=1:10,0.1:20,0.01")
    rules, last = parse_step_rules(plan.options["step_rules"])
    return partial(piecewise_constant, rules=rules, last=last)


class ScheduleSpec(NamedTuple):
    make: Callable[[SchedulePlan], Multiplier]
    accepted: tuple[str, ...] = ()  # the --lr_scheduler_args keys it accepts
    warmup: bool = True  # uses --lr_warmup_steps
    decay: bool = False  # uses --lr_decay_steps


SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({
    "constant": ScheduleSpec(lambda p: constant, warmup=False),
    "constant_with_warmup": ScheduleSpec(lambda p: partial(constant_with_warmup, warmup=p.warmup)),
    "linear": ScheduleSpec(lambda p: partial(linear, warmup=p.warmup, total=p.total)),
    "cosine": ScheduleSpec(lambda p: partial(cosine, warmup=p.warmup, total=p.total,
                                             num_cycles=float(p.options.get("num_cycles", 0.5))), ("num_cycles",)),
    "cosine_with_restarts": ScheduleSpec(
        lambda p: partial(cosine_with_restarts, warmup=p.warmup, total=p.total, num_cycles=p.num_cycles)),
    "polynomial": ScheduleSpec(_make_polynomial, ("lr_end",)),
    "inverse_sqrt": ScheduleSpec(lambda p: partial(inverse_sqrt, warmup=p.warmup, timescale=int(
        p.options.get("timescale") or p.timescale or p.warmup or 10_000)), ("timescale",)),
    "cosine_with_min_lr": ScheduleSpec(_make_cosine_with_min_lr, ("min_lr",)),
    "warmup_stable_decay": ScheduleSpec(_make_warmup_stable_decay, ("warmup_type", "decay_type"), decay=True),
    "piecewise_constant": ScheduleSpec(_make_piecewise_constant, ("step_rules",), warmup=False),
})
ADAFACTOR = "adafactor"


SCHEDULER_NAMES = (*SCHEDULES, ADAFACTOR)


def _unknown(what: str, name: str, choices: Sequence[str]) -> UserError:
    """One line naming the nearest valid choice and listing all of them, nearest first."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    valid = ", ".join(sorted(choices, key=lambda c: -difflib.SequenceMatcher(None, name, c).ratio())) or "none"
    return UserError(f"unknown {what} {name!r}{hint}; valid: {valid}")


def _no_warmup(what: str, warmup: int) -> None:
    if warmup:
        raise UserError(f"{what} does not use --lr_warmup_steps ({warmup}); set it to 0 (or use constant_with_warmup)")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, *,
    num_processes: int = 1, gradient_accumulation_steps: int = 1,
) -> LRScheduler:
    """The lr scheduler for ``total_steps`` optimizer steps, stepped once per optimizer step (module notes)."""
    if total_steps < 1:
        raise UserError(f"the scheduler needs at least 1 training step, got {total_steps}")
    logger.debug("lr schedule over %d optimizer steps (not scaled by %d processes)", total_steps, num_processes)
    warmup = resolve_steps(cfg.warmup_steps, total_steps, "--lr_warmup_steps")
    decay = resolve_steps(cfg.decay_steps, total_steps, "--lr_decay_steps")
    if cfg.scheduler_type:
        _no_warmup(f"--lr_scheduler_type {cfg.scheduler_type}", warmup)
        return build_class_scheduler(optimizer, cfg.scheduler_type, dict(cfg.options))
    base, _, initial_lr = cfg.name.partition(":")
    if base == ADAFACTOR or _adafactor_relative_step(optimizer):
        if base != ADAFACTOR:
            logger.warning("Adafactor with relative_step=True sets its own lr: using the adafactor scheduler, "
                           "not %s", cfg.name)
            initial_lr = ""
        _no_warmup("--lr_scheduler adafactor", warmup)
        return build_adafactor_scheduler(optimizer, initial_lr)
    if cfg.name not in SCHEDULES:
        raise _unknown("--lr_scheduler", cfg.name, SCHEDULER_NAMES)
    spec = SCHEDULES[cfg.name]
    for key in cfg.options:
        if key not in spec.accepted:
            raise _unknown(f"--lr_scheduler_args key for {cfg.name}:", key, spec.accepted)
    if not spec.warmup:
        _no_warmup(f"--lr_scheduler {cfg.name}", warmup)
    if decay and not spec.decay:
        logger.warning("--lr_scheduler %s has no decay phase: --lr_decay_steps (%d) is ignored", cfg.name, decay)
    if cfg.min_lr_ratio is not None and not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise UserError(f"--lr_scheduler_min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    plan = SchedulePlan(warmup=warmup, decay=decay, total=total_steps, num_cycles=float(cfg.num_cycles),
                        power=float(cfg.power), min_lr_ratio=cfg.min_lr_ratio, timescale=cfg.timescale,
                        base_lr=optimizer.defaults.get("lr"), options=cfg.options)
    return LambdaLR(optimizer, spec.make(plan))


def _adafactor_relative_step(optimizer: torch.optim.Optimizer) -> bool | None:
    """None unless transformers' Adafactor (checked without importing it), else whether it sets its own lr."""
    if type(optimizer).__name__ != "Adafactor" or not type(optimizer).__module__.startswith("transformers"):
        return None
    return any(g.get("relative_step") for g in optimizer.param_groups)


def build_adafactor_scheduler(optimizer: torch.optim.Optimizer, initial_lr: str = "") -> LRScheduler:
    """transformers' AdafactorSchedule, reporting the lr Adafactor computes; ``initial_lr`` from "adafactor:1e-3"."""
    relative_step = _adafactor_relative_step(optimizer)
    if relative_step is None:
        raise UserError(f"--lr_scheduler adafactor needs --optimizer_type adafactor (transformers' Adafactor), "
                        f"not {type(optimizer).__name__}")
    if not relative_step:
        raise UserError("--lr_scheduler adafactor needs Adafactor with relative_step=True; with "
                        "relative_step=False use e.g. constant_with_warmup")
    try:
        start = float(initial_lr) if initial_lr else 0.0
    except ValueError:
        raise UserError(f"--lr_scheduler adafactor:{initial_lr}: the part after ':' must be the initial lr") from None
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(optimizer, start)


def build_class_scheduler(optimizer: torch.optim.Optimizer, type_name: str, kwargs: dict[str, Any]) -> LRScheduler:
    """``--lr_scheduler_type module.Class`` (a bare name means torch.optim.lr_scheduler) with checked kwargs."""
    module_name, _, class_name = type_name.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--lr_scheduler_type {type_name}: cannot import {module_name} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not callable(cls):
        classes = [n for n, v in vars(module).items() if isinstance(v, type) and hasattr(v, "step")]
        raise _unknown(f"--lr_scheduler_type class in {module_name}:", class_name, classes)
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature: pass the kwargs unchecked
        return cls(optimizer, **kwargs)
    params = signature.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in list(params)[1:]:
                raise _unknown(f"--lr_scheduler_args key for {type_name}:", key, list(params)[1:])
    try:
        signature.bind(optimizer, **kwargs)
    except TypeError as exc:
        raise UserError(f"--lr_scheduler_type {type_name}: {exc}") from None
    logger.info("lr scheduler %s(%s)", type_name, ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    return cls(optimizer, **kwargs)

"""Optimizers by sd-scripts ``--optimizer_type`` name or by ``package.module.Class`` path.

Names are case-insensitive (``AdamW8bit`` = ``adamw8bit``); a name containing a dot is imported as
``package.module.Class`` exactly as written (e.g. ``pytorch_optimizer.optimizer.adopt.ADOPT``,
``bitsandbytes.optim.AdEMAMix8bit``). Every import happens when the optimizer is built, so importing
this module loads neither bitsandbytes, pytorch_optimizer nor transformers.

Registry (:data:`OPTIMIZERS`; where two sources are listed the first importable one wins, so an
installed sd-scripts package gives sd-scripts' exact optimizer, and the pytorch_optimizer port keeps
the name working without it):

  adamw                          torch.optim.AdamW
  adamw8bit / pagedadamw8bit     bitsandbytes.optim.AdamW8bit / PagedAdamW8bit
  pagedadamw / pagedadamw32bit   bitsandbytes.optim.PagedAdamW / PagedAdamW32bit
  lion                           pytorch_optimizer Lion (sd-scripts uses lion_pytorch; same update rule)
  lion8bit / pagedlion8bit       bitsandbytes.optim.Lion8bit / PagedLion8bit
  sgdnesterov / sgdnesterov8bit  torch.optim.SGD / bitsandbytes.optim.SGD8bit, nesterov=True,
                                 momentum 0.9 unless given (as sd-scripts). SGD8bit accepts
                                 ``nesterov`` but ignores it: it is plain 8-bit momentum SGD,
                                 exactly as in sd-scripts
  adafactor                      transformers.optimization.Adafactor (see below)
  prodigy                        prodigyopt.Prodigy, else pytorch_optimizer Prodigy
  dadaptadam, dadaptadagrad, dadaptadan, dadaptlion, dadaptsgd
                                 dadaptation.<Class>, else the pytorch_optimizer port
  dadaptation / dadaptadampreprint, dadaptadanip
                                 dadaptation only (no port exists): "pip install dadaptation"
  adamwschedulefree, radamschedulefree, sgdschedulefree
                                 schedulefree.<Class>, else pytorch_optimizer ScheduleFree<Class>

On a CPU, bitsandbytes keeps 8-bit state only for tensors of >= 4096 elements (``min_8bit_size``)
and its paged optimizers fall back to ordinary (unpaged) buffers with a warning.

Adafactor follows sd-scripts: ``relative_step`` defaults to True; ``warmup_init=True`` forces it on.
With a relative step the optimizer computes its own step size, so it gets ``lr=None``, param-group
learning rates are dropped (with a warning), and the lr scheduler must be "adafactor"
(:func:`uses_relative_step` tells the scheduler code). With ``relative_step=False`` the given lr is
used; sd-scripts' hints (``--max_grad_norm 0``, ``clip_threshold=1.0``) are logged as warnings.

Schedule-free optimizers keep two weight sets: :func:`optimizer_train` / :func:`optimizer_eval` switch
them (no-ops for other optimizers); the loop calls eval before sampling and saving, train after.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch

from library.errors import UserError
from library.training.optimizer_args import check_optimizer_args, parse_optimizer_args, qualified_name

__all__ = [
    "OPTIMIZERS", "NAME_DEFAULTS", "build_optimizer", "resolve_optimizer_class", "parse_optimizer_args",
    "uses_relative_step", "is_schedule_free", "optimizer_train", "optimizer_eval",
]

logger = logging.getLogger(__name__)

_Source = tuple[str, str, str]  # (module, class name, pip package)


def _load_first(sources: tuple[_Source, ...]) -> type:
    """The first importable class of ``sources``; UserError with the pip hint of the first otherwise."""
    failures = []
    for module_name, class_name, _ in sources:
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            failures.append(" ".join(str(exc).split()))
    _, class_name, package = sources[0]
    raise UserError(f"optimizer {class_name} needs the {package} package (pip install {package}): "
                    f"{'; '.join(failures)}")


def _from(*sources: _Source) -> Callable[[], type]:
    return partial(_load_first, sources)


def _bnb(name: str) -> Callable[[], type]:
    return _from(("bitsandbytes.optim", name, "bitsandbytes"))


def _dadapt(name: str, port: bool = True) -> Callable[[], type]:
    experimental = name.endswith(("IP", "Preprint"))  # these two live in dadaptation.experimental
    original = ("dadaptation.experimental" if experimental else "dadaptation", name, "dadaptation")
    ported = (("pytorch_optimizer.optimizer.dadapt", name, "pytorch_optimizer"),) if port else ()
    return _from(original, *ported)


def _schedule_free(name: str) -> Callable[[], type]:
    ported = "ScheduleFree" + name.removesuffix("ScheduleFree")
    return _from(("schedulefree", name, "schedulefree"),
                 ("pytorch_optimizer.optimizer.schedulefree", ported, "pytorch_optimizer"))


OPTIMIZERS: Mapping[str, Callable[[], type]] = MappingProxyType({
    "adamw": _from(("torch.optim", "AdamW", "torch")),
    "adamw8bit": _bnb("AdamW8bit"),
    "pagedadamw": _bnb("PagedAdamW"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit"),
    "pagedadamw32bit": _bnb("PagedAdamW32bit"),
    "lion": _from(("pytorch_optimizer.optimizer.lion", "Lion", "pytorch_optimizer")),
    "lion8bit": _bnb("Lion8bit"),
    "pagedlion8bit": _bnb("PagedLion8bit"),
    "sgdnesterov": _from(("torch.optim", "SGD", "torch")),
    "sgdnesterov8bit": _bnb("SGD8bit"),
    "adafactor": _from(("transformers.optimization", "Adafactor", "transformers")),
    "prodigy": _from(("prodigyopt", "Prodigy", "prodigyopt"),
                     ("pytorch_optimizer.optimizer.prodigy", "Prodigy", "pytorch_optimizer")),
    "dadaptation": _dadapt("DAdaptAdamPreprint", port=False),
    "dadaptadampreprint": _dadapt("DAdaptAdamPreprint", port=False),
    "dadaptadagrad": _dadapt("DAdaptAdaGrad"),
    "dadaptadam": _dadapt("DAdaptAdam"),
    "dadaptadan": _dadapt("DAdaptAdan"),
    "dadaptadanip": _dadapt("DAdaptAdanIP", port=False),
    "dadaptlion": _dadapt("DAdaptLion"),
    "dadaptsgd": _dadapt("DAdaptSGD"),
    "adamwschedulefree": _schedule_free("AdamWScheduleFree"),
    "radamschedulefree": _schedule_free("RAdamScheduleFree"),
    "sgdschedulefree": _schedule_free("SGDScheduleFree"),
})
"""Lower-case ``--optimizer_type`` name -> loader returning the optimizer class."""

_NESTEROV = MappingProxyType({"nesterov": True, "momentum": 0.9})
NAME_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "sgdnesterov": _NESTEROV,
    "sgdnesterov8bit": _NESTEROV,
})
"""Keyword defaults a registry name implies (``--optimizer_args`` override them)."""


def resolve_optimizer_class(name: str) -> type:
    """The optimizer class for a registry name (any case) or a ``package.module.Class`` path."""
    if "." in name:
        cls = _import_dotted(name)
    else:
        loader = OPTIMIZERS.get(name.lower())
        if loader is None:
            near = difflib.get_close_matches(name.lower(), list(OPTIMIZERS), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise UserError(
                f"--optimizer_type: unknown optimizer {name!r}{hint}; choose one of {', '.join(OPTIMIZERS)}, "
                "or give a class path such as pytorch_optimizer.optimizer.adopt.ADOPT"
            )
        cls = loader()
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"--optimizer_type {name}: {cls!r} is not a torch.optim.Optimizer class")
    return cls


def _import_dotted(path: str) -> Any:
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise UserError(f"--optimizer_type {path!r}: expected package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--optimizer_type {path}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise UserError(f"--optimizer_type {path}: module {module_name!r} has no {class_name!r}") from exc


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the optimizer constructor will receive."""

    lr: float | None
    kwargs: Mapping[str, Any]
    groups: list[Any]


def _without_group_lrs(groups: list[Any]) -> list[Any]:
    """Copies of dict param groups without ``lr`` (the caller's dicts stay untouched)."""
    if any(isinstance(g, dict) and "lr" in g for g in groups):
        logger.warning("Adafactor with relative_step=True ignores per-group learning rates (unet/text encoder lr)")
    return [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in groups]


def _adjust_adafactor(call: _Call, max_grad_norm: float | None) -> _Call:
    """sd-scripts' Adafactor rules (see the module docstring)."""
    kwargs = dict(call.kwargs)
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting it")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if call.lr:
            logger.warning("Adafactor relative_step=True sets its own step size: learning rate %g is only "
                           "the initial lr of the adafactor scheduler", call.lr)
        return _Call(lr=None, kwargs=kwargs, groups=_without_group_lrs(call.groups))
    if max_grad_norm:
        logger.warning("Adafactor: --max_grad_norm %g enables gradient clipping; consider --max_grad_norm 0",
                       max_grad_norm)
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        logger.warning("Adafactor: clip_threshold=1.0 is recommended")
    return _Call(lr=call.lr, kwargs=kwargs, groups=call.groups)


_CLASS_ADJUSTMENTS: Mapping[str, Callable[[_Call, float | None], _Call]] = MappingProxyType({
    "transformers.optimization.Adafactor": _adjust_adafactor,
})


def _first_lr(call: _Call) -> float | None:
    first = call.groups[0] if call.groups else None
    return first.get("lr", call.lr) if isinstance(first, dict) else call.lr


def _warn_about_lr(cls: type, call: _Call) -> None:
    """sd-scripts' learning-rate sanity warnings for adaptive (D-Adaptation, Prodigy) and Lion optimizers."""
    lr = _first_lr(call)
    if lr is None:
        return
    name = cls.__name__
    if name.startswith(("DAdapt", "Prodigy")):
        if lr <= 0.1:
            logger.warning("%s: learning rate %g is too low; %s adapts the step size, use about 1.0", name, lr, name)
    elif "Lion" in name and lr > 3e-4:
        logger.warning("%s: learning rate %g is high for Lion; use 3-10x less than for AdamW", name, lr)


def build_optimizer(
    name: str,
    param_groups: Iterable[Any],
    lr: float,
    args: Mapping[str, Any],
    *,
    max_grad_norm: float | None = None,
) -> torch.optim.Optimizer:
    """Build ``name`` (registry name or class path) over ``param_groups`` with checked ``args``.

    ``param_groups`` is what torch optimizers take (tensors or dicts); ``args`` are parsed
    ``--optimizer_args``. A schedule-free optimizer is returned in train mode.
    """
    cls = resolve_optimizer_class(name)
    kwargs = {**NAME_DEFAULTS.get(name.lower(), {}), **check_optimizer_args(cls, args)}
    if name.lower() in NAME_DEFAULTS and "momentum" not in args:
        logger.info("%s: SGD with Nesterov needs momentum; using momentum=0.9", name)
    call = _Call(lr=lr, kwargs=kwargs, groups=list(param_groups))
    adjust = _CLASS_ADJUSTMENTS.get(qualified_name(cls))
    if adjust is not None:
        call = adjust(call, max_grad_norm)
    _warn_about_lr(cls, call)
    try:
        optimizer = cls(call.groups, lr=call.lr, **call.kwargs)
    except (TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"--optimizer_type {name}: {cls.__name__} rejected its settings: {detail}") from exc
    logger.info("optimizer %s (%s), lr %s, args %s", cls.__name__, qualified_name(cls), call.lr, dict(call.kwargs))
    optimizer_train(optimizer)
    return optimizer


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for an Adafactor that computes its own step size (it needs the "adafactor" lr scheduler)."""
    return bool(optimizer.defaults.get("relative_step", False))


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has schedule-free ``train()``/``eval()`` weight switching."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def optimizer_train(optimizer: torch.optim.Optimizer) -> None:
    """Put a schedule-free optimizer's parameters in training mode; no-op for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.train()


def optimizer_eval(optimizer: torch.optim.Optimizer) -> None:
    """Switch a schedule-free optimizer's parameters to the averaged (evaluation) weights; else no-op."""
    if is_schedule_free(optimizer):
        optimizer.eval()

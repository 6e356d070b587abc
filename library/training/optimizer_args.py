"""``--optimizer_args`` parsing and checking against what the optimizer class really accepts.

Syntax (sd-scripts): each item is ``key=value``; the value goes through ``ast.literal_eval``
(``betas=(0.9,0.99)`` and ``betas=0.9,0.99`` both give a tuple, ``eps=1e-8`` a float). Two
departures, both because sd-scripts crashes on them with a traceback:
  * ``true`` / ``false`` in any letter case are the booleans (the string ``"false"`` would be
    truthy, silently turning an option on);
  * any other value that is not a Python literal stays a plain string (``mode=cosine``).
An item without ``=``, with an empty key or value, a key that is not an identifier, or a key given
twice is a :class:`UserError`.

Checking: a key must be a named parameter of the class's ``__init__``. pytorch_optimizer classes
take ``**kwargs`` and silently drop what they do not read, so for a class with ``**kwargs`` the
only extra names allowed are
  * the documented extras in :data:`EXTRA_KWARGS` (``cautious`` for ADOPT, ...), and
  * the names its own source reads from ``kwargs``/the param group (``kwargs.get('use_palm')``,
    ``group.get('cautious')``), minus those it writes itself (internal state such as ``lr_max``).
Everything else fails naming the key and the nearest accepted name. :data:`KWARG_ALIASES` maps the
spellings of the packages sd-scripts uses (prodigyopt, dadaptation: ``decouple``,
``use_bias_correction``) onto pytorch_optimizer's, for when the pytorch_optimizer port is the one
installed, so pasted command lines keep working.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import re
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

_PO = "pytorch_optimizer.optimizer"

EXTRA_KWARGS: Mapping[str, frozenset[str]] = MappingProxyType({
    f"{_PO}.adopt.ADOPT": frozenset({"cautious", "stable_adamw"}),
    f"{_PO}.lion.Lion": frozenset({"cautious", "use_gc", "adanorm", "adanorm_r"}),
    f"{_PO}.schedulefree.ScheduleFreeAdamW": frozenset({"use_palm"}),
    f"{_PO}.schedulefree.ScheduleFreeRAdam": frozenset({"use_palm"}),
})
"""Keywords a class reads through ``**kwargs`` (qualified class name -> names), beyond its signature."""

_PRODIGY_SPELLING = MappingProxyType({"decouple": "weight_decouple", "use_bias_correction": "bias_correction"})

KWARG_ALIASES: Mapping[str, Mapping[str, str]] = MappingProxyType({
    f"{_PO}.prodigy.Prodigy": _PRODIGY_SPELLING,
    f"{_PO}.dadapt.DAdaptAdam": _PRODIGY_SPELLING,
})
"""Per class: the original package's keyword -> this class's keyword (used when the port is loaded)."""

_NOT_OPTIONS = frozenset({"self", "params", "defaults", "lr"})  # lr comes from --learning_rate
_READ_PATTERNS = (
    re.compile(r"\b(?:kwargs|group|param_group)\.(?:get|pop)\(\s*['\"](\w+)['\"]"),
    re.compile(r"\bkwargs\[\s*['\"](\w+)['\"]\s*\]"),
)
_WRITE_PATTERN = re.compile(r"\b(?:group|param_group)\[\s*['\"](\w+)['\"]\s*\]\s*=(?!=)")
_FLAG = "--optimizer_args"


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, the key of :data:`EXTRA_KWARGS` and :data:`KWARG_ALIASES`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def parse_optimizer_args(items: Sequence[str]) -> dict[str, Any]:
    """Parse sd-scripts ``key=value`` items into keyword arguments (see the module docstring)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise UserError(f"{_FLAG}: {item!r} is not key=value (e.g. \"weight_decay=0.01\")")
        if not key.isidentifier():
            raise UserError(f"{_FLAG}: {key!r} in {item!r} is not a valid keyword name")
        if key in parsed:
            raise UserError(f"{_FLAG}: {key!r} is given twice")
        parsed[key] = parse_value(text)
    return parsed


def parse_value(text: str) -> Any:
    """A Python literal; ``true``/``false`` in any case as booleans; anything else the plain string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _init_parameters(cls: type) -> tuple[frozenset[str], bool]:
    """Named keyword parameters of ``cls.__init__`` and whether it also takes ``**kwargs``."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    named = frozenset(
        p.name for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _NOT_OPTIONS
    )
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


def kwargs_read_by_source(cls: type) -> frozenset[str]:
    """Names the class's own code (and its non-torch bases') reads from ``kwargs`` or a param group."""
    read: set[str] = set()
    written: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in ("torch", "builtins", "abc", "typing"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for pattern in _READ_PATTERNS:
            read.update(pattern.findall(source))
        written.update(_WRITE_PATTERN.findall(source))
    return frozenset(read - written - _NOT_OPTIONS)


def accepted_kwargs(cls: type) -> frozenset[str]:
    """Every keyword ``cls`` accepts: its signature, plus, for ``**kwargs`` classes, the extras it uses."""
    named, takes_var_kwargs = _init_parameters(cls)
    accepted = named | EXTRA_KWARGS.get(qualified_name(cls), frozenset())
    if takes_var_kwargs:
        accepted |= kwargs_read_by_source(cls)
    return accepted | frozenset(KWARG_ALIASES.get(qualified_name(cls), {}))


def _rejection(cls: type, key: str, accepted: frozenset[str]) -> UserError:
    near = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
    if near:
        return UserError(f"{_FLAG}: {cls.__name__} does not accept {key!r} (did you mean {near[0]!r}?)")
    return UserError(f"{_FLAG}: {cls.__name__} does not accept {key!r} (it accepts: {', '.join(sorted(accepted))})")


def check_optimizer_args(cls: type, args: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``args`` with aliases renamed; raise :class:`UserError` naming the first unknown key."""
    if "lr" in args:
        raise UserError(f"{_FLAG}: set the learning rate with --learning_rate, not lr=")
    if "params" in args:
        raise UserError(f"{_FLAG}: 'params' is not an option; the trained parameters are passed for you")
    accepted = accepted_kwargs(cls)
    for key in args:
        if key not in accepted:
            raise _rejection(cls, key, accepted)
    aliases = KWARG_ALIASES.get(qualified_name(cls), {})
    checked: dict[str, Any] = {}
    for key, value in dict(args).items():
        target = aliases.get(key, key)
        if target != key:
            if target in args:
                raise UserError(f"{_FLAG}: give {key!r} or {target!r} to {cls.__name__}, not both")
            logger.info("%s: %s=%r is passed as %s=%r", cls.__name__, key, value, target, value)
        checked[target] = value
    return checked

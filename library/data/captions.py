"""The caption pipeline: raw caption file text -> the prompt a training step encodes.

Every step is a small pure function that takes the text, the options it reads and an explicit
``random.Random``; :func:`process_caption` composes them. Options are :class:`CaptionOptions`
(sd-scripts' subset keys of the same names).

Order of operations in :func:`process_caption` (random draws happen in this order, and only for the
steps that are switched on, so one seeded ``Random`` gives one reproducible caption):

1. Whole-caption dropout. ``caption_dropout_every_n_epochs = n > 0`` drops every caption in epochs
   n, 2n, 3n, ... (``epoch`` is 1-based, sd-scripts' ``current_epoch``; ``epoch <= 0`` never drops);
   otherwise, with ``caption_dropout_rate > 0``, one ``rng.random() < rate`` draw. A dropped caption
   is ``""`` (callers use the cached empty-prompt embedding).
2. Line choice. ``enable_wildcard``: one non-empty line, uniformly (one draw if there are several);
   otherwise the first non-empty line (sd-scripts takes the first line). Blank lines never count.
3. Prefix and suffix, in sd-scripts' place: ``prefix + " " + line + " " + suffix`` (each stripped;
   no space before a suffix that starts with ``,.;:!?``). So, as in sd-scripts, prefix tags count
   in ``keep_tokens`` and suffix tags take part in shuffling unless a ``keep_tokens_separator``
   protects them. (sd-scripts attaches them before the line choice, so a multi-line file keeps the
   prefix on its first line only; here every chosen line gets them.)
4. Wildcards (``enable_wildcard`` only), over the whole caption: ``{a|b|c}`` -> one option,
   uniformly; ``{abc}`` -> ``abc``; ``{{`` and ``}}`` are literal ``{`` and ``}`` (sd-scripts' rules).
   Groups resolve innermost first and repeat, so ``{x {a|b}|y}`` nests; but ``}}`` is always the
   escape, so write a nested group's closing braces apart (``{x|{a|b} }``). ``{}`` and unmatched
   braces stay as literal text.
5. Tag pass, when ``shuffle_caption``, ``caption_tag_dropout_rate > 0`` or ``token_warmup_step > 0``,
   or when ``keep_tokens_separator`` occurs in the caption (so the separator never reaches a text
   encoder; sd-scripts leaves it in when nothing is shuffled). ``keep_tokens`` alone moves nothing
   and so triggers nothing.
   a. Split. With ``keep_tokens_separator`` (e.g. ``|||``) in the caption: head = text before the
      first separator, flexible = text up to the second, tail = the rest (any further separators in
      the tail are dropped). Otherwise head = the first ``keep_tokens`` tags. Each part is split on
      ``caption_separator``; tags are stripped and empty tags removed.
   b. Token warm-up on the flexible tags (fixed parts always stay): with W = ``token_warmup_step``
      (W < 1 means floor(W * max_steps)) and step < W, keep the first
      floor(step * (n - token_warmup_min) / W) + token_warmup_min of the n flexible tags, in caption
      order (sd-scripts' formula; clamped to 0..n).
   c. ``shuffle_caption`` shuffles the flexible tags, then ``caption_tag_dropout_rate`` drops each one
      independently (kept iff ``rng.random() >= rate``), as sd-scripts does.
   d. Join head + flexible + tail with the joiner (below).
6. ``secondary_separator`` (e.g. ``;;;``): it kept its tags together as one unit in step 5 (it is not
   the split separator); now every occurrence, in the whole caption, becomes the joiner, with the
   whitespace around it stripped.

Joiner: ``caption_separator`` stripped, plus one space (``","`` -> ``", "``); a separator that is
only whitespace joins as itself. sd-scripts always joins with ``", "``; keeping the caption's own
separator matters only for other separators (``"."`` joins sentences with ``". "``).

Whitespace: a caption that no step touches comes back as its first non-empty line, stripped at both
ends; inner whitespace is unchanged. After a tag pass every tag is stripped and empty tags are gone.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

from library.data.spec import CaptionOptions

_WILDCARD = re.compile(r"\{([^{}]+)\}")
_HUGGING_PUNCTUATION = (",", ".", ";", ":", "!", "?")
_ESCAPE_CANDIDATES = range(0xE000, 0xF8FF)  # Unicode private use area, for escaped-brace stand-ins


def check_caption_options(options: CaptionOptions) -> None:
    """Raise ``ValueError`` for option values no caption could be processed with."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        rate = getattr(options, name)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step"):
        if getattr(options, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(options, name)}")
    if not options.caption_separator:
        raise ValueError("caption_separator must not be empty")


def joiner(separator: str) -> str:
    """The string tags are joined with: ``","`` -> ``", "``; whitespace-only separators as they are."""
    core = separator.strip()
    return f"{core} " if core else separator


def is_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whole-caption dropout: every n-th (1-based) epoch, else one draw against the rate."""
    every = options.caption_dropout_every_n_epochs
    if every > 0 and epoch > 0 and epoch % every == 0:
        return True
    return options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate


def choose_line(raw: str, rng: random.Random | None) -> str:
    """One non-empty stripped line: uniformly drawn with ``rng``, the first one without."""
    lines = [line.strip() for line in raw.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    if rng is None or len(lines) == 1:
        return lines[0]
    return lines[rng.randrange(len(lines))]


def _stand_ins(text: str) -> tuple[str, str]:
    """Two characters absent from ``text``, to stand in for escaped braces."""
    free = (chr(c) for c in _ESCAPE_CANDIDATES if chr(c) not in text)
    return next(free), next(free)


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each ``{a|b|...}`` by one option (uniform); ``{{``/``}}`` are literal braces."""
    if "{" not in text:
        return text
    open_, close = _stand_ins(text)
    work = text.replace("{{", open_).replace("}}", close)

    def pick(match: re.Match[str]) -> str:
        options = match.group(1).split("|")
        return options[rng.randrange(len(options))]

    while True:
        expanded = _WILDCARD.sub(pick, work)
        if expanded == work:
            break
        work = expanded
    return work.replace(open_, "{").replace(close, "}")


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of ``text``: split on ``separator``, stripped, empty ones removed."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def partition_tags(text: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible tags, fixed tail) by ``keep_tokens_separator`` or else ``keep_tokens``."""
    sep, keep_sep = options.caption_separator, options.keep_tokens_separator
    if keep_sep and keep_sep in text:
        head, _, rest = text.partition(keep_sep)
        flexible, _, tail = rest.partition(keep_sep)
        tail_tags = [tag for piece in tail.split(keep_sep) for tag in split_tags(piece, sep)]
        return split_tags(head, sep), split_tags(flexible, sep), tail_tags
    tags = split_tags(text, sep)
    keep = options.keep_tokens
    return tags[:keep], tags[keep:], []


def warmup_steps(options: CaptionOptions, max_steps: int | None) -> int:
    """Length of the token warm-up in steps (0: none); a value below 1 is a fraction of max_steps."""
    value = options.token_warmup_step
    if value <= 0:
        return 0
    if value < 1:
        if max_steps is None:
            raise ValueError("token_warmup_step < 1 is a fraction of the run and needs max_steps")
        return math.floor(value * max_steps)
    return math.floor(value)


def warmup_tag_count(n_tags: int, options: CaptionOptions, step: int, max_steps: int | None) -> int:
    """How many of ``n_tags`` flexible tags token warm-up keeps at ``step`` (sd-scripts' formula)."""
    total = warmup_steps(options, max_steps)
    if total <= 0 or step >= total:
        return n_tags
    minimum = options.token_warmup_min
    count = math.floor(step * (n_tags - minimum) / total) + minimum
    return max(0, min(n_tags, count))


def shuffle_tags(tags: list[str], rng: random.Random) -> list[str]:
    """A shuffled copy of ``tags``."""
    shuffled = list(tags)
    rng.shuffle(shuffled)
    return shuffled


def drop_tags(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    """Each tag kept independently iff ``rng.random() >= rate`` (no draws when ``rate <= 0``)."""
    if rate <= 0:
        return list(tags)
    return [tag for tag in tags if rng.random() >= rate]


def needs_tag_pass(text: str, options: CaptionOptions) -> bool:
    """Whether step 4 (split, warm-up, shuffle, tag dropout, re-join) applies to ``text``."""
    return (
        options.shuffle_caption
        or options.caption_tag_dropout_rate > 0
        or options.token_warmup_step > 0
        or bool(options.keep_tokens_separator and options.keep_tokens_separator in text)
    )


def process_tags(
    text: str, options: CaptionOptions, rng: random.Random, *, step: int = 0, max_steps: int | None = None
) -> str:
    """Step 4: split into fixed/flexible tags, warm up, shuffle, drop, and join."""
    head, flexible, tail = partition_tags(text, options)
    flexible = flexible[: warmup_tag_count(len(flexible), options, step, max_steps)]
    if options.shuffle_caption:
        flexible = shuffle_tags(flexible, rng)
    flexible = drop_tags(flexible, options.caption_tag_dropout_rate, rng)
    return joiner(options.caption_separator).join(head + flexible + tail)


def attach_prefix_suffix(text: str, prefix: str | None, suffix: str | None) -> str:
    """``prefix + " " + text + " " + suffix``, each stripped; empty parts and their spaces omitted.

    A suffix that starts with trailing punctuation (``", absurdres"``) gets no space before it.
    """
    caption = " ".join(part for part in (prefix.strip() if prefix else "", text) if part)
    tail = suffix.strip() if suffix else ""
    if not tail:
        return caption
    if not caption:
        return tail
    return f"{caption}{tail}" if tail.startswith(_HUGGING_PUNCTUATION) else f"{caption} {tail}"


def replace_secondary(text: str, secondary: str | None, separator: str) -> str:
    """Every ``secondary`` separator becomes the joiner of ``separator`` (whitespace around it stripped)."""
    if not secondary or secondary not in text:
        return text
    pieces = [piece.strip() for piece in text.split(secondary)]
    return joiner(separator).join(piece for piece in pieces if piece)


def process_caption(
    raw: str,
    options: CaptionOptions,
    rng: random.Random,
    *,
    epoch: int = 0,
    step: int = 0,
    max_steps: int | None = None,
    is_reg: bool = False,
) -> str:
    """The caption one training step sees (order in the module docstring); ``""`` when dropped.

    ``epoch`` is 1-based (0: outside any epoch, never dropped by ``caption_dropout_every_n_epochs``);
    ``step`` is the global step for token warm-up; ``max_steps`` is needed when
    ``token_warmup_step < 1``. ``is_reg`` is accepted for the dataset's convenience and changes
    nothing: regularisation subsets go through the same pipeline with their own options, as in
    sd-scripts.
    """
    del is_reg
    check_caption_options(options)
    if is_dropped(options, rng, epoch):
        return ""
    wild = options.enable_wildcard
    line = choose_line(raw, rng if wild else None)
    caption = attach_prefix_suffix(line, options.caption_prefix, options.caption_suffix)
    if wild:
        caption = expand_wildcards(caption, rng)
    if needs_tag_pass(caption, options):
        caption = process_tags(caption, options, rng, step=step, max_steps=max_steps)
    return replace_secondary(caption, options.secondary_separator, options.caption_separator)


def needs_variants(options: CaptionOptions) -> bool:
    """Whether captions vary between steps (shuffle, tag dropout, wildcards or token warm-up).

    Whole-caption dropout does not count: it is applied at training time, not baked into variants.
    Token warm-up counts although :func:`caption_variants` cannot represent it (variants are the
    post-warm-up captions); a caller caching encoder outputs should treat it as "not cacheable".
    """
    return bool(
        options.shuffle_caption
        or options.caption_tag_dropout_rate > 0
        or options.enable_wildcard
        or options.token_warmup_step > 0
    )


def caption_variants(
    raw: str, options: CaptionOptions, k: int, seed: int, *, is_reg: bool = False
) -> list[str]:
    """Up to ``k`` distinct captions for caching, deterministic for ``seed``, in order of first draw.

    Each is :func:`process_caption` with whole-caption dropout and token warm-up off, drawn from one
    ``random.Random(seed)``. Drawing stops after ``k`` distinct captions or ``8·k + 16`` tries, so a
    caption with fewer distinct outcomes (or rare ones) yields fewer than ``k``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    plain = dataclasses.replace(
        options, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0, token_warmup_step=0.0
    )
    rng = random.Random(seed)
    tries = 1 if not needs_variants(plain) else 8 * k + 16
    found: dict[str, None] = {}
    for _ in range(tries):
        found.setdefault(process_caption(raw, plain, rng, is_reg=is_reg), None)
        if len(found) == k:
            break
    return list(found)

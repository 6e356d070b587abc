"""Kohaku-style captions from Danbooru post metadata (pure functions; ``tools/build_captions.py`` does the I/O).

Caption order (Kohaku XL ε / the SD3.5-M anime card)::

    <1girl/1boy/1other/...>, <character>, <series>, <artists>, <general tags>, <quality>, <date>, <meta>, <rating>

- Quality: the post's fav_count (or score) against percentile thresholds computed *within its rating*
  (so nsfw posts, which collect more favourites, are not all "masterpiece"). Kohaku XL Δ's thresholds
  are the 95th, 85th, 75th, 50th, 25th and 10th percentiles, giving masterpiece > best quality > great
  quality > good quality > normal quality > low quality > worst quality (Kohaku XL ε lowered them to
  90/75/60/45/30/10). A post gets the first tag whose threshold its value is strictly above; posts at
  or below the last threshold are "worst quality". Percentiles interpolate linearly between order
  statistics (numpy's default).
- Rating: general -> safe, sensitive -> sensitive, questionable -> nsfw, explicit -> "nsfw, explicit".
  Danbooru's letters g/s/q/e are accepted (``s`` is *sensitive*, as on Danbooru since 2022).
- Date by upload year: <= 2010 old, 2011-2014 early, 2015-2017 mid, 2018-2020 recent, 2021+ newest.
- Tags: underscores become spaces except in tags of at most 3 characters (emoticons such as ``^_^``);
  parentheses are escaped (``ask \\(askzy\\)``) on request, for prompt parsers that read them as emphasis.
- Exclusion tags (the anime card's list): a post carrying one is skipped (or, with ``exclude_action
  = "drop"``, only the tag is removed). Tags compare case-insensitively with ``_`` and `` `` equal.
- ``keep_separator`` (e.g. ``|||``, the trainer's ``--keep_tokens_separator``) goes before and after the
  general tags, so caption shuffling moves only the general tags and the special tags stay at the end.
"""

from __future__ import annotations

import bisect
import csv
import datetime
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

QUALITY_TAGS = ("masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality",
                "worst quality")
DELTA_PERCENTILES = (95.0, 85.0, 75.0, 50.0, 25.0, 10.0)  # Kohaku XL Δ
EPSILON_PERCENTILES = (90.0, 75.0, 60.0, 45.0, 30.0, 10.0)  # Kohaku XL ε
RATINGS = ("general", "sensitive", "questionable", "explicit")
RATING_TAGS = MappingProxyType({"general": ("safe",), "sensitive": ("sensitive",), "questionable": ("nsfw",),
                                "explicit": ("nsfw", "explicit")})
_RATING_ALIASES = MappingProxyType({"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit",
                                    "safe": "general"})
DATE_TAGS = ((2010, "old"), (2014, "early"), (2017, "mid"), (2020, "recent"))  # (last year, tag); later: newest
NEWEST = "newest"
EXCLUDE_TAGS = ("traditional_media", "photo_(medium)", "scan", "animated", "animated_gif", "lowres",
                "non-web_source", "variant_set", "tall image", "duplicate", "pixel-perfect_duplicate")
CATEGORIES = ("general", "character", "copyright", "artist", "meta")
SECTIONS = ("people", "character", "copyright", "artist", "general", "quality", "date", "meta", "rating")
_PEOPLE = re.compile(r"^(\d+\+?(girl|boy|other)s?|multiple_(girls|boys|others))$")
_IMAGE_FIELDS = ("file_name", "filename", "image", "image_path", "image_key")
_ID_FIELDS = ("id", "post_id")


@dataclass(frozen=True)
class Post:
    """One Danbooru post, normalised: tags per category (raw Danbooru spelling), rating name, values."""

    key: str  # what the post is called in messages (its id, else its image name)
    tags: Mapping[str, tuple[str, ...]]
    rating: str | None  # one of RATINGS, None when missing or unknown
    fav_count: float | None = None
    score: float | None = None
    year: int | None = None
    names: tuple[str, ...] = ()  # candidate image stems / file names: image field, id, md5


@dataclass(frozen=True)
class CaptionSettings:
    escape_parentheses: bool = False
    keep_separator: str | None = None  # e.g. "|||": around the general tags
    exclude_tags: frozenset[str] = field(default_factory=lambda: frozenset(tag_key(t) for t in EXCLUDE_TAGS))
    exclude_action: str = "skip"  # "skip" the post, or "drop" the tag
    year_tag: bool = False  # also "year 2021" after the date tag


# --- tags


def tag_key(tag: str) -> str:
    """Comparison key of a tag: lower case, spaces as underscores."""
    return tag.strip().lower().replace(" ", "_")


def normalize_tag(tag: str, escape_parentheses: bool = False) -> str:
    """Danbooru spelling -> caption spelling (underscore rule, optional parenthesis escapes)."""
    tag = tag.strip()
    if len(tag) > 3:
        tag = tag.replace("_", " ")
    if escape_parentheses:
        tag = tag.replace("(", r"\(").replace(")", r"\)")
    return tag


def is_people_tag(tag: str) -> bool:
    """1girl, 2boys, 6+others, multiple_girls, ... (the caption's first group)."""
    return bool(_PEOPLE.match(tag_key(tag)))


def rating_name(value: Any) -> str | None:
    """Danbooru rating (word or letter) -> one of RATINGS; None when missing or unknown."""
    text = str(value or "").strip().lower()
    text = _RATING_ALIASES.get(text, text)
    return text if text in RATINGS else None


def rating_tags(rating: str) -> tuple[str, ...]:
    return RATING_TAGS[rating]


def date_tag(year: int) -> str:
    """old (<= 2010), early (2011-14), mid (2015-17), recent (2018-20), newest (2021+)."""
    for last, tag in DATE_TAGS:
        if year <= last:
            return tag
    return NEWEST


def upload_year(value: Any) -> int | None:
    """The year of Danbooru's ``created_at``: an ISO date text or a Unix timestamp; None if unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(float(value), tz=datetime.timezone.utc).year
    match = re.match(r"\s*(\d{4})-\d{2}", str(value))
    if match:
        return int(match.group(1))
    try:
        return upload_year(float(str(value)))
    except (ValueError, OverflowError, OSError):
        return None


# --- quality


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    """Six strictly decreasing percentiles in (0, 100), one per boundary between the seven quality tags."""
    values = tuple(float(p) for p in percentiles)
    if len(values) != len(QUALITY_TAGS) - 1:
        raise ValueError(f"need {len(QUALITY_TAGS) - 1} percentiles (one per quality boundary), got {len(values)}")
    if any(not 0 < p < 100 for p in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"percentiles must decrease strictly within (0, 100), got {', '.join(map(str, values))}")
    return values


def quality_thresholds(posts: Iterable[Post], percentiles: Sequence[float] = DELTA_PERCENTILES,
                       by: str = "fav_count") -> dict[str, tuple[float, ...]]:
    """Per rating, the value at each percentile, over the posts of that rating that have the value."""
    percentiles = check_percentiles(percentiles)
    groups: dict[str, list[float]] = {}
    for post in posts:
        value = getattr(post, by)
        if post.rating is not None and value is not None:
            groups.setdefault(post.rating, []).append(float(value))
    return {rating: tuple(percentile(values, p) for p in percentiles) for rating, values in sorted(groups.items())}


def quality_tag(value: float, thresholds: Sequence[float]) -> str:
    """The first quality tag whose threshold ``value`` is strictly above (thresholds decreasing)."""
    ascending = list(reversed(thresholds))
    above = bisect.bisect_left(ascending, value)  # how many thresholds lie strictly below value
    return QUALITY_TAGS[len(thresholds) - above]


def post_quality(post: Post, thresholds: Mapping[str, Sequence[float]], by: str = "fav_count") -> str | None:
    value = getattr(post, by)
    if value is None or post.rating not in thresholds:
        return None
    return quality_tag(float(value), thresholds[post.rating])


# --- captions


def excluded_tags(post: Post, settings: CaptionSettings) -> list[str]:
    """The post's tags on the exclusion list (in category order)."""
    return [t for c in CATEGORIES for t in post.tags.get(c, ()) if tag_key(t) in settings.exclude_tags]


def caption_sections(post: Post, quality: str | None, settings: CaptionSettings) -> dict[str, list[str]]:
    """The caption's tags by section (SECTIONS order), normalised; excluded tags left out."""
    tags = {c: [t for t in post.tags.get(c, ()) if tag_key(t) not in settings.exclude_tags] for c in CATEGORIES}
    people = [t for t in tags["general"] if is_people_tag(t)]
    sections: dict[str, list[str]] = {
        "people": people,
        "character": tags["character"],
        "copyright": tags["copyright"],
        "artist": tags["artist"],
        "general": [t for t in tags["general"] if not is_people_tag(t)],
        "quality": [quality] if quality else [],
        "date": ([date_tag(post.year)] + ([f"year {post.year}"] if settings.year_tag else [])) if post.year else [],
        "meta": tags["meta"],
        "rating": list(rating_tags(post.rating)) if post.rating else [],
    }
    special = {"quality", "date", "rating"}
    return {name: [t if name in special else normalize_tag(t, settings.escape_parentheses) for t in values]
            for name, values in sections.items()}


def join_caption(sections: Mapping[str, Sequence[str]], keep_separator: str | None = None) -> str:
    """Sections joined with ", "; with ``keep_separator``: head ||| general ||| tail (always both)."""
    head = [t for s in ("people", "character", "copyright", "artist") for t in sections.get(s, ())]
    tail = [t for s in ("quality", "date", "meta", "rating") for t in sections.get(s, ())]
    general = list(sections.get("general", ()))
    if not keep_separator:
        return ", ".join(head + general + tail)
    return f" {keep_separator} ".join(", ".join(part) for part in (head, general, tail)).strip()


def build_caption(post: Post, quality: str | None, settings: CaptionSettings = CaptionSettings()) -> str:
    """The Kohaku-order caption of one post (exclusions are the caller's decision: see excluded_tags)."""
    return join_caption(caption_sections(post, quality, settings), settings.keep_separator)


# --- reading posts


def _tag_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(t for t in value.split() if t)
    return tuple(str(t).strip() for t in value if str(t).strip())


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _tags_by_category(raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    nested = raw.get("tags") if isinstance(raw.get("tags"), Mapping) else {}
    tags = {}
    for category in CATEGORIES:
        value = raw.get(f"tag_string_{category}", raw.get(f"tags_{category}", nested.get(category)))
        tags[category] = _tag_list(value)
    if not any(tags.values()):  # only an uncategorised tag string: all general
        flat = raw.get("tag_string", raw.get("tags") if isinstance(raw.get("tags"), (str, list)) else None)
        tags["general"] = _tag_list(flat)
    return tags


def _stem(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def parse_post(raw: Mapping[str, Any]) -> Post:
    """A Danbooru API / danbooru2023 record (tag_string_<category>, rating, fav_count, score, created_at,
    id, md5, file name) as a :class:`Post`; also ``tags`` as {category: [..]}, or one flat tag string."""
    names = [_stem(str(raw[f])) for f in _IMAGE_FIELDS if raw.get(f)]
    names += [str(raw[f]).strip() for f in (*_ID_FIELDS, "md5") if raw.get(f) not in (None, "")]
    key = next((str(raw[f]) for f in _ID_FIELDS if raw.get(f) not in (None, "")), names[0] if names else "?")
    return Post(key=key, tags=_tags_by_category(raw), rating=rating_name(raw.get("rating")),
                fav_count=_number(raw.get("fav_count")), score=_number(raw.get("score")),
                year=upload_year(raw.get("created_at", raw.get("date"))), names=tuple(dict.fromkeys(names)))


def records_from_text(text: str, kind: str) -> list[dict[str, Any]]:
    """Raw post records of a metadata file's text; ``kind`` is json, jsonl or csv. ValueError if malformed.

    JSON: a list of posts, {"posts": [...]}, or {key: post}; JSONL: one post per line; CSV: a header row."""
    if kind == "csv":
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    if kind == "jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"line {number}: invalid JSON ({err.msg})") from None
        return _objects(out)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(data, Mapping) and isinstance(data.get("posts"), list):
        data = data["posts"]
    elif isinstance(data, Mapping):
        data = [{"image_key": k, **v} if isinstance(v, Mapping) else v for k, v in data.items()]
    return _objects(data if isinstance(data, list) else [data])


def _objects(items: list[Any]) -> list[dict[str, Any]]:
    for number, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            raise ValueError(f"post {number} is not an object with tag fields")
    return [dict(item) for item in items]


# --- summary


def tag_counts(captioned: Iterable[Mapping[str, Sequence[str]]]) -> dict[str, Counter]:
    """Per section, how many captions contain each tag."""
    counts: dict[str, Counter] = {name: Counter() for name in SECTIONS}
    for sections in captioned:
        for name, tags in sections.items():
            counts[name].update(set(tags))
    return counts


def summary_lines(counts: Mapping[str, Counter], thresholds: Mapping[str, Sequence[float]], top: int = 10) -> list[str]:
    """Thresholds per rating and the most frequent tags of each section."""
    lines = ["quality thresholds (" + " > ".join(QUALITY_TAGS[:-1]) + "):"]
    for rating, values in thresholds.items():
        lines.append(f"  {rating}: " + ", ".join(f"{v:g}" for v in values))
    for name in SECTIONS:
        counter = counts.get(name) or Counter()
        if counter:
            shown = ", ".join(f"{tag} {n}" for tag, n in counter.most_common(top))
            lines.append(f"{name} ({len(counter)} distinct): {shown}")
    return lines

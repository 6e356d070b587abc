"""Caption pipeline: fixed parts, dropout rates, wildcards, separators, warm-up, seeding, variants."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest
from scipy import stats

from library.data.captions import (
    caption_variants,
    expand_wildcards,
    needs_variants,
    process_caption,
    warmup_tag_count,
)
from library.data.spec import CaptionOptions

CARD = "1girl, solo, masterpiece ||| long hair, smile, blue eyes, skirt, outdoors ||| newest, safe"
FLEX = {"long hair", "smile", "blue eyes", "skirt", "outdoors"}
TAGS10 = ", ".join(f"tag{i}" for i in range(10))
SEP = CaptionOptions(keep_tokens_separator="|||", shuffle_caption=True, caption_tag_dropout_rate=0.15)


def _tags(caption: str) -> list[str]:
    return caption.split(", ")


def _within_4_sigma(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def _chi2_p(counts: Counter, categories: list[str]) -> float:
    return stats.chisquare([counts[c] for c in categories]).pvalue


# --- fixed parts ---------------------------------------------------------------------------------


def test_keep_tokens_separator_head_and_tail_never_move():
    for seed in range(500):
        tags = _tags(process_caption(CARD, SEP, random.Random(seed)))
        assert tags[:3] == ["1girl", "solo", "masterpiece"]
        assert tags[-2:] == ["newest", "safe"]
        assert set(tags[3:-2]) <= FLEX
        assert "|||" not in ", ".join(tags)


def test_keep_tokens_first_n_never_move():
    options = CaptionOptions(keep_tokens=2, shuffle_caption=True, caption_tag_dropout_rate=0.3)
    orders = set()
    for seed in range(300):
        tags = _tags(process_caption(TAGS10, options, random.Random(seed)))
        assert tags[:2] == ["tag0", "tag1"]
        orders.add(tuple(tags[2:]))
    assert len(orders) > 100


def test_single_keep_tokens_separator_has_no_tail_and_shuffles_rest():
    options = CaptionOptions(keep_tokens_separator="|||", shuffle_caption=True)
    lasts = Counter()
    for seed in range(400):
        tags = _tags(process_caption("1girl ||| a, b, c, d", options, random.Random(seed)))
        assert tags[0] == "1girl" and sorted(tags[1:]) == ["a", "b", "c", "d"]
        lasts[tags[-1]] += 1
    assert set(lasts) == {"a", "b", "c", "d"}


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    options = CaptionOptions(keep_tokens_separator="|||")
    assert process_caption(CARD, options, random.Random(0)) == (
        "1girl, solo, masterpiece, long hair, smile, blue eyes, skirt, outdoors, newest, safe"
    )


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens():
    options = CaptionOptions(keep_tokens_separator="|||", keep_tokens=1, shuffle_caption=True)
    for seed in range(50):
        assert _tags(process_caption(TAGS10, options, random.Random(seed)))[0] == "tag0"


# --- dropout -------------------------------------------------------------------------------------


def test_tag_dropout_rate_within_binomial_bounds():
    rate = 0.15
    options = CaptionOptions(caption_tag_dropout_rate=rate)
    rng = random.Random(1234)
    kept = sum(len(_tags(process_caption(TAGS10, options, rng))) for _ in range(1000))
    assert _within_4_sigma(10_000 - kept, 10_000, rate)


def test_tag_dropout_never_touches_fixed_parts():
    options = replace(SEP, caption_tag_dropout_rate=1.0)
    assert process_caption(CARD, options, random.Random(0)) == "1girl, solo, masterpiece, newest, safe"


def test_whole_caption_dropout_rate_within_binomial_bounds():
    rate = 0.1
    options = CaptionOptions(caption_dropout_rate=rate)
    rng = random.Random(99)
    dropped = sum(process_caption(CARD, options, rng) == "" for _ in range(10_000))
    assert _within_4_sigma(dropped, 10_000, rate)


def test_dropout_every_n_epochs_exact():
    options = CaptionOptions(caption_dropout_every_n_epochs=3)
    dropped = [e for e in range(0, 13) if process_caption(CARD, options, random.Random(e), epoch=e) == ""]
    assert dropped == [3, 6, 9, 12]


def test_dropped_caption_drops_prefix_and_suffix_too():
    options = CaptionOptions(caption_dropout_rate=1.0, caption_prefix="sks,", caption_suffix="newest")
    assert process_caption(CARD, options, random.Random(0)) == ""


# --- wildcards and multi-line captions ------------------------------------------------------------


def test_wildcard_choice_is_uniform():
    options = CaptionOptions(enable_wildcard=True)
    rng = random.Random(7)
    counts = Counter(process_caption("1girl, {red|green|blue} hair, smile", options, rng) for _ in range(3000))
    names = [f"1girl, {c} hair, smile" for c in ("red", "green", "blue")]
    assert set(counts) == set(names)
    assert _chi2_p(counts, names) > 0.001


def test_multiline_choice_is_uniform_and_skips_blank_lines():
    options = CaptionOptions(enable_wildcard=True)
    raw = "1girl, smile\n\n1girl, frown\n  \n1girl, crying\n1girl, angry\n"
    rng = random.Random(11)
    counts = Counter(process_caption(raw, options, rng) for _ in range(4000))
    lines = ["1girl, smile", "1girl, frown", "1girl, crying", "1girl, angry"]
    assert set(counts) == set(lines)
    assert _chi2_p(counts, lines) > 0.001


def test_multiline_without_wildcard_uses_first_nonempty_line():
    assert process_caption("\n  1girl, smile \nsecond line\n", CaptionOptions(), random.Random(0)) == "1girl, smile"


def test_wildcard_escapes_nesting_and_literals():
    rng = random.Random(0)
    assert expand_wildcards("{{not a wildcard}} {a}", rng) == "{not a wildcard} a"
    assert expand_wildcards("{} and {lonely", rng) == "{} and {lonely"
    nested = Counter(expand_wildcards("{x {a|b}|y}", random.Random(s)) for s in range(400))
    assert set(nested) == {"x a", "x b", "y"}
    assert 120 < nested["y"] < 280


def test_wildcards_off_leave_braces_alone():
    assert process_caption("{a|b}, smile", CaptionOptions(), random.Random(0)) == "{a|b}, smile"


def test_wildcards_expand_in_prefix_and_suffix():
    options = CaptionOptions(enable_wildcard=True, caption_prefix="{sks|ohwx},", caption_suffix=", {newest|recent}")
    outputs = {process_caption("1girl", options, random.Random(s)) for s in range(200)}
    assert outputs == {f"{p}, 1girl, {d}" for p in ("sks", "ohwx") for d in ("newest", "recent")}


# --- separators, prefix/suffix, joining ----------------------------------------------------------


def test_secondary_separator_keeps_units_together_and_is_replaced():
    options = CaptionOptions(secondary_separator=";;;", shuffle_caption=True, caption_tag_dropout_rate=0.3)
    raw = "1girl, long hair;;;blue hair ;;; twintails, smile, skirt, outdoors"
    for seed in range(300):
        caption = process_caption(raw, options, random.Random(seed))
        assert ";;;" not in caption
        tags = _tags(caption)
        if "long hair" in tags:
            i = tags.index("long hair")
            assert tags[i : i + 3] == ["long hair", "blue hair", "twintails"]
        else:
            assert "blue hair" not in tags and "twintails" not in tags


def test_secondary_separator_replaced_without_tag_pass():
    options = CaptionOptions(secondary_separator=";;;")
    assert process_caption("1girl, a;;;b ;;; c", options, random.Random(0)) == "1girl, a, b, c"


def test_other_caption_separator_splits_and_joins():
    options = CaptionOptions(caption_separator=".", keep_tokens=1, shuffle_caption=True)
    raw = "A girl stands. She smiles. It rains. The sky is grey."
    outputs = set()
    for seed in range(100):
        caption = process_caption(raw, options, random.Random(seed))
        parts = caption.split(". ")
        assert parts[0] == "A girl stands"
        assert sorted(parts[1:]) == ["It rains", "She smiles", "The sky is grey"]
        outputs.add(caption)
    assert len(outputs) == 6


def test_prefix_and_suffix_take_part_like_sd_scripts():
    # sd-scripts attaches prefix/suffix first: the prefix lands in the fixed head before "|||",
    # the suffix joins the fixed tail after the second "|||"
    options = replace(SEP, caption_prefix="masterpiece, best quality,", caption_suffix=", absurdres")
    for seed in range(200):
        caption = process_caption(CARD, options, random.Random(seed))
        assert caption.startswith("masterpiece, best quality, 1girl, solo, masterpiece, ")
        assert caption.endswith("newest, safe, absurdres")


def test_keep_tokens_counts_prefix_tags():
    options = CaptionOptions(caption_prefix="sks,", keep_tokens=1, shuffle_caption=True)
    heads = {process_caption("a, b, c, d", options, random.Random(seed)).split(", ")[0] for seed in range(50)}
    assert heads == {"sks"}
    tails = {process_caption("a, b, c, d", replace(options, caption_suffix=", z"), random.Random(s)).split(", ")[-1]
             for s in range(50)}
    assert len(tails) > 1  # the suffix tag is shuffled with the others, as in sd-scripts


def test_prefix_suffix_plain_caption():
    options = CaptionOptions(caption_prefix="  photo of sks ", caption_suffix="in a park")
    assert process_caption("a woman smiling\n", options, random.Random(0)) == "photo of sks a woman smiling in a park"


def test_no_options_passes_through_stripped():
    raw = "  1girl,solo ,  masterpiece ||| long hair\n"
    assert process_caption(raw, CaptionOptions(), random.Random(0)) == "1girl,solo ,  masterpiece ||| long hair"


def test_tag_pass_normalises_whitespace_and_empty_tags():
    options = CaptionOptions(caption_tag_dropout_rate=1e-12)
    assert process_caption(" 1girl,solo , ,  smile,", options, random.Random(0)) == "1girl, solo, smile"


# --- token warm-up -------------------------------------------------------------------------------


def test_token_warmup_counts():
    options = CaptionOptions(token_warmup_min=2, token_warmup_step=8)
    assert [warmup_tag_count(10, options, s, None) for s in range(10)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 10]
    for step in range(10):
        tags = _tags(process_caption(TAGS10, options, random.Random(0), step=step))
        assert tags == [f"tag{i}" for i in range(min(10, step + 2))]


def test_token_warmup_fraction_of_max_steps_and_fixed_parts():
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5, keep_tokens_separator="|||")
    raw = "1girl ||| a, b, c, d, e ||| safe"
    assert process_caption(raw, options, random.Random(0), step=0, max_steps=20) == "1girl, a, safe"
    assert process_caption(raw, options, random.Random(0), step=5, max_steps=20) == "1girl, a, b, c, safe"
    assert process_caption(raw, options, random.Random(0), step=10, max_steps=20) == "1girl, a, b, c, d, e, safe"
    with pytest.raises(ValueError, match="max_steps"):
        process_caption(raw, options, random.Random(0), step=0)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="caption_tag_dropout_rate"):
        process_caption(CARD, CaptionOptions(caption_tag_dropout_rate=1.5), random.Random(0))
    with pytest.raises(ValueError, match="caption_separator"):
        process_caption(CARD, CaptionOptions(caption_separator=""), random.Random(0))


# --- seeding and variants ------------------------------------------------------------------------


def test_same_seed_same_output_different_seeds_differ():
    options = replace(SEP, enable_wildcard=True, caption_dropout_rate=0.1)
    first = [process_caption(CARD, options, random.Random(s)) for s in range(50)]
    again = [process_caption(CARD, options, random.Random(s)) for s in range(50)]
    assert first == again
    assert len(set(first)) > 40


def test_caption_variants_deterministic_and_distinct():
    options = replace(SEP, caption_dropout_rate=0.5, caption_dropout_every_n_epochs=1)
    variants = caption_variants(CARD, options, 8, seed=3)
    assert variants == caption_variants(CARD, options, 8, seed=3)
    assert variants != caption_variants(CARD, options, 8, seed=4)
    assert len(variants) == 8 and len(set(variants)) == 8
    assert all(v.startswith("1girl, solo, masterpiece") and v.endswith("newest, safe") for v in variants)


def test_caption_variants_fewer_when_few_exist():
    options = CaptionOptions(enable_wildcard=True)
    variants = caption_variants("1girl, {smile|frown}", options, 8, seed=0)
    assert sorted(variants) == ["1girl, frown", "1girl, smile"]
    assert caption_variants(CARD, CaptionOptions(), 8, seed=0) == [CARD]


def test_needs_variants():
    assert not needs_variants(CaptionOptions())
    assert not needs_variants(CaptionOptions(caption_dropout_rate=0.1, keep_tokens_separator="|||"))
    assert needs_variants(CaptionOptions(shuffle_caption=True))
    assert needs_variants(CaptionOptions(caption_tag_dropout_rate=0.1))
    assert needs_variants(CaptionOptions(enable_wildcard=True))
    assert needs_variants(CaptionOptions(token_warmup_step=100))

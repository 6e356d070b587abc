"""Tokenizer loading (offline order, settings, errors) and the offline tiny tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest

from library.errors import UserError
from library.models.tokenizers import load_tokenizers
from tests.models._text_fixtures import T5_LEN, one_line, tiny_tokenizer_dir, tiny_tokenizers  # noqa: F401

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
LONG_PROMPT = " ".join(["a red cat sitting on a wooden table"] * 20)


def test_clip_token_ids_match_the_real_bpe(tiny_tokenizers):
    assert tiny_tokenizers.clip_l("a photo of a cat").input_ids == CAT_IDS
    assert tiny_tokenizers.clip_g("a photo of a cat").input_ids == CAT_IDS
    assert len(tiny_tokenizers.clip_l) == 49408


def test_padding_and_lengths(tiny_tokenizers):
    l_ids = tiny_tokenizers.clip_l("a photo of a cat", padding="max_length", max_length=77).input_ids
    g_ids = tiny_tokenizers.clip_g("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert l_ids == CAT_IDS + [49407] * 70  # CLIP-L pads with EOS
    assert g_ids == CAT_IDS + [0] * 70  # CLIP-G pads with "!" = id 0
    assert tiny_tokenizers.clip_l.model_max_length == tiny_tokenizers.clip_g.model_max_length == 77
    t5 = tiny_tokenizers.t5
    assert (t5.pad_token_id, t5.eos_token_id, t5.model_max_length) == (0, 1, T5_LEN)
    t5_ids = t5("a photo of a cat", padding="max_length", max_length=T5_LEN).input_ids
    assert len(t5_ids) == T5_LEN and 1 in t5_ids and t5_ids[-1] == 0
    assert t5_ids[t5_ids.index(1) + 1 :] == [0] * (T5_LEN - t5_ids.index(1) - 1)


def test_truncation_keeps_eos_last(tiny_tokenizers):
    for tok in (tiny_tokenizers.clip_l, tiny_tokenizers.clip_g):
        ids = tok(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    ids = tiny_tokenizers.t5(LONG_PROMPT, padding="max_length", max_length=T5_LEN, truncation=True).input_ids
    assert len(ids) == T5_LEN and ids[-1] == 1


def test_offline_miss_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as exc:
        load_tokenizers(tokenizer_cache_dir=tmp_path / "empty")
    msg = one_line(exc)
    assert "--tokenizer_cache_dir" in msg and str(tmp_path / "empty") in msg
    assert "tokenizer/, tokenizer_2/, tokenizer_3/" in msg


def test_diffusers_dir_is_the_second_source(tmp_path, tiny_tokenizer_dir):
    toks = load_tokenizers(tokenizer_cache_dir=tmp_path / "empty", diffusers_dir=tiny_tokenizer_dir, t5_max_length=16)
    assert toks.clip_l("a photo of a cat").input_ids == CAT_IDS
    assert toks.t5.model_max_length == 16


def test_classic_vocab_merges_folder_and_forced_clip_g_pad(tmp_path, tiny_tokenizer_dir):
    """A diffusers repo layout (vocab.json + merges.txt only); a CLIP-L copy used as tokenizer_2 gets pad '!'."""
    for sub in ("tokenizer", "tokenizer_2"):
        (tmp_path / sub).mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tiny_tokenizer_dir / "tokenizer" / name, tmp_path / sub / name)
    shutil.copytree(tiny_tokenizer_dir / "tokenizer_3", tmp_path / "tokenizer_3")
    toks = load_tokenizers(tokenizer_cache_dir=tmp_path)
    assert toks.clip_l("a photo of a cat").input_ids == CAT_IDS
    assert toks.clip_g("a photo of a cat", padding="max_length", max_length=9).input_ids == CAT_IDS + [0, 0]
    assert toks.clip_l("a photo of a cat", padding="max_length", max_length=9).input_ids == CAT_IDS + [49407] * 2


def test_bad_t5_length_is_a_user_error(tiny_tokenizer_dir):
    with pytest.raises(UserError):
        load_tokenizers(tokenizer_cache_dir=tiny_tokenizer_dir, t5_max_length=0)


def test_tiny_tokenizers_are_deterministic_and_fit_the_tiny_t5(tmp_path, tiny_tokenizer_dir):
    from library.models.tiny.text import TINY_T5_VOCAB
    from library.models.tiny.tokenizers import TINY_T5_TOKENIZER_MAX, write_tiny_tokenizers

    write_tiny_tokenizers(tmp_path)
    for rel in ("tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json", "tokenizer_2/tokenizer.json"):
        assert (tmp_path / rel).read_bytes() == (tiny_tokenizer_dir / rel).read_bytes(), rel
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert TINY_T5_VOCAB >= TINY_T5_TOKENIZER_MAX


def test_tiny_t5_vocab_covers_the_tokenizer(tiny_tokenizers):
    from library.models.tiny.text import TINY_T5_VOCAB

    assert len(tiny_tokenizers.t5) <= TINY_T5_VOCAB
    assert tiny_tokenizers.t5.unk_token_id == 2


def test_missing_open_clip_vocab_is_a_user_error(monkeypatch):
    import importlib.util

    from library.models.tiny import tokenizers as tiny_tok

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="open-clip-torch"):
        tiny_tok.clip_vocab_and_merges()



def test_folder_without_vocabulary_is_a_user_error_not_a_dummy(tmp_path, tiny_tokenizer_dir):
    """transformers 5 silently builds a 3-token CLIPTokenizer from a folder with no vocabulary."""
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (tmp_path / "tok" / "tokenizer_2" / name).unlink()
    with pytest.raises(UserError) as exc:
        load_tokenizers(tokenizer_cache_dir=tmp_path / "tok")
    msg = one_line(exc)
    assert "CLIP-G" in msg and "tokenizer_2" in msg

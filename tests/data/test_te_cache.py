"""Text-encoder output caches: sd-scripts' SD3 keys, caption variants, partial (T5-only) caches."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from library.data import te_cache
from library.data.te_cache import (
    TeCacheItem,
    encode_missing_te,
    is_te_cache_valid,
    num_variants,
    read_te_cache,
    te_cache_path,
    te_cache_record,
    write_te_cache,
)
from library.errors import UserError

T5_LEN = 12
IDENTITY = {"clip_l": "l-hash", "clip_g": "g-hash", "t5": "t5-hash/bf16"}
SD_SCRIPTS_KEYS = {
    "lg_out", "lg_pooled", "t5_out", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask",
    "apply_lg_attn_mask", "apply_t5_attn_mask",
}


def fake_outputs(caption: str, *, t5_only: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic per-caption outputs: CLIP-L fp16, CLIP-G fp32, T5 bf16 (tiny widths)."""
    seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    t5 = {
        "t5": torch.randn(T5_LEN, 16, generator=gen).to(torch.bfloat16),
        "t5_mask": (torch.arange(T5_LEN) < 5).long(),
    }
    if t5_only:
        return t5
    return {
        "clip_l": torch.randn(77, 8, generator=gen).half(),
        "clip_l_pooled": torch.randn(8, generator=gen).half(),
        "clip_g": torch.randn(77, 12, generator=gen),
        "clip_g_pooled": torch.randn(12, generator=gen),
        "clip_l_mask": (torch.arange(77) < 7).long(),
        "clip_g_mask": (torch.arange(77) < 7).long(),
        **t5,
    }


class FakeEncoder:
    def __init__(self, t5_only: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.t5_only = t5_only

    def __call__(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        self.calls.append(list(captions))
        return [fake_outputs(c, t5_only=self.t5_only) for c in captions]


def record(captions, **overrides):
    args = dict(t5_max_length=T5_LEN, apply_lg_attn_mask=False, apply_t5_attn_mask=False, encoder_identity=IDENTITY)
    args.update(overrides)
    parts = args.pop("parts", ("lg", "t5"))
    return te_cache_record(captions, **args, parts=parts)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def test_k_variants_round_trip_and_variant_zero_is_sd_scripts(tmp_path):
    path = te_cache_path(tmp_path / "dog.jpg")
    assert path.name == "dog_sd3_te.npz"
    captions = ["a dog, grass", "grass, a dog", "a dog"]
    rec = record(captions)
    write_te_cache(path, [fake_outputs(c) for c in captions], rec)
    assert is_te_cache_valid(path, rec, deep=True) == (True, "")
    assert num_variants(path) == 3
    for k, caption in enumerate(captions):
        assert_same(read_te_cache(path, k), fake_outputs(caption))
    with np.load(path) as npz:
        keys = set(npz.files)
        assert npz["lg_out"].shape == (77, 20) and npz["lg_pooled"].shape == (20,)
        assert npz["t5_out"].dtype == np.float32  # bf16 stored as float32, as sd-scripts does
        assert bool(npz["apply_lg_attn_mask"]) is False
    assert SD_SCRIPTS_KEYS <= keys and "lg_out_v2" in keys and "t5_attn_mask_v1" in keys
    with pytest.raises(IndexError):
        read_te_cache(path, 3)


def test_sd_scripts_file_is_read_and_trusted_only_on_request(tmp_path):
    path = tmp_path / "cat_sd3_te.npz"
    rng = np.random.default_rng(0)
    lg_out = rng.standard_normal((77, 2048)).astype(np.float16)
    lg_pooled = rng.standard_normal(2048).astype(np.float16)
    t5_out = rng.standard_normal((256, 4096)).astype(np.float16)
    mask = np.ones(77, dtype=np.int64)
    np.savez(  # exactly what sd-scripts' Sd3TextEncoderOutputsCachingStrategy writes
        path, lg_out=lg_out, lg_pooled=lg_pooled, t5_out=t5_out, clip_l_attn_mask=mask, clip_g_attn_mask=mask,
        t5_attn_mask=np.ones(256, dtype=np.int64), apply_lg_attn_mask=False, apply_t5_attn_mask=False,
    )
    out = read_te_cache(path)
    assert num_variants(path) == 1
    assert out["clip_l"].shape == (77, 768) and out["clip_g"].shape == (77, 1280)
    assert torch.equal(torch.cat([out["clip_l"], out["clip_g"]], -1), torch.from_numpy(lg_out))
    assert torch.equal(torch.cat([out["clip_l_pooled"], out["clip_g_pooled"]]), torch.from_numpy(lg_pooled))
    assert torch.equal(out["t5"], torch.from_numpy(t5_out)) and out["t5"].dtype == torch.float16
    rec = record(["a cat"], t5_max_length=256)
    assert is_te_cache_valid(path, rec, trust_foreign=True) == (True, "")
    valid, reason = is_te_cache_valid(path, rec)
    assert not valid and "provenance" in reason
    valid, reason = is_te_cache_valid(path, record(["a cat"], apply_t5_attn_mask=True), trust_foreign=True)
    assert not valid and "apply_t5_attn_mask" in reason
    summary = encode_missing_te([TeCacheItem(path, rec)], FakeEncoder(), batch_size=2)
    assert summary.encoded == 1 and is_te_cache_valid(path, rec) == (True, "")


def make_items(tmp_path: Path, captions_per_image: dict[str, list[str]], **overrides) -> list[TeCacheItem]:
    return [
        TeCacheItem(te_cache_path(tmp_path / name), record(captions, **overrides))
        for name, captions in captions_per_image.items()
    ]


def test_batches_across_items_and_writes_each_file_once(tmp_path, monkeypatch):
    captions = {"a.png": ["a1", "a2"], "b.png": ["b1", "b2"], "c.png": ["c1", "c2"]}
    writes = []
    real_write = te_cache.write_te_cache

    def counting_write(path, *args, **kwargs):
        writes.append(path)
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(te_cache, "write_te_cache", counting_write)
    encoder = FakeEncoder()
    summary = encode_missing_te(make_items(tmp_path, captions), encoder, batch_size=4)
    assert (summary.encoded, summary.reused) == (3, 0)
    assert encoder.calls == [["a1", "a2", "b1", "b2"], ["c1", "c2"]]
    assert sorted(p.name for p in writes) == ["a_sd3_te.npz", "b_sd3_te.npz", "c_sd3_te.npz"]
    assert_same(read_te_cache(tmp_path / "b_sd3_te.npz", 1), fake_outputs("b2"))
    encoder = FakeEncoder()
    summary = encode_missing_te(make_items(tmp_path, captions), encoder, batch_size=4)
    assert (summary.encoded, summary.reused, encoder.calls) == (0, 3, [])


def test_edited_caption_or_changed_encoder_reencodes_just_that_item(tmp_path):
    captions = {"a.png": ["a1"], "b.png": ["b1"], "c.png": ["c1"]}
    encode_missing_te(make_items(tmp_path, captions), FakeEncoder(), batch_size=8)
    items = make_items(tmp_path, {"a.png": ["a1 edited"], "c.png": ["c1"]})
    items += make_items(tmp_path, {"b.png": ["b1"]}, encoder_identity={**IDENTITY, "t5": "other"})
    encoder = FakeEncoder()
    summary = encode_missing_te(items, encoder, batch_size=8)
    assert (summary.encoded, summary.reused) == (2, 1)
    assert encoder.calls == [["a1 edited", "b1"]]
    assert "captions" in summary.rebuilt_reasons[str(items[0].npz_path)]
    assert "encoders" in summary.rebuilt_reasons[str(items[2].npz_path)]
    assert not is_te_cache_valid(items[1].npz_path, record(["c1"], t5_max_length=64))[0]


def test_t5_only_partial_cache(tmp_path):
    t5_only = dict(parts=("t5",), encoder_identity={"t5": IDENTITY["t5"]})
    items = make_items(tmp_path, {"a.png": ["a1", "a2"]}, **t5_only)
    summary = encode_missing_te(items, FakeEncoder(t5_only=True), batch_size=8)
    assert summary.encoded == 1
    out = read_te_cache(items[0].npz_path, 1)
    assert_same(out, fake_outputs("a2", t5_only=True))
    with np.load(items[0].npz_path) as npz:
        assert "lg_out" not in npz.files and "t5_out_v1" in npz.files
    full = record(["a1", "a2"])
    valid, reason = is_te_cache_valid(items[0].npz_path, full)
    assert not valid and "parts" in reason
    full_path = tmp_path / "full_sd3_te.npz"
    write_te_cache(full_path, [fake_outputs("a1"), fake_outputs("a2")], full)
    assert is_te_cache_valid(full_path, items[0].record) == (True, "")  # a full cache serves T5-only
    with pytest.raises(ValueError, match="lacks"):
        write_te_cache(full_path, [fake_outputs("a1", t5_only=True)], record(["a1"]))


def test_truncated_npz_is_detected_and_rebuilt_with_a_warning(tmp_path, caplog):
    items = make_items(tmp_path, {"a.png": ["a1"], "b.png": ["b1"]})
    encode_missing_te(items, FakeEncoder(), batch_size=8)
    data = items[0].npz_path.read_bytes()
    items[0].npz_path.write_bytes(data[: len(data) - 100])
    valid, reason = is_te_cache_valid(items[0].npz_path, items[0].record)
    assert not valid and reason.startswith("unreadable")
    encoder = FakeEncoder()
    with caplog.at_level(logging.WARNING, logger="library.data.te_cache"):
        summary = encode_missing_te(items, encoder, batch_size=8)
    assert (summary.encoded, summary.reused, encoder.calls) == (1, 1, [["a1"]])
    assert any(r.levelno == logging.WARNING and "unreadable" in r.message for r in caplog.records)
    assert_same(read_te_cache(items[0].npz_path), fake_outputs("a1"))
    items[1].npz_path.write_bytes(b"garbage")
    with pytest.raises(UserError):
        read_te_cache(items[1].npz_path)


def test_atomic_write_failure_keeps_the_old_file_and_no_temp_files(tmp_path, monkeypatch):
    path = te_cache_path(tmp_path / "a.png")
    rec = record(["a1", "a2"])
    write_te_cache(path, [fake_outputs("a1"), fake_outputs("a2")], rec)
    before = path.read_bytes()
    real_write_array = np.lib.format.write_array
    calls = []

    def failing_write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("no space left on device")
        return real_write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(OSError):
        write_te_cache(path, [fake_outputs("x1"), fake_outputs("x2")], record(["x1", "x2"]))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="variants"):
        write_te_cache(path, [fake_outputs("a1")], rec)

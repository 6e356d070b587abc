"""Folders and metadata → image records: folder names, captions, bad input, reg balancing, validation split."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image

from library.data.cli_datasets import (
    DatasetDefaults,
    blueprint_from_defaults,
    parse_folder_name,
    parse_resolution,
)
from library.data.sources import (
    ImageRecord,
    balance_regularization,
    blueprint_records,
    dataset_records,
    load_metadata,
    read_caption_file,
    split_validation,
    subset_records,
    write_info_cache,
)
from library.data.spec import CaptionOptions, DatasetBlueprint, DatasetSpec, SubsetSpec
from library.data.toml_config import load_dataset_config
from library.errors import UserError


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(folder: Path, png: bytes, images: dict[str, str | bytes | None]) -> Path:
    """``{"a.png": "caption"}``: image plus a ``.txt`` caption (None: no caption file, bytes: raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in images.items():
        (folder / name).write_bytes(png)
        caption_path = folder / (Path(name).stem + ".txt")
        if isinstance(caption, bytes):
            caption_path.write_bytes(caption)
        elif caption is not None:
            caption_path.write_text(caption, encoding="utf-8")
    return folder


def db_subset(folder: Path, **kwargs) -> SubsetSpec:
    captions = CaptionOptions(caption_extension=".txt", enable_wildcard=kwargs.pop("enable_wildcard", False))
    return SubsetSpec(image_dir=folder, captions=captions, **kwargs)


def one_dataset(*subsets: SubsetSpec, **kwargs) -> DatasetSpec:
    return DatasetSpec(resolution=(512, 512), subsets=subsets, **kwargs)


# folder names and the command-line forms


@pytest.mark.parametrize("name, parsed", [
    ("10_sks girl", (10, "sks girl")),
    ("1_girl", (1, "girl")),
    ("5_sks_girl_v2", (5, "sks_girl_v2")),
    ("3", (3, "")),
    ("20_", (20, "")),
    ("0_nothing", None),
    ("-2_neg", None),
    ("sks girl", None),
    ("ten_sks", None),
    ("_10", None),
])
def test_parse_folder_name(name, parsed):
    assert parse_folder_name(name) == parsed


def test_parse_resolution():
    assert parse_resolution("1024") == (1024, 1024)
    assert parse_resolution("1216, 832") == (1216, 832)
    for bad in ("", "a,b", "1,2,3", "0"):
        with pytest.raises(UserError, match="--resolution"):
            parse_resolution(bad)


def test_train_and_reg_data_dir_subfolders(tmp_path, png_bytes, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    make_folder(train / "10_sks girl", png_bytes, {"a.png": "sks girl, smile"})
    make_folder(train / "2_cat", png_bytes, {"b.png": None})
    make_folder(train / "notes", png_bytes, {"c.png": None})
    make_folder(train / "0_off", png_bytes, {"d.png": None})
    (train / "readme.md").write_text("x")
    make_folder(reg / "1_girl", png_bytes, {"r.png": None})
    defaults = DatasetDefaults(train_data_dir=train, reg_data_dir=reg, resolution=(512, 512), caption_extension=".txt")
    with caplog.at_level(logging.WARNING):
        (spec,) = blueprint_from_defaults(defaults).datasets
    assert "skipping subfolders not named 'N_class tokens'" in caplog.text and "0_off, notes" in caplog.text
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in spec.subsets]
    assert got == [("10_sks girl", 10, "sks girl", False), ("2_cat", 2, "cat", False), ("1_girl", 1, "girl", True)]
    assert spec.subsets[0].captions.caption_extension == ".txt" and spec.resolution == (512, 512)


def test_train_data_dir_without_subfolders_is_an_error(tmp_path, png_bytes):
    make_folder(tmp_path / "flat", png_bytes, {"a.png": "x"})
    with pytest.raises(UserError, match=r"no subfolders named 'N_class tokens'.*the 1 images directly in it"):
        blueprint_from_defaults(DatasetDefaults(train_data_dir=tmp_path / "flat", resolution=(512, 512)))
    with pytest.raises(UserError, match="folder not found"):
        blueprint_from_defaults(DatasetDefaults(train_data_dir=tmp_path / "nope", resolution=(512, 512)))
    with pytest.raises(UserError, match="no training images: give --dataset_config"):
        blueprint_from_defaults(DatasetDefaults())


def test_in_json_form_is_fine_tuning(tmp_path, caplog):
    defaults = DatasetDefaults(train_data_dir=tmp_path, in_json=tmp_path / "m.json", reg_data_dir=tmp_path,
                               dataset_repeats=3, resolution=(1024, 1024))
    with caplog.at_level(logging.WARNING):
        (spec,) = blueprint_from_defaults(defaults).datasets
    (subset,) = spec.subsets
    assert subset.is_fine_tuning and subset.image_dir == tmp_path and subset.num_repeats == 3
    assert "ignoring --reg_data_dir" in caplog.text


def test_missing_resolution_on_the_command_line(tmp_path, png_bytes):
    make_folder(tmp_path / "t" / "1_x", png_bytes, {"a.png": "x"})
    with pytest.raises(UserError, match="command line: no resolution"):
        blueprint_from_defaults(DatasetDefaults(train_data_dir=tmp_path / "t"))


# DreamBooth folders


def test_dreambooth_captions_and_file_types(tmp_path, png_bytes, caplog):
    folder = make_folder(tmp_path / "img", png_bytes, {
        "b.png": "second\nignored line", "a.PNG": "\ufefffirst", "c.webp": None, "d.jpg": "   \n",
    })
    (folder / "anim.gif").write_bytes(b"GIF89a")
    (folder / "a_cache_sd3.npz").write_bytes(b"")
    (folder / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        records = subset_records(db_subset(folder, class_tokens="sks dog", num_repeats=4), 1, 2)
    assert [(r.image_path.name, r.caption) for r in records] == [
        ("a.PNG", "first"), ("b.png", "second"), ("c.webp", "sks dog"), ("d.jpg", "sks dog")]
    assert all(r.num_repeats == 4 and r.dataset_index == 1 and r.subset_index == 2 for r in records)
    assert all(r.image_size is None and not r.is_reg for r in records)
    assert "1 files in" in caplog.text and "anim.gif" in caplog.text and ".npz" not in caplog.text
    expected = "of 4 images, 1 have no '.txt' caption file and 1 have an empty one; using the class tokens 'sks dog'"
    assert expected in caplog.text


def test_missing_caption_without_class_tokens_is_empty(tmp_path, png_bytes, caplog):
    folder = make_folder(tmp_path / "img", png_bytes, {"a.png": None})
    with caplog.at_level(logging.WARNING):
        (record,) = subset_records(db_subset(folder), 0, 0)
    assert record.caption == "" and "using an empty caption" in caplog.text


def test_wildcard_captions_keep_every_line(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "img", png_bytes, {"a.png": "{red|blue} hat\n\nsecond line\n"})
    (record,) = subset_records(db_subset(folder, enable_wildcard=True), 0, 0)
    assert record.caption == "{red|blue} hat\nsecond line"


def test_caption_in_another_encoding_is_an_error(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "img", png_bytes, {"a.png": "café".encode("cp1252")})
    expected = r"caption file .*a\.txt is not UTF-8 \(byte 0xe9 at position 3\); re-save it as UTF-8"
    with pytest.raises(UserError, match=expected):
        subset_records(db_subset(folder), 0, 0)
    (folder / "a.txt").write_bytes("smile".encode("utf-16"))
    with pytest.raises(UserError, match="it looks like UTF-16; re-save it as UTF-8"):
        read_caption_file(folder / "a.txt")


def test_empty_and_missing_folders_are_errors(tmp_path, png_bytes):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"dataset #1, subset #1: no images in .*empty \(looked for \.png"):
        subset_records(db_subset(empty), 0, 0)
    make_folder(tmp_path / "parent" / "10_x", png_bytes, {"a.png": "x"})
    with pytest.raises(UserError, match="it has subfolders, but image_dir must be the folder that holds the images"):
        subset_records(db_subset(tmp_path / "parent"), 0, 0)
    with pytest.raises(UserError, match=r"dataset #2, subset #3: image folder .*missing does not exist"):
        subset_records(db_subset(tmp_path / "missing"), 1, 2)


def test_cache_info_sizes(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "img", png_bytes, {"a.png": "x", "b.png": "y"})
    write_info_cache(folder, {folder / "a.png": ("stale caption", (640, 480))})
    a, b = subset_records(db_subset(folder, cache_info=True), 0, 0)
    assert (a.image_size, a.caption) == ((640, 480), "x") and b.image_size is None
    a, _ = subset_records(db_subset(folder), 0, 0)
    assert a.image_size is None


# fine-tuning metadata


def test_json_metadata_as_in_json(tmp_path, png_bytes, caplog):
    folder = make_folder(tmp_path / "ft", png_bytes, {"a.png": None, "b.jpg": None, "c.webp": None})
    outside = make_folder(tmp_path / "elsewhere", png_bytes, {"z.png": None}) / "z.png"
    meta = {
        "a": {"caption": "a photo", "tags": "1girl, solo", "train_resolution": [512, 768]},
        "b.jpg": {"tags": "cat"},
        "c": {"caption": "only caption", "image_size": [1000, 800]},
        str(outside): {"caption": "absolute"},
        "gone": {"caption": "missing image"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    subset = SubsetSpec(image_dir=folder, metadata_file=tmp_path / "meta.json", num_repeats=2, alpha_mask=True)
    with caplog.at_level(logging.WARNING):
        records = subset_records(subset, 0, 0)
    assert [(r.image_path.name, r.caption, r.image_size) for r in records] == [
        ("a.png", "a photo,1girl, solo", (512, 768)), ("b.jpg", "cat", None),
        ("c.webp", "only caption", (1000, 800)), ("z.png", "absolute", None)]
    assert all(r.num_repeats == 2 and r.alpha_mask for r in records)
    assert "1 images of" in caplog.text and "gone" in caplog.text


def test_jsonl_metadata(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "ft", png_bytes, {"a.png": None, "b.png": None})
    lines = [{"image_path": "b.png", "caption": "bee"}, {"file_name": "a", "caption": "ay", "tags": "t"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    subset = SubsetSpec(image_dir=folder, metadata_file=tmp_path / "m.jsonl",
                        captions=CaptionOptions(caption_separator=", "))
    got = [(r.image_path.name, r.caption) for r in subset_records(subset, 0, 0)]
    assert got == [("b.png", "bee"), ("a.png", "ay, t")]


@pytest.mark.parametrize("name, text, expected", [
    ("m.json", "[1, 2]", "expected an object mapping image keys"),
    ("m.json", "{\"a\": ", "invalid JSON at line 1"),
    ("m.json", "{\"a\": {\"caption\": 3}}", "entry 'a': caption must be a string"),
    ("m.jsonl", "{\"caption\": \"x\"}", "line 1: needs one of image_key, image_path, file_name"),
    ("m.jsonl", "{\"image_key\": \"a\"}\nnot json", "line 2: invalid JSON"),
])
def test_bad_metadata(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=expected):
        load_metadata(tmp_path / name)


def test_metadata_with_no_image_found_is_an_error(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "ft", png_bytes, {"a.png": None})
    (tmp_path / "m.json").write_text(json.dumps({"zzz": {"caption": "x"}}), encoding="utf-8")
    with pytest.raises(UserError, match="none of the 1 images listed in .*m.json was found in"):
        subset_records(SubsetSpec(image_dir=folder, metadata_file=tmp_path / "m.json"), 0, 0)
    with pytest.raises(UserError, match="metadata file .*nope.json not found"):
        load_metadata(tmp_path / "nope.json")


# regularization balancing


def sd_scripts_balance(train_repeats: list[int], reg_repeats: list[int]) -> list[int]:
    """sd-scripts' DreamBoothDataset loop, transcribed on plain lists as the oracle."""
    num_train = sum(train_repeats)
    registered: list[list[int]] = []
    n, first_loop = 0, True
    while n < num_train:
        for index, repeats in enumerate(reg_repeats):
            if first_loop:
                registered.append([repeats])
                n += repeats
            else:
                registered[index][0] += 1
                n += 1
            if n >= num_train:
                break
        first_loop = False
    return [r[0] for r in registered]


def records(repeats: list[int], is_reg: bool) -> list[ImageRecord]:
    return [ImageRecord(Path(f"{'r' if is_reg else 't'}{i}.png"), "", 0, 0, is_reg, n) for i, n in enumerate(repeats)]


@pytest.mark.parametrize("train, reg, expected", [
    ([10, 10, 10, 5, 5], [1, 1, 1, 1], [10, 10, 10, 10]),  # 40 train samples, 4 reg images → 10 each
    ([10, 10, 10, 5, 5], [1, 1, 1], [14, 13, 13]),  # round-robin remainder goes to the first images
    ([7], [3] * 10, [3, 3, 3]),  # first pass stops at 9 ≥ 7: the rest of the reg images are dropped
    ([2, 2], [1] * 6, [1, 1, 1, 1]),
])
def test_reg_balancing_examples(train, reg, expected):
    balanced = balance_regularization(records(train, False), records(reg, True))
    assert [r.num_repeats for r in balanced] == expected == sd_scripts_balance(train, reg)


def test_reg_balancing_matches_sd_scripts_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        train = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
        reg = [rng.randint(1, 5) for _ in range(rng.randint(1, 9))]
        balanced = balance_regularization(records(train, False), records(reg, True))
        assert [r.num_repeats for r in balanced] == sd_scripts_balance(train, reg)
        assert sum(r.num_repeats for r in balanced) >= sum(train)


def test_dataset_with_reg_subset_balances_counts(tmp_path, png_bytes):
    train = make_folder(tmp_path / "10_sks", png_bytes, {f"{i}.png": "x" for i in range(3)})
    reg = make_folder(tmp_path / "1_girl", png_bytes, {f"r{i}.png": None for i in range(4)})
    reg_subset = db_subset(reg, num_repeats=1, is_reg=True, class_tokens="girl")
    spec = one_dataset(db_subset(train, num_repeats=10), reg_subset)
    result = dataset_records(spec, 0)
    assert result.num_train_samples == 30 and result.num_reg_samples == 30
    assert [r.num_repeats for r in result.train if r.is_reg] == [8, 8, 7, 7]
    assert {r.caption for r in result.train if r.is_reg} == {"girl"}
    only_reg = one_dataset(db_subset(reg, is_reg=True))
    with pytest.raises(UserError, match="only regularization subsets"):
        dataset_records(only_reg, 0)


# validation split


def test_validation_split_is_seeded_disjoint_and_per_folder(tmp_path, png_bytes):
    folder = make_folder(tmp_path / "img", png_bytes, {f"{i:02d}.png": "x" for i in range(20)})
    reg = make_folder(tmp_path / "reg", png_bytes, {f"r{i}.png": "r" for i in range(5)})
    subsets = (db_subset(folder, num_repeats=3), db_subset(reg, is_reg=True))
    spec = one_dataset(*subsets, validation_split=0.25)
    first = dataset_records(spec, 0, seed=1)
    again = dataset_records(spec, 0, seed=1)
    other = dataset_records(spec, 0, seed=2)
    assert first == again and first.validation != other.validation
    assert len(first.validation) == 5 and first.num_train_samples == 15 * 3
    assert all(r.num_repeats == 1 and not r.is_reg for r in first.validation)
    train_paths = {r.image_path for r in first.train}
    assert not train_paths & {r.image_path for r in first.validation}
    assert first.num_reg_samples == 45  # balanced against the training split only
    seeded = dataset_records(one_dataset(*subsets, validation_split=0.25, validation_seed=2), 0, seed=1)
    assert seeded.validation == other.validation  # validation_seed beats the run seed
    two = blueprint_records(DatasetBlueprint((spec, DatasetSpec((1024, 1024), subsets, validation_split=0.25))), 1)
    assert [r.image_path for r in two[0].validation] == [r.image_path for r in two[1].validation]


def test_split_rounding_and_tiny_subsets():
    recs = records([1] * 10, False)
    train, held = split_validation(recs, 0.15, 0, "k")
    assert len(held) == 2 and len(train) == 8  # round-half-up(1.5)
    assert split_validation(recs[:1], 0.5, 0, "k") == (recs[:1], [])
    train, held = split_validation(recs[:2], 0.9, 0, "k")
    assert len(train) == 1 and len(held) == 1  # at least one image stays for training


def test_toml_to_records_end_to_end(tmp_path, png_bytes, monkeypatch):
    make_folder(tmp_path / "img", png_bytes, {"a.png": "hello"})
    make_folder(tmp_path / "reg", png_bytes, {"r.png": None})
    (tmp_path / "m.json").write_text(json.dumps({"a": {"caption": "ft"}}), encoding="utf-8")
    (tmp_path / "d.toml").write_text("""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "person"
[[datasets]]
resolution = [768, 512]
  [[datasets.subsets]]
  metadata_file = "m.json"
  image_dir = "img"
""", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    first, second = blueprint_records(load_dataset_config("d.toml", DatasetDefaults()), seed=0)
    assert [(r.caption, r.num_repeats, r.is_reg) for r in first.train] == [("hello", 4, False), ("person", 4, True)]
    assert [(r.caption, r.dataset_index) for r in second.train] == [("ft", 1)]

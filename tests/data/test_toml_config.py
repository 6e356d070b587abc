"""Dataset TOML (sd-scripts syntax) → typed blueprint: keys, types, values, cascade, messages."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from library.data.cli_datasets import DatasetDefaults
from library.data.spec import AugmentOptions, BucketOptions, CaptionOptions, DatasetSpec, SubsetSpec
from library.data.toml_config import KEYS, blueprint_from_dict, load_dataset_config
from library.errors import UserError

FULL_TOML = """
[general]
flip_aug = true
color_aug = false
keep_tokens_separator = "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
caption_extension = ".txt"
caption_prefix = "masterpiece, "
caption_suffix = ", best quality"
caption_dropout_rate = 0.05
caption_dropout_every_n_epochs = 3
enable_wildcard = true
keep_tokens = 1
caption_separator = ";"
secondary_separator = ";;;"
token_warmup_min = 2
token_warmup_step = 0.5

[[datasets]]
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]
min_bucket_reso = 512
max_bucket_reso = 2048
bucket_reso_steps = 32
bucket_no_upscale = true
resize_interpolation = "lanczos"
validation_split = 0.1
validation_seed = 7

  [[datasets.subsets]]
  image_dir = "img/10_sks girl"
  num_repeats = 10
  class_tokens = "sks girl"
  cache_info = true
  alpha_mask = true
  random_crop = true

  [[datasets.subsets]]
  image_dir = "reg/1_girl"
  is_reg = true
  class_tokens = "girl"
  caption_extension = ".caption"
  flip_aug = false

[[datasets]]
batch_size = 4
resolution = 512
network_multiplier = 0.5

  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "ft"
  num_repeats = 2
  color_aug = true
  resize_interpolation = "area"
"""


def write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, defaults: DatasetDefaults | None = None):
    return load_dataset_config(write(tmp_path, text), defaults or DatasetDefaults())


def error_of(tmp_path: Path, text: str, defaults: DatasetDefaults | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_text(tmp_path, text, defaults)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_full_config_parses_into_the_typed_blueprint(tmp_path):
    blueprint = load_text(tmp_path, FULL_TOML)
    first, second = blueprint.datasets
    captions = CaptionOptions(
        caption_extension=".txt", caption_prefix="masterpiece, ", caption_suffix=", best quality",
        shuffle_caption=True, caption_separator=";", keep_tokens=1, keep_tokens_separator="|||",
        secondary_separator=";;;", enable_wildcard=True, caption_dropout_rate=0.05,
        caption_dropout_every_n_epochs=3, caption_tag_dropout_rate=0.1, token_warmup_min=2, token_warmup_step=0.5,
    )
    assert first == DatasetSpec(
        resolution=(1024, 1024), batch_size=2,
        buckets=BucketOptions(True, 512, 2048, 32, True), resize_interpolation="lanczos",
        validation_split=0.1, validation_seed=7,
        subsets=(
            SubsetSpec(image_dir=Path("img/10_sks girl"), num_repeats=10, class_tokens="sks girl", cache_info=True,
                       alpha_mask=True, resize_interpolation="lanczos", captions=captions,
                       augment=AugmentOptions(flip_aug=True, random_crop=True)),
            SubsetSpec(image_dir=Path("reg/1_girl"), is_reg=True, class_tokens="girl", resize_interpolation="lanczos",
                       captions=dataclasses.replace(captions, caption_extension=".caption"),
                       augment=AugmentOptions()),
        ),
    )
    assert second.resolution == (512, 512) and second.batch_size == 4 and second.network_multiplier == 0.5
    assert second.buckets == BucketOptions() and second.validation_split == 0.0
    (ft,) = second.subsets
    assert ft.is_fine_tuning and ft.metadata_file == Path("meta.json") and ft.image_dir == Path("ft")
    assert ft.num_repeats == 2 and ft.augment == AugmentOptions(flip_aug=True, color_aug=True)
    assert ft.resize_interpolation == "area" and second.resize_interpolation is None
    assert ft.class_tokens is None and ft.captions.caption_extension == ".caption"  # DreamBooth keys don't cascade
    assert ft.captions.caption_prefix == "masterpiece, " and ft.captions.keep_tokens_separator == "|||"
    assert isinstance(ft.captions.caption_dropout_rate, float)


def test_misspelt_key_names_file_table_key_and_suggestion(tmp_path):
    message = error_of(tmp_path, FULL_TOML.replace("  is_reg = true", "  num_repeat = 1\n  is_reg = true"))
    assert message == (
        f"dataset config {tmp_path / 'dataset.toml'}: [[datasets.subsets]] #2 of [[datasets]] #1: "
        "unknown key 'num_repeat' (did you mean 'num_repeats'?)"
    )


@pytest.mark.parametrize("table, bad, good", [
    ("[general]", "shuffle_captions", "shuffle_caption"),
    ("[general]", "caption_extention", "caption_extension"),
    ("[[datasets]]", "batch_sise", "batch_size"),
    ("[[datasets]]", "subset", "subsets"),
    ("[[datasets.subsets]]", "imagedir", "image_dir"),
    ("[[datasets.subsets]]", "keep_token_separator", "keep_tokens_separator"),
])
def test_misspelt_keys_at_every_level(tmp_path, table, bad, good):
    text = "[general]\n[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\n"
    text = text.replace(table + "\n", f"{table}\n{bad} = 1\n", 1)
    message = error_of(tmp_path, text)
    assert f"unknown key '{bad}' (did you mean '{good}'?)" in message
    assert "dataset.toml" in message


MINIMAL = "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\n"


@pytest.mark.parametrize("line, expected", [
    ("num_repeats = '10'", "'num_repeats' must be an integer, not '10'"),
    ("num_repeats = 2.5", "'num_repeats' must be an integer"),
    ("flip_aug = 1", "'flip_aug' must be true or false, not 1"),
    ("caption_dropout_rate = true", "'caption_dropout_rate' must be a number"),
    ("class_tokens = 3", "'class_tokens' must be a string"),
])
def test_wrong_types_in_a_subset(tmp_path, line, expected):
    message = error_of(tmp_path, MINIMAL + line + "\n")
    assert "[[datasets.subsets]] #1 of [[datasets]] #1" in message and expected in message


@pytest.mark.parametrize("value", ["[1024]", "[1024, 768, 1]", "'1024'", "[1024.0, 768.0]", "true"])
def test_resolution_must_be_int_or_pair(tmp_path, value):
    message = error_of(tmp_path, MINIMAL.replace("resolution = 512", f"resolution = {value}"))
    assert "'resolution' must be an integer or [width, height]" in message


@pytest.mark.parametrize("line, expected", [
    ("num_repeats = 0", "num_repeats = 0 must be at least 1"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate = 1.5 must be between 0 and 1"),
    ("caption_tag_dropout_rate = -0.1", "must be between 0 and 1"),
    ("keep_tokens = -1", "keep_tokens = -1 must be at least 0"),
    ("caption_extension = 'txt'", "must start with '.' (did you mean '.txt'?)"),
    ("caption_separator = ''", "caption_separator = '' must not be empty"),
    ("resize_interpolation = 'fancy'", "must be one of lanczos"),
])
def test_impossible_subset_values(tmp_path, line, expected):
    assert expected in error_of(tmp_path, MINIMAL + line + "\n")


@pytest.mark.parametrize("lines, expected", [
    ("batch_size = 0", "batch_size = 0 must be at least 1"),
    ("bucket_reso_steps = 8", "bucket_reso_steps = 8 must be a positive multiple of 16"),
    ("validation_split = 1.0", "validation_split = 1.0 must be at least 0 and below 1"),
    ("resolution = [0, 512]", "must be positive"),
    ("enable_bucket = true\nmin_bucket_reso = 1024\nmax_bucket_reso = 512", "min_bucket_reso 1024 is larger"),
    ("enable_bucket = true\nmin_bucket_reso = 768", "resolution 512x512 is below min_bucket_reso 768"),
    ("enable_bucket = true\nresolution = 1536", "resolution 1536x1536 exceeds max_bucket_reso 1024"),
    ("resolution = [500, 512]", "resolution 500x512 must be a multiple of 16 when enable_bucket is off"),
])
def test_impossible_dataset_values(tmp_path, lines, expected):
    text = MINIMAL.replace("resolution = 512\n", "resolution = 512\n" + lines + "\n")
    if "resolution = " in lines:
        text = text.replace("resolution = 512\n", "", 1)
    message = error_of(tmp_path, text)
    assert "[[datasets]] #1" in message and expected in message


def test_bucketing_accepts_a_base_resolution_not_divisible_by_16(tmp_path):
    text = MINIMAL.replace("resolution = 512", "resolution = 1000\nenable_bucket = true")
    assert load_text(tmp_path, text).datasets[0].resolution == (1000, 1000)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "[general]\nflip_aug = true\nbroken = [1, 2\n[[datasets]]\n")
    assert message.startswith(f"dataset config {tmp_path / 'dataset.toml'}: TOML syntax error at line ")


def test_missing_file_and_bom(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_dataset_config(tmp_path / "nope.toml", DatasetDefaults())
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_dataset_config(path, DatasetDefaults()).datasets[0].resolution == (512, 512)


@pytest.mark.parametrize("text, expected", [
    ("[general]\nimage_dir = 'x'\n" + MINIMAL, "[general]: 'image_dir' belongs to one subset"),
    ("[[datasets]]\nresolution = 512\nis_reg = true\n[[datasets.subsets]]\nimage_dir = 'x'\n", "'is_reg' belongs"),
    (MINIMAL + "batch_size = 2\n", "'batch_size' is a dataset key: put it in [[datasets]] or [general]"),
    (MINIMAL + "metadata_file = 'm.json'\ncaption_extension = '.txt'\n", "'caption_extension' applies only to Dream"),
    (MINIMAL + "metadata_file = 'm.json'\nis_reg = true\n", "'is_reg' applies only to DreamBooth"),
    (MINIMAL + "face_crop_aug_range = [1.0, 2.0]\n", "'face_crop_aug_range': face crop augmentation is not supported"),
    ("resolution = 512\n" + MINIMAL, "unknown top-level key 'resolution' — put it in [general] or [[datasets]]"),
    ("[generals]\n" + MINIMAL, "unknown top-level key 'generals' (did you mean 'general'?)"),
    ("[datasets]\nresolution = 512\n", "write [[datasets]], not [datasets]"),
    ("[general]\nflip_aug = true\n", "no [[datasets]]"),
    ("[[datasets]]\nresolution = 512\n", "no [[datasets.subsets]]"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n", "a subset needs image_dir"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "no resolution"),
])
def test_structure_and_placement_errors(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_ignored_key_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_text(tmp_path, MINIMAL + "system_prompt = 'x'\n")
    assert "ignoring 'system_prompt'" in caplog.text


def test_cascade_subset_beats_dataset_beats_general_beats_command_line(tmp_path):
    text = """
[general]
keep_tokens = 1
num_repeats = 3
[[datasets]]
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "b"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
"""
    defaults = DatasetDefaults(keep_tokens=4, resolution=(768, 512), caption_extension=".txt", dataset_repeats=5)
    (a, b), (c,) = (d.subsets for d in load_text(tmp_path, text, defaults).datasets)
    assert [s.captions.keep_tokens for s in (a, b, c)] == [3, 2, 1]
    assert {s.num_repeats for s in (a, b, c)} == {3}
    assert {s.captions.caption_extension for s in (a, b, c)} == {".txt"}  # from the command line
    no_general = text.replace("keep_tokens = 1\nnum_repeats = 3\n", "")
    (a, b), (c,) = (d.subsets for d in load_text(tmp_path, no_general, defaults).datasets)
    assert [s.captions.keep_tokens for s in (a, b, c)] == [3, 2, 4]
    assert {s.num_repeats for s in (a, b, c)} == {5}
    (a, b), (c,) = (d.subsets for d in load_text(tmp_path, no_general, DatasetDefaults(resolution=(512, 512))).datasets)
    assert [s.captions.keep_tokens for s in (a, b, c)] == [3, 2, 0]  # the default


def test_command_line_resolution_and_batch_size_fill_in(tmp_path):
    defaults = DatasetDefaults(resolution=(1216, 832), train_batch_size=3, enable_bucket=True, max_bucket_reso=2048)
    (spec,) = load_text(tmp_path, MINIMAL.replace("resolution = 512\n", ""), defaults).datasets
    assert spec.resolution == (1216, 832) and spec.batch_size == 3 and spec.buckets.enable_bucket


def test_bad_command_line_value_names_the_flag(tmp_path):
    message = error_of(tmp_path, MINIMAL, DatasetDefaults(bucket_reso_steps=20))
    assert message.startswith("command line: --bucket_reso_steps 20 must be a positive multiple of 16")
    message = error_of(tmp_path, MINIMAL, DatasetDefaults(train_batch_size=0))
    assert "--train_batch_size 0 must be at least 1" in message


def test_data_dir_flags_are_ignored_with_a_config(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_text(tmp_path, MINIMAL, DatasetDefaults(train_data_dir=Path("t"), in_json=Path("m.json")))
    assert "ignoring --train_data_dir, --in_json because --dataset_config is given" in caplog.text


def test_every_key_has_a_command_line_level_and_every_spec_field_a_key():
    defaults = DatasetDefaults()
    for key in KEYS:
        defaults.value_for(key)
    owned = {f.name for cls in (CaptionOptions, AugmentOptions, BucketOptions) for f in dataclasses.fields(cls)}
    owned |= {f.name for f in dataclasses.fields(SubsetSpec)} - {"captions", "augment"}
    owned |= {f.name for f in dataclasses.fields(DatasetSpec)} - {"subsets", "buckets"}
    assert owned == set(KEYS)


def test_blueprint_is_frozen(tmp_path):
    blueprint = load_text(tmp_path, FULL_TOML)
    with pytest.raises(dataclasses.FrozenInstanceError):
        blueprint.datasets[0].batch_size = 3  # type: ignore[misc]


def test_blueprint_from_dict_accepts_tuples_and_paths():
    config = {"datasets": [{"resolution": (512, 768), "subsets": [{"image_dir": Path("x")}]}]}
    (spec,) = blueprint_from_dict(config, DatasetDefaults(), "test").datasets
    assert spec.resolution == (512, 768) and spec.subsets[0].image_dir == Path("x")

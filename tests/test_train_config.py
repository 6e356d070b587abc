"""The trainers' flags: the seed model card's command line, config files, notices, and a light --help."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library.cli.compat import IGNORED_FLAGS
from library.cli.train import parse_train_args, write_output_config
from library.config import CHOICES, SECTIONS, FlowConfig, RunConfig, TrainConfig
from library.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# The model card's "Basic Settings" (sd35m-anime-model-card.txt), after `accelerate launch ... sd3_train.py`,
# exactly as a shell passes it (quotes removed), plus the paths the card leaves out.
SEED_CARD = [
    "--sdpa", "--gradient_checkpointing", "--cache_latents", "--cache_latents_to_disk",
    "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--use_t5xxl_cache_only",
    "--max_data_loader_n_workers", "1", "--save_model_as", "safetensors",
    "--mixed_precision", "bf16",
    "--save_precision", "bf16",
    "--min_bucket_reso", "512", "--max_bucket_reso", "1280", "--seed", "1",
    "--max_train_epochs", "1",
    "--learning_rate", "5e-5", "--learning_rate_te1", "5e-6", "--learning_rate_te2", "1e-5",
    "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
    "--optimizer_type", "adamw8bit",
    "--lr_scheduler=cosine", "--lr_warmup_steps", "100",
    "--vae_batch_size", "4", "--cache_info",
    "--bucket_no_upscale", "--keep_tokens_separator", "|||", "--disable_mmap_load_safetensors",
    "--training_shift", "7", "--weighting_scheme", "mode", "--train_text_encoder", "--save_clip",
]
ADOPT = ["--optimizer_type", "pytorch_optimizer.optimizer.adopt.ADOPT",
         "--optimizer_args", "cautious=True", "weight_decay=0.05", "weight_decouple=True"]


def _card_argv(tmp_path: Path) -> list[str]:
    return [*SEED_CARD, "--pretrained_model_name_or_path", str(tmp_path / "sd3.5_medium.safetensors"),
            "--dataset_config", str(tmp_path / "dataset.toml"), "--output_dir", str(tmp_path / "out")]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_card_command_parses(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg, ns = parse_train_args(_card_argv(tmp_path))
    assert cfg.flow.weighting_scheme == "mode" and cfg.flow.training_shift == 7.0
    assert cfg.optimizer.optimizer_type == "adamw8bit" and cfg.optimizer.lr_scheduler == "cosine"
    assert cfg.optimizer.lr_warmup_steps == 100
    assert (cfg.train.learning_rate, cfg.train.learning_rate_te1, cfg.train.learning_rate_te2) == (5e-5, 5e-6, 1e-5)
    assert cfg.train.train_text_encoder and cfg.train.use_t5xxl_cache_only and cfg.train.gradient_checkpointing
    assert (cfg.train.max_train_epochs, cfg.train.gradient_accumulation_steps, cfg.train.seed) == (1, 2, 1)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.max_data_loader_n_workers == 1
    assert cfg.save.save_precision == "bf16" and cfg.save.save_clip and cfg.save.save_model_as == "safetensors"
    assert cfg.save.output_dir == str(tmp_path / "out")
    assert cfg.model.disable_mmap_load_safetensors
    assert cfg.model.pretrained_model_name_or_path == str(tmp_path / "sd3.5_medium.safetensors")
    # dataset/cache flags stay in the namespace for the blueprint and cache options
    assert ns.keep_tokens_separator == "|||" and ns.cache_info and ns.bucket_no_upscale
    assert (ns.train_batch_size, ns.min_bucket_reso, ns.max_bucket_reso, ns.vae_batch_size) == (2, 512, 1280, 4)
    assert ns.cache_latents_to_disk and ns.cache_text_encoder_outputs_to_disk
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert notices == ["--sdpa: always on (attention always runs through torch SDPA)"]


def test_adopt_optimizer_args_parse():
    cfg, _ = parse_train_args([*ADOPT, "--learning_rate", "3e-5", "--lr_scheduler", "cosine"])
    assert cfg.optimizer.optimizer_type == "pytorch_optimizer.optimizer.adopt.ADOPT"
    assert cfg.optimizer.optimizer_args == ("cautious=True", "weight_decay=0.05", "weight_decouple=True")


def test_no_flags_give_the_default_config(caplog):
    with caplog.at_level(logging.WARNING):
        cfg, _ = parse_train_args([])
    assert cfg == RunConfig()
    assert not caplog.records


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.learning_rate = 1.0  # type: ignore[misc]


def test_flag_names_are_unique_across_sections():
    names = RunConfig.flag_names()
    assert len(names) == len(set(names))


def test_choices_match_the_flow_registries():
    from library.flow.loss import HUBER_SCHEDULES, LOSS_TYPES, OBJECTIVES
    from library.flow.timesteps import TIMESTEP_SAMPLINGS
    from library.flow.weighting import LOSS_WEIGHTINGS, WEIGHTING_SCHEMES

    assert set(CHOICES["weighting_scheme"]) == set(WEIGHTING_SCHEMES)
    assert set(CHOICES["timestep_sampling"]) == set(TIMESTEP_SAMPLINGS)
    assert set(CHOICES["loss_weighting"]) == set(LOSS_WEIGHTINGS)
    assert set(CHOICES["model_prediction_type"]) == set(OBJECTIVES)
    assert set(CHOICES["loss_type"]) == set(LOSS_TYPES)
    assert set(CHOICES["huber_schedule"]) == set(HUBER_SCHEDULES)


@pytest.mark.parametrize("text, value", [("100", 100), ("0.05", 0.05), ("5%", "5%")])
def test_warmup_forms_stay_raw(text, value):
    cfg, _ = parse_train_args(["--lr_warmup_steps", text])
    assert cfg.optimizer.lr_warmup_steps == value and type(cfg.optimizer.lr_warmup_steps) is type(value)


def test_output_config_round_trip(tmp_path):
    path = tmp_path / "run.toml"
    argv = [*_card_argv(tmp_path), *ADOPT, "--lr_warmup_steps", "5%", "--config_file", str(path)]
    cfg, ns = parse_train_args([*argv, "--output_config"])
    assert ns.output_config and not path.exists()  # parsing writes nothing
    assert write_output_config(cfg, ns) == path
    loaded, loaded_ns = parse_train_args(["--config_file", str(path)])
    assert loaded == cfg
    for name in ("dataset_config", "keep_tokens_separator", "train_batch_size", "cache_info", "cache_latents_to_disk"):
        assert getattr(loaded_ns, name) == getattr(ns, name)
    assert RunConfig.from_toml_dict(cfg.to_toml_dict()) == cfg
    assert RunConfig.from_toml_dict(cfg.to_toml_dict(sections=True)) == cfg
    with pytest.raises(UserError, match="already exists"):
        write_output_config(cfg, ns)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_config_file_name_gets_toml_suffix(tmp_path):
    cfg, ns = parse_train_args(["--config_file", str(tmp_path / "run"), "--output_config", "--learning_rate", "2e-5"])
    write_output_config(cfg, ns)
    assert (tmp_path / "run.toml").is_file()
    assert parse_train_args(["--config_file", str(tmp_path / "run")])[0].train.learning_rate == 2e-5


def test_output_config_needs_a_path():
    with pytest.raises(UserError, match="--config_file"):
        parse_train_args(["--output_config"])


def test_command_line_overrides_the_file(tmp_path):
    path = _write(tmp_path / "c.toml", 'learning_rate = 1e-4\nweighting_scheme = "logit_normal"\n'
                                       'optimizer_args = ["weight_decay=0.01"]\nsdpa = true\n')
    cfg, _ = parse_train_args(["--config_file", str(path), "--learning_rate", "2e-5",
                               "--optimizer_args", "weight_decay=0.05"])
    assert cfg.train.learning_rate == 2e-5 and cfg.flow.weighting_scheme == "logit_normal"
    assert cfg.optimizer.optimizer_args == ("weight_decay=0.05",)


def test_sections_and_aliases_in_files(tmp_path):
    path = _write(tmp_path / "c.toml", '[training]\ntext_encoder_lr1 = 2e-6\nmax_train_steps = 10\n'
                                       '[dataset]\ntrain_batch_size = 4\nresolution = 512\n')
    cfg, ns = parse_train_args(["--config_file", str(path)])
    assert cfg.train.learning_rate_te1 == 2e-6 and cfg.train.max_train_steps == 10
    assert ns.train_batch_size == 4 and ns.resolution == "512"


@pytest.mark.parametrize("text, expected", [
    ("learning_rat = 1e-4\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("[optimizer]\noptimiser_type = 'AdamW'\n", "did you mean 'optimizer_type'?"),
    ("max_train_steps = 'many'\n", "max_train_steps"),
    ("sdpa = 'yes'\n", "'sdpa' is a switch"),
    ("weighting_scheme = 'mod'\n", "weighting_scheme"),
    ("learning_rate = [1, 2]\n", "learning_rate"),
    ("config_file = 'other.toml'\n", "unknown key 'config_file'"),
    ("[a]\n[a.b]\nx = 1\n", "nested too deep"),
    ("learning_rate = \n", "not valid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, expected):
    path = _write(tmp_path / "c.toml", text)
    with pytest.raises(UserError, match="c.toml") as info:
        parse_train_args(["--config_file", str(path)])
    assert expected in str(info.value)


def test_from_toml_dict_checks_keys_and_types():
    with pytest.raises(UserError, match="did you mean 'training_shift'"):
        RunConfig.from_toml_dict({"training_shft": 3.0})
    with pytest.raises(UserError, match="max_train_steps"):
        RunConfig.from_toml_dict({"max_train_steps": 1.5})
    cfg = RunConfig.from_toml_dict({"flow": {"training_shift": 3}, "train_batch_size": 2},
                                   extra_keys={"train_batch_size"})
    assert cfg.flow.training_shift == 3.0 and isinstance(cfg.flow.training_shift, float)


def test_unknown_command_line_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse_train_args(["--learnig_rate", "1e-4"])
    assert info.value.code == 2
    assert "did you mean --learning_rate?" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--weighting_scheme", "modes"], ["--lr_warmup_steps", "soon"]])
def test_bad_command_line_values_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        parse_train_args(argv)
    assert info.value.code == 2


def test_values_are_checked():
    with pytest.raises(UserError, match="--t5_dropout_rate"):
        parse_train_args(["--t5_dropout_rate", "1.5"])
    with pytest.raises(UserError, match="--min_timestep"):
        FlowConfig(min_timestep=900, max_timestep=100)
    with pytest.raises(UserError, match="--gradient_accumulation_steps"):
        TrainConfig(gradient_accumulation_steps=0)


def test_every_ignored_flag_gets_a_notice(caplog):
    argv = []
    for name, (kind, _) in IGNORED_FLAGS.items():
        argv += [f"--{name}"] if kind is None else [f"--{name}", "1"]
    argv += ["--save_model_as", "ckpt"]
    with caplog.at_level(logging.WARNING):
        cfg, _ = parse_train_args(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(IGNORED_FLAGS) + 1
    for name in IGNORED_FLAGS:
        assert any(m.startswith(f"--{name}: ") for m in messages), name
    assert cfg.save.save_model_as == "safetensors"
    assert cfg == RunConfig()  # nothing reached the config


def test_sections_cover_run_config():
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)


def test_help_is_fast_and_light():
    code = ("import sys, library.cli.train as t\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'safetensors') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "t.train_parser().parse_args(['--help'])\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "--weighting_scheme" in result.stdout and "--sdpa" in result.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.2f} s"

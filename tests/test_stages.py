"""--stages curricula: stage file checks, per-stage argument lists, hand-over, resume, end to end."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

import sd3_train
import sd3_train_network
from library.cli.stages import PATH_FLAGS, base_argv, plan_stages, run_stages
from library.cli.train import parse_train_args, train_parser
from library.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, size: int, count: int = 2) -> Path:
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGB", (size, size), "white")
            ImageDraw.Draw(image).ellipse((size // 8, size // 8, size // 2 + 8 * i, 3 * size // 4), fill=(200, 40 * i, 30))
            image.save(folder / f"img{i}.png")
            (folder / f"img{i}.caption").write_text(f"red shape, tag{i}")
    return folder


def _network_base(tmp_path: Path, pretrained: Path | None = None) -> list[str]:
    if pretrained is None:
        pretrained = tmp_path / "base.safetensors"
        pretrained.write_bytes(b"")  # only checked for existence until a stage trains
    _images(tmp_path / "data" / "2_shapes", 64)
    return ["--pretrained_model_name_or_path", str(pretrained), "--train_data_dir", str(tmp_path / "data"),
            "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--output_name", "net",
            "--network_module", "networks.lora_sd3"]


def _stages_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stages.toml"
    path.write_text(text)
    return path


class FakeTrainer:
    """Stands in for the entry script's _run: records each stage's argv and writes its final file."""

    def __init__(self, network: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.network = network

    def __call__(self, argv: list[str]) -> Path:
        self.calls.append(argv)
        _, ns = parse_train_args(argv, self.network)
        final = Path(ns.output_dir) / f"{ns.output_name}.safetensors"
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(b"weights")
        return final


def _flag(argv: list[str], name: str) -> str:
    """The last value given to --name (the one argparse keeps)."""
    positions = [i for i, a in enumerate(argv) if a == f"--{name}" or a.startswith(f"--{name}=")]
    last = positions[-1]
    return argv[last + 1] if argv[last] == f"--{name}" else argv[last].split("=", 1)[1]


THREE = """
[[stage]]
name = "64px"
training_shift = 2.5
max_train_steps = 2

[[stage]]
name = "128px"
dataset_config = "sets/d128.toml"
training_shift = 5.0
optimizer_type = "Lion"
learning_rate = 1e-4
sample_prompts = "prompts.txt"

[[stage]]
name = "128px-sgd"
resolution = "128"
training_shift = 7.0
max_train_steps = 2
optimizer_type = "SGDNesterov"
optimizer_args = ["momentum=0.8", "weight_decay=0.01"]
network_train_unet_only = true
"""


def _three(tmp_path: Path) -> Path:
    folder = tmp_path / "cfg"
    (folder / "sets").mkdir(parents=True)
    (folder / "sets" / "d128.toml").write_text(
        f'[[datasets]]\nresolution = 128\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "data" / "2_shapes"}"\n')
    (folder / "prompts.txt").write_text("red shape --w 32 --h 32 --s 2\n")
    return _stages_file(folder, THREE)


def test_each_stage_gets_its_flags_outputs_and_the_previous_weights(tmp_path, caplog):
    path = _three(tmp_path)
    fake = FakeTrainer()
    with caplog.at_level(logging.INFO, logger="library.cli.stages"):
        final = run_stages([*_network_base(tmp_path), "--stages", str(path)], fake, network=True)
    out = tmp_path / "out"
    finals = [out / "64px" / "net_64px.safetensors", out / "128px" / "net_128px.safetensors",
              out / "128px-sgd" / "net_128px-sgd.safetensors"]
    assert final == finals[2] and len(fake.calls) == 3
    first, second, third = fake.calls
    assert "--stages" not in " ".join(first) and "--network_weights" not in first
    assert _flag(first, "training_shift") == "2.5" and _flag(first, "output_dir") == str(out / "64px")
    assert _flag(second, "dataset_config") == str(path.parent / "sets" / "d128.toml")  # relative to the file
    assert _flag(second, "sample_prompts") == str(path.parent / "prompts.txt")
    assert _flag(second, "network_weights") == str(finals[0]) and _flag(second, "optimizer_type") == "Lion"
    assert _flag(third, "network_weights") == str(finals[1]) and _flag(third, "resolution") == "128"
    assert _flag(third, "output_name") == "net_128px-sgd" and "--network_train_unet_only" in third
    _, ns = parse_train_args(third, network=True)
    assert ns.optimizer_args == ["momentum=0.8", "weight_decay=0.01"] and ns.training_shift == 7.0
    assert "stage 2/3 '128px': dataset_config=" in caplog.text and "training_shift=5.0" in caplog.text


@pytest.mark.parametrize("body, message", [
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\n[[stage]]\nname = "c"\ntraining_shfit = 3.0\n',
     "stage 'c': unknown key 'training_shfit' (did you mean 'training_shift'?)"),
    ('[[stage]]\nname = "a"\nstages = "x.toml"\n', "'stages' cannot be set in a stage"),
    ('[[stage]]\nname = "a"\nconfig_file = "x.toml"\n', "'config_file' cannot be set in a stage"),
    ('[[stage]]\nname = "a"\noutput_config = true\n', "'output_config' cannot be set in a stage"),
    ('[[stage]]\nname = "a"\nresume = "state"\n', "'resume' cannot be set in a stage"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\npretrained_model_name_or_path = "m.safetensors"\n',
     "stage 'b': 'pretrained_model_name_or_path' is only allowed in the first stage"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\nnetwork_weights = "n.safetensors"\n',
     "'network_weights' is only allowed in the first stage"),
    ('[[stage]]\ntraining_shift = 2.0\n', "stage 1: name = None"),
    ('[[stage]]\nname = "a/b"\n', "name = 'a/b'"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "a"\n', "'a' is used twice"),
    ('[stage]\nname = "a"\n', "no [[stage]] tables"),
    ('stage = []\n', "no [[stage]] tables"),
    ('[[stage]]\nname = "a"\n[defaults]\nseed = 1\n', "unknown top-level key 'defaults'"),
    ('[[stage]]\nname = "a"\nmax_train_steps = "many"\n', "stage 'a': argument --max_train_steps: invalid int"),
    ('[[stage]]\nname = "a"\ncache_latents = "yes"\n', "stage 'a': config key 'cache_latents' is a switch"),
    ('[[stage]]\nname = "a"\nlearning_rate = [1, 2]\n', "stage 'a': config key 'learning_rate': expected a single"),
    ('[[stage]]\nname = "a"\nweighting_scheme = "logit"\n', "stage 'a': argument --weighting_scheme: invalid choice"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\nsample_prompts = "nope.txt"\n', "stage 'b': --sample_prompts"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\ndataset_config = "nope.toml"\n', "stage 'b': dataset config"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\noptimizer_args = ["betas=(0.9, 0.99)", "nesterov=True"]\n',
     "stage 'b':.*nesterov"),
    ('[[stage]]\nname = "a"\n[[stage]]\nname = "b"\noptimizer_type = "AdamX"\n', "stage 'b': --optimizer_type"),
    ('[[stage]]\nname = "a"\ncache_latents = false\n', "cache_latents = false cannot switch off"),
    ('[[stage]]\nname = "a"\noutput_name = "x"\n[[stage]]\nname = "b"\noutput_name = "x"\noutput_dir = "o"\n',
     "stages 'a' and 'b' write the same output"),
])
def test_bad_stage_files_fail_before_any_stage_trains(tmp_path, body, message):
    path = _stages_file(tmp_path / "cfg", body)
    fake = FakeTrainer()
    with pytest.raises(UserError, match=message if ".*" in message else re.escape(message)):
        run_stages([*_network_base(tmp_path), "--cache_latents", "--stages", str(path)], fake, network=True)
    assert fake.calls == []  # checked before the first stage ran


def test_command_line_conflicts_are_errors(tmp_path, capsys):
    path = _stages_file(tmp_path / "cfg", '[[stage]]\nname = "a"\n')
    base = _network_base(tmp_path)
    with pytest.raises(UserError, match="--output_config and --debug_dataset"):
        run_stages([*base, "--debug_dataset", "--stages", str(path)], FakeTrainer(), network=True)
    config = tmp_path / "run.toml"
    config.write_text(f'resume = "{tmp_path}"\n')
    with pytest.raises(UserError, match="not in a --config_file"):
        run_stages([*base, "--config_file", str(config), "--stages", str(path)], FakeTrainer(), network=True)
    assert sd3_train_network.main([*base, "--stage", str(path)]) == 2  # abbreviated: refused
    assert "in full" in capsys.readouterr().err
    config.write_text(f'stages = "{path}"\n')
    assert sd3_train_network.main([*base, "--config_file", str(config)]) == 2
    assert "unknown key 'stages'" in capsys.readouterr().err


def test_base_argv_drops_both_spellings():
    argv = ["--a", "1", "--stages", "s.toml", "--resume=d", "--b", "--stages=x", "--resume", "r", "--c"]
    assert base_argv(argv) == ["--a", "1", "--b", "--c"]


def test_stages_flag_is_not_a_run_setting(tmp_path):
    cfg, ns = parse_train_args(["--stages", "s.toml", "--output_config", "--config_file", str(tmp_path / "w")])
    assert ns.stages == "s.toml" and "stages" not in cfg.to_toml_dict()
    from library.cli.train import write_output_config

    written = write_output_config(cfg, ns).read_text()
    assert "stages" not in written and "s.toml" not in written


def test_path_flags_cover_every_path_valued_flag():
    hints = ("dir", "path", "file", "_config", "weights", "prompts", "json")
    not_paths = {"dim_from_weights", "base_weights_multiplier", "log_config", "cache_latents_to_disk",
                 "cache_text_encoder_outputs_to_disk", "output_config", "config_file", "resume", "stages",
                 "log_tracker_name"}
    flags = {a.dest for a in train_parser(network=True)._actions}
    looks_like_path = {f for f in flags if any(h in f for h in hints)} | {"clip_l", "clip_g", "t5xxl", "vae"}
    assert looks_like_path - not_paths <= set(PATH_FLAGS), looks_like_path - not_paths - set(PATH_FLAGS)
    assert set(PATH_FLAGS) <= flags


def _state(folder: Path, output_name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"output_name": output_name, "global_step": 2}))
    return folder


def test_resume_runs_the_stage_that_saved_the_state_then_the_rest(tmp_path, caplog):
    path = _three(tmp_path)
    argv = [*_network_base(tmp_path), "--stages", str(path)]
    state = _state(tmp_path / "out" / "128px" / "net_128px-step00000002-state", "net_128px")
    with pytest.raises(UserError, match=r"final file of stage '64px' is missing: .*64px/net_64px.safetensors"):
        run_stages([*argv, "--resume", str(state)], FakeTrainer(), network=True)
    (tmp_path / "out" / "64px").mkdir(parents=True)
    (tmp_path / "out" / "64px" / "net_64px.safetensors").write_bytes(b"w")
    fake = FakeTrainer()
    with caplog.at_level(logging.INFO, logger="library.cli.stages"):
        run_stages([*argv, "--resume", str(state)], fake, network=True)
    assert [_flag(c, "output_name") for c in fake.calls] == ["net_128px", "net_128px-sgd"]
    assert _flag(fake.calls[0], "resume") == str(state) and "--resume" not in fake.calls[1]
    assert _flag(fake.calls[0], "network_weights") == str(tmp_path / "out" / "64px" / "net_64px.safetensors")
    assert "(resuming" in caplog.text
    other = _state(tmp_path / "elsewhere-state", "another_run")
    with pytest.raises(UserError, match="output_name 'another_run', which is none of the stages'"):
        run_stages([*argv, "--resume", str(other)], FakeTrainer(), network=True)
    with pytest.raises(UserError, match="no readable train_state.json"):
        run_stages([*argv, "--resume", str(tmp_path)], FakeTrainer(), network=True)


FULL_TWO = """
[[stage]]
name = "a"
train_text_encoder = true
{save}

[[stage]]
name = "b"
learning_rate = 0.0
save_clip = true
save_t5xxl = true
"""


def _full_base(files, tmp_path: Path) -> list[str]:
    _images(tmp_path / "data" / "2_shapes", 64)
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--output_dir", str(tmp_path / "out"),
            "--output_name", "full", "--t5xxl_max_token_length", "16", "--cache_latents", "--seed", "3",
            "--learning_rate", "1e-3", "--max_train_steps", "1"]


def test_full_handover_points_encoders_and_vae_at_their_sources(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    base = _full_base(files, tmp_path)
    unsaved = _stages_file(tmp_path / "c1", FULL_TWO.format(save=""))
    with pytest.raises(UserError, match="stage 'a': it trains clip_l .* add save_clip = true"):
        plan_stages(base, str(unsaved), network=False)
    runs = plan_stages(base, str(_stages_file(tmp_path / "c2", FULL_TWO.format(save="save_clip = true"))),
                       network=False)
    second = list(runs[1].argv)
    prev = str(runs[0].final)
    assert _flag(second, "pretrained_model_name_or_path") == prev
    assert _flag(second, "clip_l") == _flag(second, "clip_g") == prev  # trained in stage a: from its checkpoint
    assert _flag(second, "t5xxl") == _flag(second, "vae") == str(files.checkpoint)  # untouched: the original
    separate = plan_stages([*base, "--t5xxl", str(files.t5xxl)], str(tmp_path / "c2" / "stages.toml"), network=False)
    assert _flag(list(separate[1].argv), "t5xxl") == str(files.t5xxl)


def test_shipped_curriculum_validates(tiny_models, tmp_path):
    from library.cli import data as data_flags
    from library.data.cli_datasets import DatasetDefaults
    from library.data.toml_config import load_dataset_config

    files = tiny_models("sd35-medium")
    curriculum = ROOT / "configs" / "sd35m_anime_curriculum.toml"
    base = ["--pretrained_model_name_or_path", str(files.checkpoint), "--output_dir", str(tmp_path / "out"),
            "--output_name", "anime", "--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs",
            "--use_t5xxl_cache_only", "--train_text_encoder", "--save_clip", "--sdpa", "--gradient_checkpointing"]
    runs = plan_stages(base, str(curriculum), network=False)
    assert len(runs) >= 4 and len({r.stage.name for r in runs}) == len(runs)
    sizes, shifts, optimizers = [], [], set()
    for run in runs:
        _, ns = parse_train_args(list(run.argv))
        sizes.append(data_flags.dataset_blueprint(ns).datasets[0].resolution)
        shifts.append(ns.training_shift)
        optimizers.add(ns.optimizer_type)
    assert sizes[0] == (512, 512) and sizes[-1] == (1024, 1024) and sizes == sorted(sizes)
    assert shifts[0] == 2.5 and shifts[-1] == 7.0 and shifts == sorted(shifts)
    assert len(optimizers) >= 2
    for name in ("anime_512.toml", "anime_1024.toml"):
        blueprint = load_dataset_config(ROOT / "configs" / "datasets" / name, DatasetDefaults())
        assert blueprint.datasets[0].buckets.enable_bucket


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_three_stage_lora_curriculum_runs_hands_over_and_resumes_inside_stage_two(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    _images(tmp_path / "data" / "2_shapes", 128)
    path = _three(tmp_path)
    argv = [*_network_base(tmp_path, files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--t5xxl_max_token_length", "16", "--cache_latents", "--cache_text_encoder_outputs", "--seed", "3",
            "--network_dim", "4", "--network_train_unet_only", "--learning_rate", "1e-3", "--max_train_steps", "4",
            "--save_every_n_steps", "2", "--save_state", "--sample_every_n_steps", "2",
            "--sample_prompts", str(path.parent / "prompts.txt"), "--stages", str(path)]
    assert sd3_train_network.main(argv) == 0
    out = tmp_path / "out"
    finals = {name: out / name / f"net_{name}.safetensors" for name in ("64px", "128px", "128px-sgd")}
    first = {name: _tensors(p) for name, p in finals.items()}
    for name in finals:
        assert sorted((out / name / "sample").glob(f"net_{name}_000002_00_*.png")), name  # each stage samples
    assert {k for k in first["128px"]} == {k for k in first["64px"]}
    ups = [k for k in first["64px"] if k.endswith("lora_up.weight")]
    assert max(first["64px"][k].abs().max().item() for k in ups) > 1.2e-3  # a fresh start has up = 0
    drift = max((first["128px"][k] - first["64px"][k]).abs().max().item() for k in ups)
    assert 0 < drift <= 4 * 1e-4 + 1e-7  # stage 2 (Lion, lr 1e-4: at most lr per step) started from stage 1's weights

    state = out / "128px" / "net_128px-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["output_name"] == "net_128px"
    stage_one_mtime = finals["64px"].stat().st_mtime_ns
    finals["128px"].unlink()
    finals["128px-sgd"].unlink()
    assert sd3_train_network.main([*argv, "--resume", str(state)]) == 0
    assert finals["64px"].stat().st_mtime_ns == stage_one_mtime  # the finished stage was not re-run
    for name in ("128px", "128px-sgd"):
        again = _tensors(finals[name])
        assert again.keys() == first[name].keys()
        assert all(torch.equal(again[k], first[name][k]) for k in again), name


@pytest.mark.slow
def test_two_stage_full_finetune_hands_over_weights_and_text_encoders(tiny_models, tmp_path):
    files = tiny_models("sd35-medium")
    path = _stages_file(tmp_path / "cfg", FULL_TWO.format(save="save_clip = true"))
    assert sd3_train.main([*_full_base(files, tmp_path), "--stages", str(path)]) == 0
    original = _tensors(files.checkpoint)
    a = _tensors(tmp_path / "out" / "a" / "full_a.safetensors")
    b = _tensors(tmp_path / "out" / "b" / "full_b.safetensors")
    mmdit = [k for k in a if k.startswith("model.diffusion_model.") and k != "model.diffusion_model.pos_embed"]
    clip_l = [k for k in a if k.startswith("text_encoders.clip_l.")]
    t5 = [k for k in original if k.startswith("text_encoders.t5xxl.") and k in b]
    assert clip_l and t5 and not any(k.startswith("text_encoders.t5xxl.") for k in a)
    assert any(not torch.equal(a[k], original[k]) for k in mmdit)  # stage a trained the MMDiT ...
    assert any(not torch.equal(a[k], original[k]) for k in clip_l)  # ... and CLIP-L
    assert all(torch.equal(b[k], a[k]) for k in mmdit + clip_l)  # lr 0: stage b holds exactly what a handed over
    assert all(torch.equal(b[k], original[k]) for k in t5)  # T5 from the original file
    vae = [k for k in original if k.startswith("first_stage_model.")]
    assert vae and all(torch.equal(b[k], original[k]) for k in vae)

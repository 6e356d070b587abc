"""Output names, retention as sd-scripts, training metadata and all-in-one checkpoints (tiny models)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.models import safetensors_io
from library.models.loading import load_mmdit
from library.models.mmdit_config import to_diffusers_config
from library.models.safetensors_io import load_safetensors, read_metadata, read_shapes
from library.models.text_encoders import load_text_encoders
from library.models.vae import vae_ldm_tensors
from library.training.checkpoints import (
    SavePolicy,
    checkpoint_metadata,
    checkpoint_name,
    interrupted_state_dir_name,
    model_extension,
    prune_outputs,
    save_dtype,
    save_full_checkpoint,
    state_dir_name,
    tag_frequency,
    training_metadata,
)


# --- names


def test_names_as_sd_scripts():
    assert checkpoint_name("m") == "m.safetensors"
    assert checkpoint_name("m", epoch=5) == "m-000005.safetensors"
    assert checkpoint_name("m", step=100) == "m-step00000100.safetensors"
    assert state_dir_name("m", epoch=5) == "m-000005-state"
    assert state_dir_name("m", step=100) == "m-step00000100-state"
    assert state_dir_name("m", final=True) == "m-state"
    assert interrupted_state_dir_name("m", step=7) == "m-step00000007-interrupted-state"
    with pytest.raises(ValueError):
        checkpoint_name("m", epoch=1, step=1)
    with pytest.raises(ValueError):
        state_dir_name("m")


def test_flag_values():
    assert model_extension("safetensors") == ".safetensors"
    with pytest.raises(UserError, match="--save_model_as ckpt"):
        model_extension("ckpt")
    assert save_dtype(None) is None
    assert save_dtype("bf16") == torch.bfloat16 and save_dtype("float") == torch.float32
    with pytest.raises(UserError, match="--save_precision"):
        save_dtype("fp8")
    with pytest.raises(UserError, match="--save_every_n_steps must be at least 1"):
        SavePolicy("m", save_every_n_steps=0)


# --- retention


def _run_epochs(tmp_path: Path, policy: SavePolicy, num_epochs: int) -> set[str]:
    """The loop's part: save where the policy says, prune, and write the final model/state."""
    for epoch in range(1, num_epochs + 1):
        if policy.should_save_epoch(epoch, num_epochs):
            (tmp_path / checkpoint_name("m", epoch=epoch)).touch()
            if policy.save_state:
                (tmp_path / state_dir_name("m", epoch=epoch)).mkdir()
            prune_outputs(tmp_path, policy.to_remove_after_epoch(epoch))
    (tmp_path / checkpoint_name("m")).touch()
    if policy.save_state:
        (tmp_path / state_dir_name("m", final=True)).mkdir()
    return {p.name for p in tmp_path.iterdir()}


def _run_steps(tmp_path: Path, policy: SavePolicy, max_steps: int) -> set[str]:
    for step in range(1, max_steps + 1):
        if policy.should_save_step(step):
            (tmp_path / checkpoint_name("m", step=step)).touch()
            if policy.save_state:
                (tmp_path / state_dir_name("m", step=step)).mkdir()
            prune_outputs(tmp_path, policy.to_remove_after_step(step))
    return {p.name for p in tmp_path.iterdir()}


def test_epoch_retention_as_sd_scripts(tmp_path):
    policy = SavePolicy("m", save_every_n_epochs=2, save_last_n_epochs=2, save_state=True)
    assert _run_epochs(tmp_path, policy, 10) == {
        "m-000006.safetensors", "m-000008.safetensors", "m.safetensors",
        "m-000006-state", "m-000008-state", "m-state",
    }


def test_epoch_retention_separate_state_count(tmp_path):
    policy = SavePolicy("m", save_every_n_epochs=2, save_last_n_epochs=3, save_last_n_epochs_state=1,
                        save_state=True)
    assert _run_epochs(tmp_path, policy, 11) == {
        "m-000006.safetensors", "m-000008.safetensors", "m-000010.safetensors", "m.safetensors",
        "m-000010-state", "m-state",
    }


def test_epoch_saves_without_retention(tmp_path):
    policy = SavePolicy("m", save_every_n_epochs=3)
    assert _run_epochs(tmp_path, policy, 9) == {"m-000003.safetensors", "m-000006.safetensors", "m.safetensors"}
    assert not policy.should_save_epoch(9, 9) and policy.should_save_epoch(9)


@pytest.mark.parametrize("last_n,kept", [(30, (70, 80, 90, 100)), (25, (80, 90, 100)), (10, (90, 100))])
def test_step_retention_as_sd_scripts(tmp_path, last_n, kept):
    policy = SavePolicy("m", save_every_n_steps=10, save_last_n_steps=last_n, save_state=True)
    expected = {checkpoint_name("m", step=s) for s in kept} | {state_dir_name("m", step=s) for s in kept}
    assert _run_steps(tmp_path, policy, 105) == expected


def test_states_not_pruned_without_save_state(tmp_path):
    policy = SavePolicy("m", save_every_n_steps=10, save_last_n_steps=10)
    assert policy.to_remove_after_step(40) == ["m-step00000020.safetensors"]
    assert SavePolicy("m", save_every_n_epochs=1, save_last_n_epochs=1).to_remove_after_epoch(3) == [
        "m-000002.safetensors"]


# --- metadata


def test_tag_frequency_as_sd_scripts():
    freq = tag_frequency({"10_cat": ["A cat, sitting,  indoors", "a cat,,outdoors"], "1_dog": ["dog"]})
    assert freq == {"10_cat": {"a cat": 2, "sitting": 1, "indoors": 1, "outdoors": 1}, "1_dog": {"dog": 1}}


def test_training_metadata_records_sd3_settings():
    meta = training_metadata({
        "training_shift": 7.0, "weighting_scheme": "logit_normal", "timestep_sampling": "logit_normal",
        "loss_weighting": "none", "learning_rate": 1e-5, "optimizer_type": "ADOPT",
        "optimizer_args": ["cautious=True", "weight_decouple=True"], "max_train_steps": 100, "steps": 40,
        "epoch": 2, "pretrained_model_name_or_path": "/models/sd3.5_medium.safetensors",
        "datasets": [{"resolution": [1024, 1024], "num_repeats": 10}],
        "captions_by_dir": {"10_cat": ["cat, sitting", "cat"]}, "not_a_metadata_flag": 1,
    })
    assert meta["ss_training_shift"] == "7.0"
    assert meta["ss_weighting_scheme"] == "logit_normal"
    assert meta["sd3_trainer.timestep_sampling"] == "logit_normal"
    assert meta["sd3_trainer.loss_weighting"] == "none"
    assert meta["ss_learning_rate"] == "1e-05" and meta["ss_steps"] == "40" and meta["ss_epoch"] == "2"
    assert meta["ss_optimizer"] == "ADOPT(cautious=True,weight_decouple=True)"
    assert meta["ss_sd_model_name"] == "sd3.5_medium.safetensors"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_cat": {"cat": 2, "sitting": 1}}
    assert json.loads(meta["ss_datasets"])[0]["num_repeats"] == 10
    assert all(isinstance(v, str) for v in meta.values()) and "not_a_metadata_flag" not in str(meta)


# --- all-in-one checkpoints


@pytest.fixture(scope="module")
def base(tiny_models):
    files = tiny_models("sd35-medium")
    model = load_mmdit(files.checkpoint)
    trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return files, trained, load_text_encoders(files.checkpoint)


def _meta(files) -> dict[str, str]:
    return checkpoint_metadata(files.config, title="t", settings={"training_shift": 3.0}, date="2026-01-01T00:00:00")


def _prefix_keys(path: Path, prefix: str) -> set[str]:
    return {k for k in read_shapes(path) if k.startswith(prefix)}


def test_full_checkpoint_loads_back(base, tmp_path):
    files, trained, encoders = base
    out = save_full_checkpoint(tmp_path / "m.safetensors", trained, files.config, base_checkpoint_path=files.checkpoint,
                               metadata=_meta(files), text_encoders=encoders, save_clip=True)
    loaded = load_mmdit(out).state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    vae_in, vae_out = vae_ldm_tensors(files.checkpoint), vae_ldm_tensors(out)
    assert vae_in.keys() == vae_out.keys()
    assert all(torch.equal(vae_in[k], vae_out[k]) and vae_in[k].dtype == vae_out[k].dtype for k in vae_in)
    assert _prefix_keys(out, "text_encoders.clip_l.") and _prefix_keys(out, "text_encoders.clip_g.")
    assert not _prefix_keys(out, "text_encoders.t5xxl.")
    back = load_text_encoders(out)
    assert back.t5xxl is None
    for name in ("clip_l", "clip_g"):
        ref, got = getattr(encoders, name).state_dict(), getattr(back, name).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    meta = read_metadata(out)
    assert meta["ss_training_shift"] == "3.0" and meta["modelspec.prediction_type"] == "flow"


def test_full_checkpoint_with_t5_and_bf16(base, tmp_path):
    files, trained, encoders = base
    out = save_full_checkpoint(tmp_path / "m.safetensors", trained, files.config, base_checkpoint_path=files.checkpoint,
                               metadata=_meta(files), text_encoders=encoders, save_clip=True, save_t5xxl=True,
                               dtype=torch.bfloat16)
    tensors = load_safetensors(out)
    vae_in = vae_ldm_tensors(files.checkpoint)
    for key, tensor in tensors.items():
        if key.startswith("first_stage_model."):
            assert tensor.dtype == vae_in[key].dtype == torch.float32 and torch.equal(tensor, vae_in[key])
        else:
            assert tensor.dtype == torch.bfloat16, key
    assert _prefix_keys(out, "text_encoders.t5xxl.")
    assert load_text_encoders(out).t5xxl is not None


def test_full_checkpoint_loads_in_diffusers(base, tmp_path):
    from diffusers import SD3Transformer2DModel

    files, trained, _ = base
    out = save_full_checkpoint(tmp_path / "m.safetensors", trained, files.config, base_checkpoint_path=files.checkpoint,
                               metadata=_meta(files))
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(to_diffusers_config(files.config)))
    theirs = SD3Transformer2DModel.from_single_file(str(out), config=str(config_dir), local_files_only=True)
    qkv = trained["joint_blocks.0.x_block.attn.qkv.weight"]
    assert torch.equal(theirs.transformer_blocks[0].attn.to_q.weight.float(), qkv[: qkv.shape[0] // 3])


class _FullDiskFile:
    """A file whose writes fail with ENOSPC once ``budget`` bytes have been written."""

    def __init__(self, path: Path, budget: int):
        self._f = open(path, "wb")
        self._budget = budget

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._budget:
            self._f.write(memoryview(data).cast("B")[: self._budget])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= size
        return self._f.write(data)

    def __enter__(self) -> "_FullDiskFile":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_full_disk_leaves_no_partial_file(base, tmp_path, monkeypatch):
    files, trained, _ = base
    target = tmp_path / "out" / "m.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"previous model")
    def full_disk_open(path, mode="r", *args, **kwargs):
        return _FullDiskFile(Path(path), 4096) if "w" in mode else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(safetensors_io, "open", full_disk_open, raising=False)
    with pytest.raises(UserError) as info:
        save_full_checkpoint(target, trained, files.config, base_checkpoint_path=files.checkpoint, metadata=_meta(files))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"not enough disk space to save {target}")
    assert message.endswith("free space or change --output_dir")
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]
    assert target.read_bytes() == b"previous model"
    with pytest.raises(UserError, match="not enough disk space"):
        save_full_checkpoint(tmp_path / "new.safetensors", trained, files.config,
                             base_checkpoint_path=files.checkpoint, metadata=_meta(files))
    assert not list(tmp_path.glob("*new*"))

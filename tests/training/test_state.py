"""Training states: exact RNG/optimizer/scheduler round trips, atomic folders, one-line resume errors."""

from __future__ import annotations

import errno
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from library.data.batching import DataPosition
from library.errors import UserError
from library.models.mmdit_config import MMDiTConfig
from library.training.state import (
    LoadedState,
    TrainState,
    capture_rng,
    load_state,
    model_signature,
    restore_rng,
    save_state,
)

CFG = MMDiTConfig(depth=2, hidden_size=64, num_heads=2, pos_embed_max_size=8, context_dim=32, pooled_dim=16)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _signature(model: torch.nn.Module) -> str:
    return model_signature(CFG, {k: v.shape for k, v in model.named_parameters()})


def _draws(generator: torch.Generator) -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.randn(2, generator=generator).tolist(), random.gauss(0, 1), np.random.randn())


def _trained(steps: int = 3):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def _save(directory: Path, kind: str = "full", signature: str | None = None, **state_kw) -> Path:
    model, optimizer, scheduler = _trained()
    state = TrainState(epoch=state_kw.get("epoch", 1), global_step=state_kw.get("global_step", 3),
                       data_position=DataPosition(1, 2), model_kind=kind,
                       model_signature=signature or _signature(model), rng=capture_rng())
    return save_state(directory, state=state, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                      scheduler_state=scheduler.state_dict(), extra={"loss_ema": 0.5})


def test_rng_streams_continue_exactly(tmp_path):
    generator = torch.Generator().manual_seed(123)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws(generator)  # move every stream away from its seed
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians behind
    model, optimizer, scheduler = _trained(0)
    state = TrainState(epoch=0, global_step=0, data_position=DataPosition(), model_kind="full",
                       model_signature="s", rng=capture_rng({"noise": generator}))
    save_state(tmp_path / "st", state=state, model_state=model.state_dict(),
               optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict())
    expected = [_draws(generator) for _ in range(3)]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    fresh = torch.Generator().manual_seed(99)
    loaded = load_state(tmp_path / "st", expected_kind="full", expected_signature="s")
    restore_rng(loaded.state.rng, {"noise": fresh})
    assert [_draws(fresh) for _ in range(3)] == expected


def test_round_trip_restores_training(tmp_path):
    model, optimizer, scheduler = _trained()
    directory = _save(tmp_path / "m-step00000003-state")
    loaded = load_state(directory, expected_kind="full", expected_signature=_signature(model))
    assert isinstance(loaded, LoadedState)
    assert (loaded.state.epoch, loaded.state.global_step, loaded.state.data_position) == (1, 3, DataPosition(1, 2))
    assert loaded.extra == {"loss_ema": 0.5}
    assert sorted(p.name for p in directory.iterdir()) == [
        "extra.pt", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "train_state.json"]
    assert json.loads((directory / "train_state.json").read_text())["global_step"] == 3
    resumed, resumed_opt, resumed_sched = _trained(0)
    resumed.load_state_dict(loaded.model_state)
    resumed_opt.load_state_dict(loaded.optimizer_state)
    resumed_sched.load_state_dict(loaded.scheduler_state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()
    batch = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (resumed, resumed_opt)):  # one more step gives identical weights
        m(batch).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert not list(tmp_path.glob(".*"))


def test_replacing_a_state_leaves_only_the_new_one(tmp_path):
    target = tmp_path / "m-state"
    _save(target, global_step=3)
    _save(target, global_step=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-state"]
    assert json.loads((target / "train_state.json").read_text())["global_step"] == 9


def test_full_disk_keeps_the_old_state(tmp_path, monkeypatch):
    target = _save(tmp_path / "m-state", global_step=3)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(UserError) as info:
        _save(target, global_step=9)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"not enough disk space to save {target}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-state"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(UserError, match="not enough disk space"):
        _save(tmp_path / "new-state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-state"]


@pytest.mark.parametrize("saved,expected,needle", [
    ("lora", "full", "is a lora training state; resume it with sd3_train_network.py"),
    ("lokr", "full", "is a lokr training state; resume it with sd3_train_network.py"),
    ("full", "lora", "is a full training state; resume it with sd3_train.py"),
    ("lokr", "lora", "is a lokr training state, but this run trains lora"),
])
def test_kind_mismatch(tmp_path, saved, expected, needle):
    directory = _save(tmp_path / "s", kind=saved, signature="sig")
    with pytest.raises(UserError, match=needle) as info:
        load_state(directory, expected_kind=expected, expected_signature="sig")
    assert "\n" not in str(info.value)


def test_signature_mismatch_names_both_models(tmp_path):
    model = _model()
    large = MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True)
    theirs = model_signature(large, {k: v.shape for k, v in model.named_parameters()})
    directory = _save(tmp_path / "s", signature=theirs)
    ours = _signature(model)
    assert ours != theirs and ours.startswith("sd3-medium depth=2 hidden=64 tensors=")
    with pytest.raises(UserError) as info:
        load_state(directory, expected_kind="full", expected_signature=ours)
    assert theirs in str(info.value) and ours in str(info.value) and "\n" not in str(info.value)


def test_signature_sees_trainable_shapes():
    a = model_signature(CFG, {"lora_down": (4, 64)})
    assert a == model_signature(CFG, {"lora_down": torch.Size([4, 64])})
    assert a != model_signature(CFG, {"lora_down": (8, 64)})


def test_not_a_state_folder(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        load_state(tmp_path / "missing", expected_kind="full", expected_signature="s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a training state folder"):
        load_state(tmp_path / "empty", expected_kind="full", expected_signature="s")
    (tmp_path / "kohya").mkdir()
    (tmp_path / "kohya" / "train_state.json").write_text('{"current_epoch": 2, "current_step": 500}')
    with pytest.raises(UserError, match="sd-scripts .* --initial_step 500"):
        load_state(tmp_path / "kohya", expected_kind="full", expected_signature="s")


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt", "model.safetensors", "train_state.json"])
def test_corrupt_files(tmp_path, name):
    model = _model()
    directory = _save(tmp_path / "s")
    path = directory / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="corrupt or truncated|truncated") as info:
        load_state(directory, expected_kind="full", expected_signature=_signature(model))
    assert "\n" not in str(info.value) and name in str(info.value)


def test_missing_file(tmp_path):
    model = _model()
    directory = _save(tmp_path / "s")
    (directory / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="optimizer.pt is missing"):
        load_state(directory, expected_kind="full", expected_signature=_signature(model))


def test_optimizer_state_with_plain_objects_loads(tmp_path, caplog):
    from fractions import Fraction

    model, optimizer, scheduler = _trained()
    state = TrainState(epoch=0, global_step=3, data_position=DataPosition(), model_kind="lora",
                       model_signature="s", rng=capture_rng())
    custom = {**optimizer.state_dict(), "d_coef": Fraction(1, 3)}
    save_state(tmp_path / "s", state=state, model_state=model.state_dict(), optimizer_state=custom,
               scheduler_state=scheduler.state_dict())
    with caplog.at_level(logging.WARNING, logger="library.training.state"):
        loaded = load_state(tmp_path / "s", expected_kind="lora", expected_signature="s")
    assert loaded.optimizer_state["d_coef"] == Fraction(1, 3) and loaded.extra == {}
    assert "non-tensor objects" in caplog.text

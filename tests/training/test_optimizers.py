"""Every optimizer name builds and steps; ``--optimizer_args`` are parsed and checked; schedule-free toggles."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import types
from typing import Any

import pytest
import torch

from library.errors import UserError
from library.training.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    is_schedule_free,
    optimizer_eval,
    optimizer_train,
    parse_optimizer_args,
    resolve_optimizer_class,
    uses_relative_step,
)

# Registry names that only the `dadaptation` package provides (pytorch_optimizer has no port).
NEEDS_DADAPTATION = {"dadaptation", "dadaptadampreprint", "dadaptadanip"}
# Learning rates in each optimizer's usual range (adaptive ones want ~1.0).
LRS = {"prodigy": 1.0, "adafactor": 0.0, "sgdnesterov": 1e-2, "sgdnesterov8bit": 1e-2}
# RAdam's first steps are its silent (no-update) warm-up phase: turn it off so two steps move weights.
ARGS = {"radamschedulefree": {"silent_sgd_phase": False}}
ADOPT = "pytorch_optimizer.optimizer.adopt.ADOPT"

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64·128 = 8192 elements >= 4096: bitsandbytes keeps real 8-bit state for this weight.
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 4))


def _lr_for(name: str) -> float:
    if name.startswith("dadapt"):
        return 1.0
    return LRS.get(name, 1e-3 if "lion" not in name else 1e-4)


def _two_steps(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        optimizer.zero_grad()
        x = torch.randn(8, 64, generator=generator)
        model(x).pow(2).mean().backward()
        optimizer.step()


def _assert_stepped(name: str, args: dict[str, Any] | None = None, lr: float = 1e-3) -> torch.optim.Optimizer:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(name, model.parameters(), lr, args or {})
    _two_steps(optimizer, model)
    for old, new in zip(before, model.parameters()):
        assert torch.isfinite(new).all(), name
        assert not torch.equal(old, new.detach()), f"{name} did not change a parameter"
    return optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registry_name_builds_and_steps(name: str) -> None:
    if name in NEEDS_DADAPTATION and importlib.util.find_spec("dadaptation") is None:
        # requirements-test.txt installs dadaptation; without it, the promised error is what we check
        with pytest.raises(UserError, match="pip install dadaptation"):
            resolve_optimizer_class(name)
        return
    optimizer = _assert_stepped(name, ARGS.get(name), lr=_lr_for(name))
    assert isinstance(optimizer, torch.optim.Optimizer)


def test_8bit_state_is_really_8bit() -> None:
    model = _model()
    optimizer = build_optimizer("AdamW8bit", model.parameters(), 1e-3, {})
    _two_steps(optimizer, model)
    big, small = model[0].weight, model[2].weight
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32


@pytest.mark.parametrize("spelling", ["AdamW8bit", "adamw8bit", "ADAMW8BIT"])
def test_names_are_case_insensitive(spelling: str) -> None:
    import bitsandbytes.optim

    assert resolve_optimizer_class(spelling) is bitsandbytes.optim.AdamW8bit


def test_seed_card_adopt_line_builds_and_steps() -> None:
    args = parse_optimizer_args(["cautious=True", "weight_decay=0.05", "weight_decouple=True"])
    optimizer = _assert_stepped(ADOPT, args, lr=3e-5)
    group = optimizer.param_groups[0]
    assert group["cautious"] is True and group["weight_decouple"] is True and group["weight_decay"] == 0.05


def test_bitsandbytes_ademamix_by_class_path() -> None:
    _assert_stepped("bitsandbytes.optim.AdEMAMix8bit", {"alpha": 5.0})


def test_misspelt_key_fails_naming_it_with_suggestion() -> None:
    args = parse_optimizer_args(["cautious=True", "weight_decuple=True"])
    with pytest.raises(UserError) as err:
        build_optimizer(ADOPT, _model().parameters(), 1e-4, args)
    expected = "--optimizer_args: ADOPT does not accept 'weight_decuple' (did you mean 'weight_decouple'?)"
    assert str(err.value) == expected


@pytest.mark.parametrize("name, key", [
    ("adamwschedulefree", "cautious"),  # pytorch_optimizer would swallow it silently
    ("adamw", "betas2"),
    ("adafactor", "relative_steps"),
    ("adamw8bit", "foo"),
])
def test_keys_the_optimizer_does_not_read_are_errors(name: str, key: str) -> None:
    with pytest.raises(UserError, match=f"does not accept '{key}'"):
        build_optimizer(name, _model().parameters(), 1e-4, {key: True})


def test_lr_in_optimizer_args_is_an_error() -> None:
    with pytest.raises(UserError, match="--learning_rate"):
        build_optimizer("adamw", _model().parameters(), 1e-4, {"lr": 1e-3})


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(UserError, match="did you mean 'adamw8bit'") as err:
        resolve_optimizer_class("AdamW9bit")
    assert "pytorch_optimizer.optimizer.adopt.ADOPT" in str(err.value)


@pytest.mark.parametrize("path, fragment", [
    ("pytorch_optimizer.optimizer.nope.ADOPT", "cannot import module 'pytorch_optimizer.optimizer.nope'"),
    ("torch.optim.NoSuchOptimizer", "has no 'NoSuchOptimizer'"),
    ("torch.nn.Linear", "is not a torch.optim.Optimizer class"),
])
def test_bad_class_paths_fail_in_one_line(path: str, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        resolve_optimizer_class(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_parse_optimizer_args_values() -> None:
    parsed = parse_optimizer_args([
        "betas=(0.9,0.99)", "eps=1e-8", "cautious=True", "decouple=true", "use_bias_correction=FALSE",
        "momentum = 0.5", "bare=0.9,0.999", "mode=cosine", "pullback_momentum=none", "expr=a=b",
    ])
    assert parsed == {
        "betas": (0.9, 0.99), "eps": 1e-8, "cautious": True, "decouple": True, "use_bias_correction": False,
        "momentum": 0.5, "bare": (0.9, 0.999), "mode": "cosine", "pullback_momentum": "none", "expr": "a=b",
    }


@pytest.mark.parametrize("item", ["=3", "novalue", "eps=", "1x=2", "weight decay=1"])
def test_parse_optimizer_args_rejects_malformed(item: str) -> None:
    with pytest.raises(UserError) as err:
        parse_optimizer_args([item])
    assert "--optimizer_args" in str(err.value) and "\n" not in str(err.value)


def test_parse_optimizer_args_rejects_duplicates() -> None:
    with pytest.raises(UserError, match="'eps' is given twice"):
        parse_optimizer_args(["eps=1e-8", "eps=1e-6"])


def test_schedule_free_train_eval_toggle() -> None:
    model = _model()
    optimizer = build_optimizer("AdamWScheduleFree", model.parameters(), 1e-3, {})
    assert is_schedule_free(optimizer)
    _two_steps(optimizer, model)
    train_weights = [p.detach().clone() for p in model.parameters()]
    optimizer_eval(optimizer)
    assert all(not g["train_mode"] for g in optimizer.param_groups)
    assert any(not torch.equal(a, p) for a, p in zip(train_weights, model.parameters()))
    optimizer_train(optimizer)
    assert all(g["train_mode"] for g in optimizer.param_groups)
    for a, p in zip(train_weights, model.parameters()):
        torch.testing.assert_close(p.detach(), a)


def test_train_eval_are_noops_for_ordinary_optimizers() -> None:
    model = _model()
    optimizer = build_optimizer("adamw", model.parameters(), 1e-3, {})
    _two_steps(optimizer, model)
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer_eval(optimizer)
    optimizer_train(optimizer)
    assert not is_schedule_free(optimizer)
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))


def test_sgd_nesterov_defaults_and_override() -> None:
    group = build_optimizer("SGDNesterov", _model().parameters(), 1e-2, {}).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    group = build_optimizer("sgdnesterov8bit", _model().parameters(), 1e-2, {"momentum": 0.5}).param_groups[0]
    assert group["betas"][0] == 0.5  # bitsandbytes stores (momentum, dampening); it ignores nesterov


def test_adafactor_relative_step_drops_lr(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-4}, {"params": list(model[2].parameters())}]
    with caplog.at_level(logging.WARNING):
        optimizer = build_optimizer("adafactor", groups, 1e-4, {})
    assert uses_relative_step(optimizer) and optimizer.defaults["lr"] is None
    assert all(g["lr"] is None for g in optimizer.param_groups)
    assert groups[0]["lr"] == 1e-4  # the caller's groups are not modified
    assert "initial lr" in caplog.text and "per-group" in caplog.text


def test_adafactor_fixed_lr(caplog: pytest.LogCaptureFixture) -> None:
    args = parse_optimizer_args(["relative_step=False", "scale_parameter=False", "warmup_init=False"])
    with caplog.at_level(logging.WARNING):
        optimizer = _assert_stepped("adafactor", args, lr=1e-3)
    assert not uses_relative_step(optimizer) and optimizer.param_groups[0]["lr"] == 1e-3
    with caplog.at_level(logging.WARNING):
        build_optimizer("adafactor", _model().parameters(), 1e-3, args, max_grad_norm=1.0)
    assert "--max_grad_norm 0" in caplog.text
    forced = build_optimizer("adafactor", _model().parameters(), 1e-3, {"relative_step": False, "warmup_init": True})
    assert uses_relative_step(forced)


def test_lr_sanity_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        build_optimizer("prodigy", _model().parameters(), 1e-4, {})
        build_optimizer("lion", _model().parameters(), 1e-3, {})
    assert "use about 1.0" in caplog.text and "high for Lion" in caplog.text


def test_prodigy_accepts_prodigyopt_spellings() -> None:
    args = parse_optimizer_args(["decouple=True", "use_bias_correction=True", "safeguard_warmup=True", "d_coef=2"])
    optimizer = _assert_stepped("prodigy", args, lr=1.0)
    group = optimizer.param_groups[0]
    if type(optimizer).__module__.startswith("pytorch_optimizer"):
        assert group["weight_decouple"] is True and group["bias_correction"] is True
    else:
        assert group["decouple"] is True and group["use_bias_correction"] is True
    assert group["d_coef"] == 2


def test_original_package_is_preferred_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = type("Prodigy", (torch.optim.AdamW,), {})
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    assert resolve_optimizer_class("Prodigy") is fake.Prodigy


def test_import_is_light() -> None:
    code = ("import sys, library.training.optimizers; "
            "print([m for m in ('bitsandbytes', 'pytorch_optimizer', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

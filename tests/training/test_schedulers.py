"""LR schedulers: the multipliers against their formulas and against transformers/diffusers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from library.errors import UserError
from library.training.schedulers import (
    SCHEDULES, SchedulerConfig, build_scheduler, constant_with_warmup, cosine, cosine_with_restarts, inverse_sqrt,
    linear, parse_scheduler_args, parse_step_rules, piecewise_constant, polynomial, resolve_steps,
    SCHEDULER_NAMES, warmup_stable_decay,
)

TOTAL = 100


def _sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(scheduler, steps: int = TOTAL + 3) -> list[float]:
    """The lr in effect at optimizer steps 0..steps-1."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _ours(name: str, lr: float = 1.0, **kw) -> list[float]:
    return _lrs(build_scheduler(_sgd(lr), SchedulerConfig(name=name, **kw), TOTAL))


# --- the pure multipliers against their formulas


def test_warmup_then_linear():
    f = lambda s: linear(s, warmup=10, total=TOTAL)  # noqa: E731
    assert [f(0), f(5), f(10), f(55), f(100), f(120)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert [constant_with_warmup(s, warmup=4) for s in (0, 1, 4, 99)] == [0.0, 0.25, 1.0, 1.0]


def test_cosine_and_min_lr():
    assert cosine(5, warmup=10, total=TOTAL) == 0.5
    assert cosine(55, warmup=10, total=TOTAL) == pytest.approx(0.5)
    assert cosine(100, warmup=10, total=TOTAL) == pytest.approx(0.0)
    assert cosine(55, warmup=10, total=TOTAL, min_ratio=0.1) == pytest.approx(0.55)
    assert cosine(100, warmup=10, total=TOTAL, min_ratio=0.1) == pytest.approx(0.1)


def test_cosine_with_restarts():
    f = lambda s: cosine_with_restarts(s, warmup=0, total=TOTAL, num_cycles=2)  # noqa: E731
    assert f(0) == 1.0 and f(25) == pytest.approx(0.5) and f(49) < 0.01
    assert f(50) == 1.0 and f(75) == pytest.approx(0.5) and f(100) == 0.0


def test_polynomial():
    f = lambda s: polynomial(s, warmup=10, total=110, power=2.0, end_ratio=0.1)  # noqa: E731
    assert f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.9 * 0.25 + 0.1)
    assert f(110) == pytest.approx(0.1) and f(200) == 0.1


def test_inverse_sqrt():
    assert inverse_sqrt(2, warmup=4, timescale=4) == 0.5
    assert inverse_sqrt(4, warmup=4, timescale=4) == 1.0
    assert inverse_sqrt(16, warmup=4, timescale=4) == pytest.approx(1 / math.sqrt(4))


def test_warmup_stable_decay():
    f = lambda s, kind: warmup_stable_decay(s, warmup=10, stable=70, decay=20, min_ratio=0.1,  # noqa: E731
                                            decay_type=kind)
    assert f(0, "linear") == pytest.approx(0.1) and f(5, "linear") == pytest.approx(0.55)
    assert f(10, "linear") == 1.0 and f(79, "linear") == 1.0
    assert f(90, "linear") == pytest.approx(0.55) and f(90, "cosine") == pytest.approx(0.55)
    assert f(85, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)) * 0.9 + 0.1)
    assert f(100, "cosine") == 0.1


def test_piecewise_constant():
    rules, last = parse_step_rules("1:10,0.1:20,0.01")
    assert rules == ((10, 1.0), (20, 0.1)) and last == 0.01
    values = [piecewise_constant(s, rules=rules, last=last) for s in (0, 9, 10, 19, 20, 99)]
    assert values == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    with pytest.raises(UserError, match="step_rules"):
        parse_step_rules("1:10,oops")


# --- parity with transformers / diffusers over every step


def _hf(name: str, lr: float = 1.0, warmup: int = 10, **kwargs) -> list[float]:
    from transformers import get_scheduler

    return _lrs(get_scheduler(name, _sgd(lr), num_warmup_steps=warmup, num_training_steps=TOTAL,
                              scheduler_specific_kwargs=kwargs))


PARITY = [
    ("constant_with_warmup", {}, {}),
    ("linear", {}, {}),
    ("cosine", {}, {}),
    ("cosine", {"options": {"num_cycles": 1.5}}, {"num_cycles": 1.5}),
    ("cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
    ("polynomial", {}, {}),
    ("polynomial", {"power": 2.0, "options": {"lr_end": 0.2}}, {"power": 2.0, "lr_end": 0.2}),
    ("polynomial", {"power": 0.5, "min_lr_ratio": 0.1}, {"power": 0.5, "lr_end": 0.1}),
    ("inverse_sqrt", {}, {}),
    ("inverse_sqrt", {"options": {"timescale": 30}}, {"timescale": 30}),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.1}, {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"num_cycles": 3, "min_lr_ratio": 0.2}, {"min_lr_rate": 0.2, "num_cycles": 1.5}),
]


@pytest.mark.parametrize("name,ours,theirs", PARITY, ids=[f"{p[0]}-{i}" for i, p in enumerate(PARITY)])
def test_matches_transformers(name, ours, theirs):
    assert _ours(name, warmup_steps=10, **ours) == pytest.approx(_hf(name, **theirs), abs=1e-7, rel=0)


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_wsd_matches_transformers(decay_type):
    from transformers.optimization import get_wsd_schedule

    theirs = _lrs(get_wsd_schedule(_sgd(), num_warmup_steps=10, num_stable_steps=TOTAL - 10 - 30, num_decay_steps=30,
                                   decay_type=decay_type, min_lr_ratio=0.05, num_cycles=0.5))
    ours = _ours("warmup_stable_decay", warmup_steps=10, decay_steps=30, min_lr_ratio=0.05,
                 options={"decay_type": decay_type})
    assert ours == pytest.approx(theirs, abs=1e-7, rel=0)


def test_diffusers_parity():
    from diffusers.optimization import get_scheduler

    rules = "1:10,0.1:20,0.01:50,0.005"
    theirs = _lrs(get_scheduler("piecewise_constant", _sgd(), step_rules=rules))
    assert _ours("piecewise_constant", options={"step_rules": rules}) == pytest.approx(theirs, abs=1e-7, rel=0)
    theirs = _lrs(get_scheduler("cosine_with_restarts", _sgd(), num_warmup_steps=7, num_training_steps=TOTAL,
                                num_cycles=2))
    assert _ours("cosine_with_restarts", warmup_steps=7, num_cycles=2) == pytest.approx(theirs, abs=1e-7, rel=0)


@pytest.mark.parametrize("name", ["linear", "cosine", "warmup_stable_decay"])
def test_warmup_ratio_percent_and_count_agree(name):
    for count, ratio, percent in ((10, 0.1, "10%"), (29, 0.29, "29%")):
        runs = [_ours(name, warmup_steps=w, decay_steps="20%") for w in (count, ratio, percent, str(ratio))]
        assert runs[0] == runs[1] == runs[2] == runs[3]
        assert runs[0][count] == 1.0 and runs[0][count - 1] < 1.0


# --- every name builds and steps


def _config_for(name: str) -> SchedulerConfig:
    extra = {"piecewise_constant": {"options": {"step_rules": "1:2,0.5"}},
             "cosine_with_min_lr": {"min_lr_ratio": 0.1}}.get(name, {})
    return SchedulerConfig(name=name, warmup_steps=2 if SCHEDULES[name].warmup else 0, **extra)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_name_builds_and_steps(name):
    optimizer = _sgd(0.1)
    scheduler = build_scheduler(optimizer, _config_for(name), 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert 0.0 <= scheduler.get_last_lr()[0] <= 0.1


def test_state_dict_resume():
    cfg = SchedulerConfig(name="cosine_with_restarts", warmup_steps="5%", num_cycles=2)
    first = build_scheduler(_sgd(), cfg, TOTAL)
    expected = _lrs(first, 40)[30:]
    resumed = build_scheduler(_sgd(), cfg, TOTAL)
    _lrs(resumed, 30)
    again = build_scheduler(_sgd(), cfg, TOTAL)
    again.load_state_dict(resumed.state_dict())
    again.optimizer.param_groups[0]["lr"] = again.get_last_lr()[0]
    assert _lrs(again, 10) == pytest.approx(expected)


def test_adafactor_pairing(caplog):
    from transformers.optimization import Adafactor, AdafactorSchedule

    params = [torch.nn.Parameter(torch.ones(4, 4))]
    with pytest.raises(UserError, match="Adafactor"):
        build_scheduler(_sgd(), SchedulerConfig(name="adafactor"), 10)
    fixed = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    with pytest.raises(UserError, match="relative_step"):
        build_scheduler(fixed, SchedulerConfig(name="adafactor"), 10)
    assert isinstance(build_scheduler(fixed, SchedulerConfig(name="cosine"), 10), torch.optim.lr_scheduler.LambdaLR)
    relative = Adafactor(params, lr=None, relative_step=True)
    scheduler = build_scheduler(relative, SchedulerConfig(name="adafactor:1e-3"), 10)
    assert isinstance(scheduler, AdafactorSchedule) and scheduler.get_last_lr() == [1e-3]
    params[0].grad = torch.ones(4, 4)
    relative.step()
    scheduler.step()
    assert 0.0 < scheduler.get_last_lr()[0] < 1e-1
    with caplog.at_level(logging.WARNING):
        assert isinstance(build_scheduler(relative, SchedulerConfig(name="linear"), 10), AdafactorSchedule)
    assert "relative_step" in caplog.text
    with pytest.raises(UserError, match="lr_warmup_steps"):
        build_scheduler(relative, SchedulerConfig(name="adafactor", warmup_steps=2), 10)


# --- dotted classes


def test_dotted_class_with_args():
    cfg = SchedulerConfig(scheduler_type="torch.optim.lr_scheduler.StepLR",
                          options=parse_scheduler_args(["step_size=2", "gamma=0.5"]))
    scheduler = build_scheduler(_sgd(), cfg, 10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert _lrs(scheduler, 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert isinstance(build_scheduler(_sgd(), SchedulerConfig(scheduler_type="StepLR", options={"step_size": 2}), 10),
                      torch.optim.lr_scheduler.StepLR)


def test_dotted_class_errors():
    with pytest.raises(UserError, match=r"'gama'.*did you mean 'gamma'"):
        build_scheduler(_sgd(), SchedulerConfig(scheduler_type="torch.optim.lr_scheduler.StepLR",
                                                options={"step_size": 2, "gama": 0.5}), 10)
    with pytest.raises(UserError, match="step_size"):
        build_scheduler(_sgd(), SchedulerConfig(scheduler_type="torch.optim.lr_scheduler.StepLR"), 10)
    with pytest.raises(UserError, match="cannot import"):
        build_scheduler(_sgd(), SchedulerConfig(scheduler_type="no_such_module.Sched"), 10)
    with pytest.raises(UserError, match="StepLR"):
        build_scheduler(_sgd(), SchedulerConfig(scheduler_type="torch.optim.lr_scheduler.StepLRR"), 10)
    with pytest.raises(UserError, match="lr_warmup_steps"):
        build_scheduler(_sgd(), SchedulerConfig(scheduler_type="StepLR", warmup_steps=3, options={"step_size": 2}), 10)


# --- flag values and mistakes


def test_resolve_steps():
    assert [resolve_steps(v, 200, "--lr_warmup_steps") for v in (None, 0, 5, 0.1, "10%", "25", "0.5", 7.0, "100%")] \
        == [0, 0, 5, 20, 20, 25, 100, 7, 200]
    assert resolve_steps(0.29, 100, "--x") == resolve_steps("29%", 100, "--x") == 29
    assert resolve_steps(0.999, 10, "--x") == 9  # ratios floor, as sd-scripts' int(ratio * total)


@pytest.mark.parametrize("value", [-1, -0.1, "-5%", "150%", 2.5, "abc", True, float("nan")])
def test_resolve_steps_errors(value):
    with pytest.raises(UserError, match="--lr_decay_steps") as info:
        resolve_steps(value, 100, "--lr_decay_steps")
    assert "\n" not in str(info.value)


def test_parse_scheduler_args():
    parsed = parse_scheduler_args(["step_size=2", "gamma=0.5", "step_rules=1:10,0.1:20,0.01", "kind='cosine'"])
    assert parsed == {"step_size": 2, "gamma": 0.5, "step_rules": "1:10,0.1:20,0.01", "kind": "cosine"}
    with pytest.raises(UserError, match="key=value"):
        parse_scheduler_args(["gamma"])


def test_config_mistakes(caplog):
    with pytest.raises(UserError, match=r"did you mean 'cosine'\?\); valid: cosine,"):
        build_scheduler(_sgd(), SchedulerConfig(name="cosin"), 10)
    assert "adafactor" in SCHEDULER_NAMES
    with pytest.raises(UserError, match="constant_with_warmup"):
        build_scheduler(_sgd(), SchedulerConfig(name="constant", warmup_steps="10%"), 100)
    with pytest.raises(UserError, match="min_lr_ratio"):
        build_scheduler(_sgd(), SchedulerConfig(name="cosine_with_min_lr"), 10)
    with pytest.raises(UserError, match="exceed"):
        build_scheduler(_sgd(), SchedulerConfig(name="warmup_stable_decay", warmup_steps=0.6, decay_steps=0.6), 10)
    with pytest.raises(UserError, match="decay_type"):
        build_scheduler(_sgd(), SchedulerConfig(name="warmup_stable_decay", options={"decay_type": "exp"}), 10)
    with pytest.raises(UserError, match=r"'decaytype'.*did you mean 'decay_type'"):
        build_scheduler(_sgd(), SchedulerConfig(name="warmup_stable_decay", options={"decaytype": "linear"}), 10)
    with pytest.raises(UserError, match="step_rules"):
        build_scheduler(_sgd(), SchedulerConfig(name="piecewise_constant"), 10)
    with pytest.raises(UserError, match="learning_rate"):
        build_scheduler(_sgd(1e-8), SchedulerConfig(name="polynomial"), 10)
    with caplog.at_level(logging.WARNING):
        build_scheduler(_sgd(), SchedulerConfig(name="cosine", decay_steps=5), 10)
    assert "ignored" in caplog.text


def test_num_processes_does_not_change_the_schedule():
    cfg = SchedulerConfig(name="cosine", warmup_steps=0.1)
    single = _lrs(build_scheduler(_sgd(), cfg, TOTAL))
    assert _lrs(build_scheduler(_sgd(), cfg, TOTAL, num_processes=4, gradient_accumulation_steps=2)) == single


def test_warmup_longer_than_training_warns_and_keeps_the_count(caplog):
    # sd-scripts accepts a warmup longer than the run (the seed card's 100 warmup steps on a short run)
    assert resolve_steps(101, 100, "--lr_warmup_steps") == 101
    assert "longer than the 100 training steps" in caplog.text

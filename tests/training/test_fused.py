"""Fused optimizer steps and CPU-offloaded checkpoints through the real trainer (sd3_train.main, fp32, CPU).

Every fused run is compared with the plain optimizer on the same seed and data: the saved weights agree
to 1e-6, with a --max_grad_norm small enough that every step is clipped by the *global* norm (the
recorded norms are above it, and equal between the runs). CPU-offloaded checkpointing gives exactly the
weights and losses of plain checkpointing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

import sd3_train
from library.training import engine
from library.training.loop import LoopHooks
from library.training.run_hooks import ChainHooks
from tests.test_sd3_train import _dataset

MAX_NORM = 1e-5
ADAFACTOR = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False"]


def _argv(files, root: Path, *extra: str, steps: int = 3) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--dataset_config", str(root / "dataset.toml" if (root / "dataset.toml").exists() else _dataset(root)), "--output_dir", str(root / "out"), "--output_name", "m",
            "--t5xxl_max_token_length", "8", "--cache_latents", "--cache_text_encoder_outputs",
            "--max_train_steps", str(steps), "--seed", "3", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "1", "--max_grad_norm", str(MAX_NORM), *extra]


@contextmanager
def _recording():
    """Collect the grad norm and loss of every optimizer step of the runs inside the block."""
    seen: dict[str, list[float]] = {"norms": [], "losses": []}
    original = engine.run_loop

    class Record(LoopHooks):
        def on_step_end(self, state, loss, lr):
            seen["norms"].append(state.grad_norm)
            seen["losses"].append(loss)

    def wrapper(*args):
        return original(*args[:9], ChainHooks([args[9], Record()]))

    with mock.patch.object(engine, "run_loop", wrapper):
        yield seen


def _run(files, root: Path, *extra: str, steps: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    from library.models.loading import load_mmdit

    with _recording() as seen:
        assert sd3_train.main(_argv(files, root, *extra, steps=steps)) == 0
    return load_mmdit(root / "out" / "m.safetensors").state_dict(), seen


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Runs by name, each trained once per module."""
    files = tiny_models("sd3-medium")
    done: dict[str, tuple] = {}

    def get(name: str, *extra: str, steps: int = 3):
        if name not in done:
            done[name] = _run(files, tmp_path_factory.mktemp(name), *extra, steps=steps)
        return done[name]

    return get


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


def _assert_clipped_alike(plain: dict, fused: dict) -> None:
    assert len(plain["norms"]) == len(fused["norms"]) == 3
    assert all(n > MAX_NORM for n in plain["norms"])  # every step was clipped by the global norm
    for a, b in zip(plain["norms"], fused["norms"]):
        assert abs(a - b) <= 1e-6 * a


@pytest.mark.slow
def test_fused_backward_pass_adafactor_equals_plain(runs):
    plain_w, plain = runs("adafactor", *ADAFACTOR)
    fused_w, fused = runs("adafactor_fused", *ADAFACTOR, "--fused_backward_pass")
    _assert_clipped_alike(plain, fused)
    _assert_same(plain_w, fused_w)
    base = runs("adamw")[0]
    assert max(float((plain_w[k] - base[k]).abs().max()) for k in base) > 1e-4  # the optimizers differ: not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_blockwise_fused_optimizers_equal_plain(runs, optimizer):
    extra = ADAFACTOR if optimizer == "adafactor" else []
    plain_w, plain = runs(optimizer, *extra)
    fused_w, fused = runs(f"{optimizer}_blockwise", *extra, "--blockwise_fused_optimizers")
    _assert_clipped_alike(plain, fused)
    _assert_same(plain_w, fused_w)


@pytest.mark.slow
def test_accumulation_without_clipping_equals_plain(runs):
    """--max_grad_norm 0 lets micro-batches accumulate; the hooks step on the last one."""
    extra = (*ADAFACTOR, "--gradient_accumulation_steps", "2", "--max_grad_norm", "0")
    plain_w, plain = runs("accumulate", *extra, steps=2)
    fused_w, fused = runs("accumulate_fused", *extra, "--fused_backward_pass", steps=2)
    assert plain["norms"] == fused["norms"] == [None, None]
    _assert_same(plain_w, fused_w)


@pytest.mark.slow
def test_fused_bf16_weights_round_stochastically(tiny_models, tmp_path):
    from library.models.loading import load_mmdit

    files = tiny_models("sd3-medium")
    base = load_mmdit(files.checkpoint).state_dict()
    weights, seen = _run(files, tmp_path, *ADAFACTOR, "--fused_backward_pass", "--mixed_precision", "bf16",
                         "--full_bf16", "--save_precision", "bf16")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    changed = sum(int((weights[k].float() != base[k].to(torch.bfloat16).float()).sum()) for k in base if k != "pos_embed")
    assert changed > 0 and all(n > MAX_NORM for n in seen["norms"])


def test_refusals_are_one_line(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    cases = [
        (["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "needs every micro-batch's gradient"),
        (["--fused_backward_pass", "--blockwise_fused_optimizers"], "exclude each other"),
        (["--cpu_offload_checkpointing"], "needs --gradient_checkpointing"),
        (["--full_fp16", "--mixed_precision", "fp16"], "--full_fp16 needs a GPU"),
        (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
    ]
    for extra, needle in cases:
        code = sd3_train.main(_argv(files, tmp_path, *extra))
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    assert not (tmp_path / "out" / "m.safetensors").exists()


@pytest.mark.slow
def test_fused_backward_pass_refuses_other_optimizers(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    code = sd3_train.main(_argv(files, tmp_path, "--fused_backward_pass", "--optimizer_type", "Lion"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "--blockwise_fused_optimizers" in err[0], err


@pytest.mark.slow
def test_cpu_offload_checkpointing_equals_plain_checkpointing(runs):
    """Same losses and weights, bit for bit (on a CPU the copies are no-ops: this checks the wiring and
    the autograd path; the memory effect shows on a GPU, see bench/gpu_memory.py)."""
    plain_w, plain = runs("checkpointing", "--gradient_checkpointing")
    offload_w, offload = runs("offload", "--gradient_checkpointing", "--cpu_offload_checkpointing")
    assert plain["losses"] == offload["losses"]
    for key in plain_w:
        assert torch.equal(plain_w[key], offload_w[key]), key


def test_disable_mmap_load_reads_the_same_weights(tiny_models, monkeypatch):
    """--disable_mmap_load_safetensors reaches every load of the run and reads identical tensors. (Trained
    weights may still differ by ~3e-8: the buffers' alignment differs, and with it the SIMD summation order.)"""
    from library.config import ModelConfig, RunConfig
    from library.models import loading, safetensors_io, text_encoders
    from library.training.setup import load_models

    files = tiny_models("sd3-medium")
    flags: list[bool] = []

    def spy(*args, **kwargs):
        flags.append(kwargs.get("mmap", True))
        return safetensors_io.load_safetensors(*args, **kwargs)

    loaded = {}
    for mmap in (True, False):
        cfg = RunConfig(model=ModelConfig(pretrained_model_name_or_path=str(files.checkpoint),
                                          tokenizer_cache_dir=str(files.tokenizer_dir), disable_mmap_load_safetensors=not mmap))
        with monkeypatch.context() as patch:
            patch.setattr(loading, "load_safetensors", spy)
            patch.setattr(text_encoders, "load_safetensors", spy)
            loaded[mmap] = load_models(cfg, "cpu", torch.float32).mmdit.state_dict()
        assert len(flags) >= 2 and all(f == mmap for f in flags), flags
        flags.clear()
    assert all(torch.equal(loaded[True][k], loaded[False][k]) for k in loaded[True])


def test_offloaded_checkpoint_gradients_equal_plain(tiny_models):
    """The MMDiT-level switch: identical outputs and gradients with and without the CPU offload."""
    from library.models.loading import load_mmdit

    files = tiny_models("sd35-medium")
    grads = []
    for offload in (False, True):
        model = load_mmdit(files.checkpoint)
        model.gradient_checkpointing, model.cpu_offload_checkpointing = True, offload
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 16, 16, generator=gen)
        ctx, y = torch.randn(1, 7, model.config.context_dim, generator=gen), torch.randn(1, model.config.pooled_dim, generator=gen)
        model(x, torch.tensor([500.0]), ctx, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_check_fused_reasons():
    from library.errors import UserError
    from library.training.fused import check_fused

    check_fused("parameter", accumulation=4, max_grad_norm=0.0)  # accumulation without clipping works
    for kwargs, needle in [
        (dict(accumulation=2, max_grad_norm=1.0), "needs every micro-batch's gradient"),
        (dict(accumulation=1, max_grad_norm=1.0, world_size=2), "before gradients are averaged"),
        (dict(accumulation=1, max_grad_norm=1.0, loss_scaling=True), "fp16 loss scaling"),
    ]:
        with pytest.raises(UserError, match=needle):
            check_fused("block", **kwargs)


def test_fp16_gradients_can_be_unscaled():
    """--full_fp16 under accelerate's loss scaler: torch refuses to unscale fp16 gradients unless allowed."""
    from types import SimpleNamespace

    from library.training.loop import allow_fp16_gradients

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.full_like(p, 8.0)
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="FP16"):
        scaler.unscale_(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    allow_fp16_gradients(SimpleNamespace(scaler=scaler), [p])
    scaler.unscale_(optimizer)
    assert torch.equal(p.grad, torch.full_like(p, 2.0))

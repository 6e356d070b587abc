"""The training loop: exact resume, global-norm clipping, NaN guard, step counting."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from library.data.cli_datasets import DatasetDefaults, blueprint_from_defaults
from library.data.dataset import CacheOptions, TrainingData
from library.errors import UserError
from library.flow.loss import LossSpec
from library.models.loading import load_mmdit
from library.models.prompt_encoding import layout_from_encoders
from library.models.text_encoders import load_text_encoders
from library.models.tokenizers import load_tokenizers
from library.models.vae import load_vae
from library.training.caching import cache_latents, cache_text_outputs
from library.training.loop import LoopSettings, LoopState, run_loop
from library.training.step import StepResult, StepSettings, batch_encoder_outputs, batch_latents, conditioning, flow_step


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    folder = root / "data" / "2_things"
    folder.mkdir(parents=True)
    for i in range(5):
        image = Image.new("RGB", (64, 64) if i % 2 else (96, 64), "white")
        ImageDraw.Draw(image).ellipse((10, 10, 40 + i, 40), fill=(50 * i, 100, 200))
        image.save(folder / f"t{i}.png")
        (folder / f"t{i}.caption").write_text(f"thing {i}, round, shape{i % 2}")
    files = tiny_models("sd3-medium")
    cache = CacheOptions(cache_latents=True, cache_text_encoder_outputs=True, t5_max_length=8, vae_identity="t",
                         encoder_identity="t", keep_in_memory=True)
    defaults = DatasetDefaults(train_data_dir=root / "data", resolution=(64, 64), train_batch_size=2,
                               enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                               shuffle_caption=True, flip_aug=True)
    data = TrainingData(blueprint_from_defaults(defaults), cache, seed=0)
    encoders = load_text_encoders(files.checkpoint)
    cache_latents(data, load_vae(files.checkpoint), batch_size=4, generator=torch.Generator().manual_seed(0), progress=False)
    cache_text_outputs(data, encoders, load_tokenizers(str(files.tokenizer_dir), t5_max_length=8), batch_size=8,
                       progress=False)
    return files, data, encoders


def _parts(files, data, encoders, lr: float = 1e-3):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = load_mmdit(files.checkpoint)
    layout = replace(layout_from_encoders(encoders), context_dim=model.config.context_dim)
    settings = StepSettings(loss=LossSpec(), t5_max_length=8, clip_l_dropout_rate=0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer = accelerator.prepare(model, optimizer)

    def step_fn(batch, gen):
        cond = conditioning(batch_encoder_outputs(batch, None, None), layout, settings, torch.device("cpu"), gen)
        return flow_step(model, batch_latents(batch, None, torch.device("cpu")), cond, settings,
                         loss_weights=batch.loss_weights, generator=gen)

    return accelerator, model, optimizer, scheduler, step_fn


def test_resume_is_bit_identical(setup):
    files, data, encoders = setup
    total, split = 9, 4
    acc, model, opt, sched, step_fn = _parts(files, data, encoders)
    straight = run_loop(acc, model, data, step_fn, opt, sched, LoopSettings(total, 2), LoopState(),
                        torch.Generator().manual_seed(5))
    expected = copy.deepcopy(model.state_dict())
    assert straight.global_step == total

    acc, model, opt, sched, step_fn = _parts(files, data, encoders)
    gen = torch.Generator().manual_seed(5)
    first = run_loop(acc, model, data, step_fn, opt, sched, LoopSettings(split, 2), LoopState(), gen)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict(),
             gen.get_state(), copy.deepcopy(first))
    acc, model, opt, sched, step_fn = _parts(files, data, encoders)  # a fresh process, as after a restart
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    gen = torch.Generator()
    gen.set_state(saved[3])
    resumed = run_loop(acc, model, data, step_fn, opt, sched, LoopSettings(total, 2), saved[4], gen)
    assert resumed.global_step == total and resumed.position == straight.position
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_clipping_is_one_global_norm():
    from accelerate import Accelerator

    from library.training.loop import _update

    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)])
    for i, p in enumerate(layers.parameters()):
        p.grad = torch.full_like(p, float(i + 1))
    before = [p.grad.clone() for p in layers.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in before))
    optimizer = torch.optim.SGD(layers.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    captured = []
    optimizer.step = lambda: captured.extend(p.grad.clone() for p in layers.parameters())  # type: ignore[method-assign]
    _update(Accelerator(cpu=True), list(layers.parameters()), optimizer, scheduler, max_grad_norm=1.0)
    clipped = torch.sqrt(sum((g**2).sum() for g in captured))
    assert abs(clipped.item() - 1.0) < 1e-4
    for b, c in zip(before, captured):  # every tensor scaled by the same factor 1/‖g‖
        assert torch.allclose(c, b / norm, atol=1e-6)


def test_nan_guard_skips_then_stops(setup):
    files, data, encoders = setup
    acc, model, opt, sched, step_fn = _parts(files, data, encoders)
    calls = []

    def nan_step(batch, gen):
        calls.append(1)
        out = step_fn(batch, gen)
        return StepResult(out.loss * float("nan"), out.per_sample, out.sigmas)

    with pytest.raises(UserError, match="NaN/inf for 3 steps"):
        run_loop(acc, model, data, nan_step, opt, sched, LoopSettings(5, 1, max_bad_steps=3), LoopState(),
                 torch.Generator().manual_seed(0))
    assert len(calls) == 3


def test_dataloader_workers_give_the_same_run(setup):
    files, data, encoders = setup
    results = []
    for workers in (0, 1):
        acc, model, opt, sched, step_fn = _parts(files, data, encoders)
        run_loop(acc, model, data, step_fn, opt, sched, LoopSettings(4, 2, data_workers=workers), LoopState(),
                 torch.Generator().manual_seed(2))
        results.append(copy.deepcopy(model.state_dict()))
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key

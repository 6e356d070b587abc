"""Validation loss: fixed σ and noise, no dropout, the same value across runs, a different one for other
weights; the held-out data is read without augmentation; the trainers log it, and TensorBoard gets every tag."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import sd3_train_network
from library.data.dataset import TrainingData
from library.data.spec import AugmentOptions, CaptionOptions, DatasetBlueprint, DatasetSpec, SubsetSpec
from library.flow.loss import LossSpec
from library.models.prompt_encoding import Conditioning
from library.training.validation import validation_loss, validation_plan


class _Tiny(torch.nn.Module):
    """A stand-in denoiser with dropout (which validation must switch off)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(16, 16, 1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t, context, pooled):
        return self.drop(self.proj(x)) * (1 + t.view(-1, 1, 1, 1) / 1000) + pooled.mean()


def _inputs(batch):
    x0 = batch["x0"]
    return x0, Conditioning(context=torch.zeros(x0.shape[0], 4, 8), pooled=torch.ones(x0.shape[0], 8))


def test_validation_loss_is_fixed_and_follows_the_weights():
    torch.manual_seed(0)
    model = _Tiny().eval()
    batches = [{"x0": torch.randn(2, 16, 4, 4)}, {"x0": torch.randn(1, 16, 4, 4)}]
    spec = LossSpec(objective="raw", loss_type="l2")
    rng = torch.get_rng_state()
    first = validation_loss(model, batches, _inputs, spec, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # no global random stream consumed
    assert validation_loss(model, batches, _inputs, spec, seed=3) == first
    assert validation_loss(model, batches, _inputs, spec, seed=4) != first  # the noise comes from the seed
    with torch.no_grad():
        model.proj.weight.add_(0.01)
    assert validation_loss(model, batches, _inputs, spec, seed=3) != first
    # hand computation for one batch and σ = 0.2 … 0.8 with the seed's noise
    torch.set_grad_enabled(False)
    gen, total, count = torch.Generator().manual_seed(3), 0.0, 0
    x0 = batches[0]["x0"]
    for sigma in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.full((2,), sigma)
        pred = model((1 - sigma) * x0 + sigma * noise, s * 1000, None, torch.ones(2, 8))
        total += float(((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).double().sum())
        count += 2
    torch.set_grad_enabled(True)
    assert validation_loss(model, batches[:1], _inputs, spec, seed=3) == pytest.approx(total / count, rel=1e-6)


def test_validation_plan_defaults_to_every_epoch():
    plan = validation_plan(every_n_steps=5, every_n_epochs=None, max_steps=2, seed=1)
    assert (plan.every_n_steps, plan.every_n_epochs, plan.max_steps) == (5, 1, 2)


def test_validation_data_is_plain(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a, b, c, d{i}")
    subset = SubsetSpec(image_dir=folder, num_repeats=3,
                        captions=CaptionOptions(caption_extension=".txt", shuffle_caption=True, caption_dropout_rate=0.5,
                                                caption_prefix="pre, "),
                        augment=AugmentOptions(flip_aug=True, color_aug=True))
    blueprint = DatasetBlueprint((DatasetSpec(resolution=(64, 64), subsets=(subset,), validation_split=0.5),))
    data = TrainingData(blueprint, seed=1)
    held = data.validation_data()
    assert len(data.records) == 2 and len(held.records) == 2 and len(held.samples) == 2  # no repeats
    assert not {r.image_path for r in data.records} & {r.image_path for r in held.records}
    batches = held.epoch_batches(0)
    loads = [[held.load_batch(b, epoch) for b in batches] for epoch in (0, 5)]
    for a, b in zip(*loads):
        assert a.captions == b.captions and torch.equal(a.images, b.images)
    captions = sorted(c for batch in loads[0] for c in batch.captions)
    assert all(c.startswith("pre, a, b, c, d") for c in captions)  # prefix kept, no shuffle, no dropout
    assert TrainingData(DatasetBlueprint((DatasetSpec(resolution=(64, 64), subsets=(subset,)),))).validation_data() is None


def _argv(files, root: Path, name: str, *extra: str) -> list[str]:
    data = root / "data" / "1_dots"
    if not data.exists():
        data.mkdir(parents=True)
        for i in range(4):
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse((4 * i, 8, 40 + 4 * i, 44), fill=(20, 160, 40 * i))
            image.save(data / f"i{i}.png")
            (data / f"i{i}.caption").write_text(f"green dot {i}")
    return ["--pretrained_model_name_or_path", str(files.checkpoint), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--train_data_dir", str(root / "data"), "--resolution", "64", "--output_dir", str(root / name),
            "--output_name", name, "--t5xxl_max_token_length", "16", "--cache_latents", "--cache_text_encoder_outputs",
            "--network_module", "networks.lora_sd3", "--network_train_unet_only", "--network_dropout", "0.3",
            "--max_train_steps", "3",
            "--validation_split", "0.5", "--validate_every_n_steps", "1", *extra]


def _validation_values(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation loss")]


@pytest.mark.slow
def test_trainer_validation_repeats_across_runs_and_tracks_weights(tiny_models, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="library.training.validation")
    files = tiny_models("sd35-medium")
    runs = {}
    for name, lr in (("a", "1e-2"), ("b", "1e-2"), ("c", "3e-2")):
        caplog.clear()
        assert sd3_train_network.main(_argv(files, tmp_path, name, "--seed", "4", "--learning_rate", lr)) == 0
        runs[name] = _validation_values(caplog)
    assert len(runs["a"]) == 4  # steps 1-3, and epoch ends (1 step per epoch: 2 train images, batch 1 -> 2 steps)
    assert runs["a"] == runs["b"]  # same seed, same weights: the same numbers
    assert runs["a"][0] != runs["c"][0]  # other weights: another number
    assert len(set(runs["a"])) > 1  # training moves it


@pytest.mark.slow
def test_tensorboard_gets_every_tag_and_loss_png(tiny_models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = tiny_models("sd35-medium")
    prompts = tmp_path / "p.txt"
    prompts.write_text("green dot --w 32 --h 32 --s 2 --l 1\n")
    logs = tmp_path / "logs"
    argv = _argv(files, tmp_path, "tb", "--log_with", "tensorboard", "--logging_dir", str(logs), "--log_prefix", "run_",
                 "--log_config", "--wandb_api_key", "sk-NEVER-WRITTEN", "--sample_prompts", str(prompts),
                 "--sample_every_n_steps", "2", "--learning_rate", "1e-3")
    assert sd3_train_network.main(argv) == 0
    (run_dir,) = logs.iterdir()
    assert run_dir.name.startswith("run_")
    acc = EventAccumulator(str(run_dir / "network_train"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/current", "loss/average", "loss/epoch", "grad_norm", "loss/validation"):
        assert tag in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3]
    assert any(t.startswith("lr/") for t in tags["scalars"]) and "sigma" in tags["histograms"]
    assert tags["images"], tags
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"sk-NEVER-WRITTEN" not in path.read_bytes(), path
    with Image.open(tmp_path / "tb" / "loss.png") as plot:
        plot.verify()

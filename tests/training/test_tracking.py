"""Training logs: TensorBoard tags read back from the event files, W&B wiring (fake module), secret
redaction, flag errors, and the loss plot."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from library.config import LogConfig
from library.errors import UserError
from library.training.loop import LoopState, average_loss
from library.training.loss_plot import loss_plot, smoothed
from library.training.tracking import REDACTED, Tracker, TrackerHooks, open_tracker, redact

SECRETS = {"wandb_api_key": "sk-SECRET-123", "huggingface_token": "hf_tokSECRET456"}
SETTINGS = {"learning_rate": 1e-4, "t5xxl_max_token_length": 256, **SECRETS,
            "nested": {"auth": {"password": "pw-SECRET-789"}, "items": [{"api_secret": "x-SECRET-0"}]},
            "command": "sd3_train.py --wandb_api_key sk-SECRET-123 --learning_rate 1e-4"}


def _accumulator(logging_dir: Path, name: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = logging_dir.iterdir()
    sizes = {"compressedHistograms": 0, "images": 0, "audio": 0, "scalars": 0, "histograms": 0, "tensors": 0}
    acc = EventAccumulator(str(run_dir / name), size_guidance=sizes)
    acc.Reload()
    return run_dir, acc


def _scalars(acc, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in acc.Scalars(tag)}


def _train(hooks: TrackerHooks, state: LoopState, epochs: list[list[float]]) -> list[tuple]:
    """Feed ``epochs`` of step losses through the hooks as the loop would; returns what each step logged."""
    logged = []
    hooks.on_train_start(state)
    for epoch, losses in enumerate(epochs, start=1):
        for loss in losses:
            state.global_step += 1
            state.loss_history.append(loss)
            step = state.global_step
            state.lrs = {"unet": 1e-3 / step, "text_encoder": 5e-4 / step}
            state.grad_norm = None if step == 2 else 0.5 * step
            state.sigmas = [0.1 * step, 0.2, 0.9]
            hooks.on_step_end(state, loss, state.lrs["unet"])
            logged.append((step, loss, average_loss(state.loss_history)))
            state.sigmas = []
        hooks.on_epoch_end(state, epoch)
    return logged


def test_tensorboard_tags_read_back(tmp_path):
    log = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path / "logs"), log_prefix="lora_")
    tracker = open_tracker(log, default_name="network_train", settings=SETTINGS, is_main=True)
    hooks = TrackerHooks(tracker, plot_path=tmp_path / "out" / "loss.png", is_main=True)
    state = LoopState()
    logged = _train(hooks, state, [[0.9, 0.7, 0.8], [0.5, 0.6]])
    hooks.log_validation(5, 0.42)
    hooks.log_images("000005", 5, [Image.new("RGB", (32, 48), "red"), Image.new("RGB", (64, 32), "blue")])
    hooks.on_train_end(state)

    run_dir, acc = _accumulator(tmp_path / "logs", "network_train")
    assert run_dir.name.startswith("lora_") and len(run_dir.name) == len("lora_") + 14 and run_dir.name[5:].isdigit()
    assert _scalars(acc, "loss/current") == {s: pytest.approx(v, rel=1e-6) for s, v, _ in logged}
    assert _scalars(acc, "loss/average") == {s: pytest.approx(a, rel=1e-6) for s, _, a in logged}
    assert _scalars(acc, "loss/epoch") == {3: pytest.approx(0.8, rel=1e-6), 5: pytest.approx(0.55, rel=1e-6)}
    assert _scalars(acc, "lr/unet") == {s: pytest.approx(1e-3 / s, rel=1e-6) for s in range(1, 6)}
    assert _scalars(acc, "lr/text_encoder") == {s: pytest.approx(5e-4 / s, rel=1e-6) for s in range(1, 6)}
    assert _scalars(acc, "grad_norm") == {s: pytest.approx(0.5 * s) for s in (1, 3, 4, 5)}  # step 2: not clipped
    assert _scalars(acc, "loss/validation") == {5: pytest.approx(0.42)}
    histograms = {event.step: event.histogram_value for event in acc.Histograms("sigma")}
    assert sorted(histograms) == [1, 2, 3, 4, 5]
    assert histograms[4].num == 3
    assert (histograms[4].min, histograms[4].max) == (pytest.approx(0.2), pytest.approx(0.9))
    assert histograms[3].sum == pytest.approx(0.3 + 0.2 + 0.9)
    assert sorted(acc.Tags()["images"]) == ["samples/00", "samples/01"]
    (image,) = acc.Images("samples/01")
    assert (image.step, image.width, image.height) == (5, 64, 32)
    assert "config/text_summary" not in acc.Tags()["tensors"]  # settings only with --log_config
    with Image.open(tmp_path / "out" / "loss.png") as plot:
        plot.verify()
    with Image.open(tmp_path / "out" / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (1200, 800)


def test_log_config_writes_no_secret(tmp_path):
    log = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path), log_config=True, log_tracker_name="mine")
    tracker = open_tracker(log, default_name="finetuning", settings=SETTINGS, is_main=True)
    tracker.scalars({"loss/current": 1.0}, 1)
    tracker.close()
    blobs = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert b"learning_rate" in blobs and b"t5xxl_max_token_length" in blobs and b"wandb_api_key" in blobs
    assert b"SECRET" not in blobs
    assert list(tmp_path.glob("*/mine/events.out.tfevents.*"))


def test_without_log_config_no_settings_are_written(tmp_path):
    log = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path))
    open_tracker(log, default_name="finetuning", settings=SETTINGS, is_main=True).close()
    blobs = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert b"learning_rate" not in blobs and b"SECRET" not in blobs


def test_redact_names_values_and_nesting():
    out = redact(SETTINGS)
    assert out["wandb_api_key"] == REDACTED and out["huggingface_token"] == REDACTED
    assert out["nested"] == {"auth": REDACTED, "items": [{"api_secret": REDACTED}]}
    assert out["command"] == f"sd3_train.py --wandb_api_key {REDACTED} --learning_rate 1e-4"
    assert out["learning_rate"] == 1e-4 and out["t5xxl_max_token_length"] == 256
    assert redact({"Hub_Token": None, "path": Path("a/b")}) == {"Hub_Token": None, "path": "a/b"}
    assert SETTINGS["wandb_api_key"] == "sk-SECRET-123"  # the input is not changed
    assert redact({"api_retries": 1, "note": "1 True"}) == {"api_retries": REDACTED, "note": "1 True"}


class _Recorder:
    """A sink that remembers every call."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self.closed = False

    def scalars(self, values, step):
        for tag, value in values.items():
            self.calls.setdefault(tag, []).append((step, value))

    def histogram(self, tag, values, step):
        self.calls.setdefault(tag, []).append((step, list(values)))

    def images(self, tag, images, step, caption):
        self.calls.setdefault(tag, []).append((step, [im.size for im in images], caption))

    def text(self, tag, text, step):
        self.calls.setdefault(tag, []).append((step, text))

    def close(self):
        self.closed = True


def test_resume_epoch_mean_plot_and_close(tmp_path):
    recorder = _Recorder()
    state = LoopState(global_step=10, loss_history=[5.0] * 10)  # restored history of a resumed run
    hooks = TrackerHooks(Tracker([recorder]), plot_path=tmp_path / "loss.png", is_main=True)
    _train(hooks, state, [[1.0, 3.0], []])  # the second "epoch" trained nothing: no loss/epoch for it
    hooks.log_images("e000002", 12, [Image.new("RGB", (8, 8))])
    hooks.on_train_end(state)
    assert recorder.calls["loss/epoch"] == [(12, 2.0)]  # only the steps trained since the resume
    assert recorder.calls["loss/average"][-1] == (12, pytest.approx(54.0 / 12))
    assert recorder.calls["samples/00"] == [(12, [(8, 8)], "e000002_00")]
    assert recorder.closed
    hooks.close()  # idempotent
    with Image.open(tmp_path / "loss.png") as plot:
        assert plot.size == (1200, 800)


def test_non_main_process_logs_and_plots_nothing(tmp_path):
    log = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path / "logs"), log_config=True)
    tracker = open_tracker(log, default_name="finetuning", settings=SETTINGS, is_main=False)
    assert tracker is not None and tracker.sinks == []
    hooks = TrackerHooks(tracker, plot_path=tmp_path / "loss.png", is_main=False)
    _train(hooks, LoopState(), [[1.0, 2.0]])
    hooks.on_train_end(LoopState(global_step=2, loss_history=[1.0, 2.0]))
    assert not (tmp_path / "logs").exists() and not (tmp_path / "loss.png").exists()
    assert open_tracker(LogConfig(), default_name="finetuning", settings={}, is_main=True) is None


def test_plot_without_tracker(tmp_path):
    hooks = TrackerHooks(None, plot_path=tmp_path / "sub" / "loss.png", is_main=True)
    _train(hooks, LoopState(), [[1.0, math.nan, 0.5]])
    hooks.on_train_end(LoopState(global_step=3, loss_history=[1.0, math.nan, 0.5]))
    with Image.open(tmp_path / "sub" / "loss.png") as plot:
        assert plot.size == (1200, 800)


def _fake_wandb() -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.calls = {"login": [], "init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            module.calls["log"].append((step, values))

        def finish(self):
            module.calls["finish"] += 1

    def init(**kwargs):
        module.calls["init"].append(kwargs)
        return Run()

    module.init = init
    module.login = lambda key: module.calls["login"].append(key)
    module.Histogram = lambda values: ("histogram", tuple(values))
    module.Image = lambda image, caption=None: ("image", image.size, caption)
    module.Html = lambda html: ("html", html)
    return module


def test_wandb_sink_wiring(tmp_path, monkeypatch):
    fake = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("library.training.tracking._require_package", lambda kind: None)
    extra = tmp_path / "trackers.toml"
    extra.write_text('[wandb]\nentity = "team"\ntags = ["sd3"]\n[tensorboard]\nflush_secs = 5\n')
    log = LogConfig(log_with="wandb", logging_dir=str(tmp_path / "logs"), log_config=True, wandb_run_name="try1",
                    wandb_api_key=SECRETS["wandb_api_key"], log_tracker_config=str(extra))
    tracker = open_tracker(log, default_name="network_train", settings=SETTINGS, is_main=True)
    hooks = TrackerHooks(tracker, plot_path=None, is_main=True)
    _train(hooks, LoopState(), [[0.25]])
    hooks.log_images("000001", 1, [Image.new("RGB", (16, 8))])
    hooks.on_train_end(LoopState(global_step=1, loss_history=[0.25]))
    (init,) = fake.calls["init"]
    assert fake.calls["login"] == [SECRETS["wandb_api_key"]]
    assert init["project"] == "network_train" and init["name"] == "try1" and init["entity"] == "team"
    assert init["tags"] == ["sd3"] and Path(init["dir"]).parent == tmp_path / "logs"
    assert init["config"]["wandb_api_key"] == REDACTED and "SECRET" not in repr(init["config"])
    logged = {tag: (step, value) for step, values in fake.calls["log"] for tag, value in values.items()}
    assert logged["loss/current"] == (1, 0.25) and logged["lr/unet"] == (1, pytest.approx(1e-3))
    assert logged["sigma"] == (1, ("histogram", (pytest.approx(0.1), 0.2, 0.9)))
    assert logged["samples/00"] == (1, [("image", (16, 8), "000001_00")])
    assert logged["loss/epoch"] == (1, 0.25) and fake.calls["finish"] == 1


@pytest.mark.parametrize("log_with", ["wandb", "all"])
def test_missing_wandb_is_a_user_error(tmp_path, monkeypatch, log_with):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    log = LogConfig(log_with=log_with, logging_dir=str(tmp_path))
    with pytest.raises(UserError, match="needs the wandb package: pip install wandb"):
        open_tracker(log, default_name="finetuning", settings={}, is_main=False)


def test_missing_tensorboard_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        open_tracker(LogConfig(log_with="tensorboard", logging_dir=str(tmp_path)), default_name="x", settings={},
                     is_main=True)


def test_tensorboard_needs_logging_dir():
    with pytest.raises(UserError, match="--logging_dir"):
        open_tracker(LogConfig(log_with="tensorboard"), default_name="finetuning", settings={}, is_main=True)


@pytest.mark.parametrize("text, match", [
    ("[wandbb]\nentity = 1\n", "did you mean 'wandb'"),
    ("[tensorboard]\nflush_sec = 5\n", "did you mean 'flush_secs'"),
    ("wandb = 3\n", "must be a table"),
    ("[wandb\n", "not valid TOML"),
])
def test_tracker_config_errors(tmp_path, text, match):
    path = tmp_path / "trackers.toml"
    path.write_text(text)
    log = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path), log_tracker_config=str(path))
    with pytest.raises(UserError, match=match):
        open_tracker(log, default_name="finetuning", settings={}, is_main=True)
    missing = LogConfig(log_with="tensorboard", logging_dir=str(tmp_path), log_tracker_config=str(tmp_path / "no"))
    with pytest.raises(UserError, match="not found"):
        open_tracker(missing, default_name="finetuning", settings={}, is_main=True)


def test_smoothed_matches_hand_computation():
    # s = 0.5: m1 = 0.5 -> 0.5/0.5 = 1; m2 = 0.25 + 1 = 1.25 -> 1.25/0.75; m3 = 0.625 + 1.5 = 2.125 -> 2.125/0.875
    assert smoothed([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    out = smoothed([1.0, math.inf, 2.0], 0.5)  # the non-finite point is NaN and does not count
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(5 / 3)
    assert smoothed([4.0, 1.0], 0.0) == [4.0, 1.0]
    assert smoothed([], 0.9) == []
    with pytest.raises(UserError, match="smoothing"):
        smoothed([1.0], 1.0)


@pytest.mark.parametrize("losses, lrs", [([], []), ([0.3], [1e-4]), ([math.nan, math.inf], [math.nan, 1e-4]),
                                         ([2.0, 2.0, math.nan, 1.0, -math.inf, 0.5], [1e-4] * 6)])
def test_loss_plot_edge_cases(tmp_path, losses, lrs):
    path = loss_plot(losses, lrs, tmp_path / "loss.png", first_step=7, size=(640, 480))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 480)
        assert image.convert("L").getextrema()[0] < 100  # something was drawn
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left

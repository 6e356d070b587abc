"""tools/compare_checkpoints.py end to end on a miniature model: network and full-checkpoint folders give
a labelled grid of (columns × W, rows × H) plus the label bands, one column per file in step order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.inference.compare import label_bands, order_key, Candidate
from library.models.loading import load_mmdit
from library.models.safetensors_io import load_safetensors, read_metadata, save_safetensors
from library.models.saving import save_sd3_checkpoint
from library.models.text_encoders import load_text_encoders
from networks import lora_sd3

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import compare_checkpoints  # noqa: E402
import sd3_minimal_inference  # noqa: E402

SIZE = 64
SAMPLING = ["--width", str(SIZE), "--height", str(SIZE), "--steps", "2", "--seed", "7", "--device", "cpu"]


def _lora(files, path: Path, seed: int, metadata: dict[str, str]) -> None:
    mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
    network = lora_sd3.create_network(1.0, 4, 4.0, None, encoders, mmdit)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    network.save_weights(path, metadata=metadata)


def _cells(grid: Image.Image, columns: int, rows: int) -> list[list[np.ndarray]]:
    left, top = label_bands(SIZE)
    pixels = np.asarray(grid)
    return [[pixels[top + r * SIZE:top + (r + 1) * SIZE, left + c * SIZE:left + (c + 1) * SIZE] for r in range(rows)]
            for c in range(columns)]


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red square on white\na blue circle --n green\n")
    return path


def test_network_folder_grid_in_step_order(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    runs = tmp_path / "run"
    runs.mkdir()
    _lora(files, runs / "run-000003.safetensors", 1, {"ss_steps": "30", "ss_epoch": "3"})
    _lora(files, runs / "run-step00000010.safetensors", 2, {"ss_steps": "10"})
    _lora(files, runs / "run.safetensors", 3, {"ss_steps": "40"})
    save_safetensors({"latents_0000": torch.zeros(1, 16, 8, 8)}, runs / "latents.safetensors")  # skipped
    output = tmp_path / "grid.png"
    argv = ["--checkpoint_dir", str(runs), "--ckpt_path", str(files.checkpoint), "--tokenizer_cache_dir",
            str(files.tokenizer_dir), "--prompt_file", str(_prompts(tmp_path)), "--include_base", "--output", str(output)]
    assert compare_checkpoints.main(argv + SAMPLING) == 0
    order = ["run-step00000010.safetensors", "run-000003.safetensors", "run.safetensors"]
    assert capsys.readouterr().out.splitlines()[0] == "columns: " + ", ".join(order)
    grid = Image.open(output)
    left, top = label_bands(SIZE)
    assert grid.size == (left + 4 * SIZE, top + 2 * SIZE) and left > 0 and top > 0
    assert grid.text["parameters"].splitlines()[0] == "columns: base model, " + ", ".join(order)
    cells = _cells(grid.convert("RGB"), 4, 2)
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(cells[a][0].astype(int) - cells[b][0].astype(int)).max() > 8  # every file shows
    # the column of run.safetensors is what the inference script renders with that LoRA
    single = tmp_path / "single"
    assert sd3_minimal_inference.main(["--ckpt_path", str(files.checkpoint), "--tokenizer_cache_dir",
                                       str(files.tokenizer_dir), "--prompt_file", str(_prompts(tmp_path)),
                                       "--lora_weights", str(runs / "run.safetensors"), "--output_dir", str(single)]
                                      + SAMPLING) == 0
    rendered = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(single.glob("*.png"))]
    for row, image in enumerate(rendered):
        assert np.abs(image.astype(int) - cells[3][row].astype(int)).max() <= 1


def test_checkpoint_folder_grid(tiny_models, tmp_path):
    files = tiny_models("sd3-medium")
    everything = load_safetensors(files.checkpoint)
    others = {k: v for k, v in everything.items() if not k.startswith("model.diffusion_model.")}
    vae = {k: v for k, v in others.items() if k.startswith("first_stage_model.")}
    text = {k: v for k, v in others.items() if k.startswith("text_encoders.")}
    base_meta = read_metadata(files.checkpoint)
    saves = tmp_path / "saves"
    for name, steps, scale in (("ft-000001.safetensors", "100", 1.2), ("ft-step00000050.safetensors", "50", 0.8)):
        state = {k: v * scale if v.dim() == 2 else v for k, v in load_mmdit(files.checkpoint).state_dict().items()}
        save_sd3_checkpoint(saves / name, state, files.config, metadata={**base_meta, "ss_steps": steps},
                            vae_tensors=vae, text_encoder_tensors=text)
    output = tmp_path / "ft.png"
    argv = ["--checkpoint_dir", str(saves), "--tokenizer_cache_dir", str(files.tokenizer_dir),
            "--prompt", "a green triangle", "--output", str(output), "--cfg_scale", "1.0"]
    assert compare_checkpoints.main(argv + SAMPLING) == 0
    grid = Image.open(output)
    left, top = label_bands(SIZE)
    assert grid.size == (left + 2 * SIZE, top + SIZE)
    assert grid.text["parameters"].splitlines()[0] == "columns: ft-step00000050.safetensors, ft-000001.safetensors"
    first, second = _cells(grid.convert("RGB"), 2, 1)
    assert np.abs(first[0].astype(int) - second[0].astype(int)).max() > 8
    swapped = tmp_path / "ft_swap.png"  # block swap, re-attached for every checkpoint, renders the same grid
    assert compare_checkpoints.main([*argv[:-3], str(swapped), *argv[-2:], "--blocks_to_swap", "1"] + SAMPLING) == 0
    assert np.array_equal(np.asarray(Image.open(swapped).convert("RGB")), np.asarray(grid.convert("RGB")))


def test_order_key_puts_steps_then_epochs_then_the_rest():
    names = [Candidate(Path("z.safetensors"), "network"), Candidate(Path("e.safetensors"), "network", epoch=2),
             Candidate(Path("b.safetensors"), "network", step=300), Candidate(Path("a.safetensors"), "network", step=20)]
    assert [c.path.stem for c in sorted(names, key=order_key)] == ["a", "b", "e", "z"]


@pytest.mark.parametrize("problem", ["no_base", "missing_dir", "not_png", "empty"])
def test_bad_input_is_one_line_and_writes_nothing(tiny_models, tmp_path, capsys, problem):
    files = tiny_models("sd3-medium")
    runs = tmp_path / "run"
    runs.mkdir()
    if problem != "empty":
        _lora(files, runs / "run.safetensors", 1, {"ss_steps": "1"})
    argv = ["--checkpoint_dir", str(runs if problem != "missing_dir" else tmp_path / "nowhere"),
            "--tokenizer_cache_dir", str(files.tokenizer_dir), "--output", str(tmp_path / "grid.png")]
    if problem != "no_base":
        argv += ["--ckpt_path", str(files.checkpoint)]
    if problem == "not_png":
        argv[argv.index("--output") + 1] = str(tmp_path / "grid.jpg")
    assert compare_checkpoints.main(argv + SAMPLING) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not list(tmp_path.glob("grid.*")) and not list(tmp_path.glob(".grid*"))

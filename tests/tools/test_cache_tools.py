"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py end to end on a miniature model."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import cache_latents  # noqa: E402
import cache_text_encoder_outputs  # noqa: E402


def _images(root: Path) -> Path:
    folder = root / "data" / "3_shapes"
    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (96, 64), (64, 96)]):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).rectangle((8, 8, 40, 40), fill=(40 * i, 120, 200))
        image.save(folder / f"s{i}.png")
        (folder / f"s{i}.caption").write_text(f"square, blue, number {i}")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.caption").write_text("broken")
    return root / "data"


def test_cache_tools_write_reuse_and_report(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    data = _images(tmp_path)
    common = ["--pretrained_model_name_or_path", str(files.checkpoint), "--train_data_dir", str(data),
              "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
              "--bucket_reso_steps", "16"]
    assert cache_latents.main(common + ["--vae_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 encoded" in out and "1 failed" in out and "broken.png" in out
    assert len(list((data / "3_shapes").glob("*_sd3.npz"))) == 3
    assert cache_latents.main(common) == 0
    assert "0 encoded, 3 up to date" in capsys.readouterr().out
    te = common + ["--tokenizer_cache_dir", str(files.tokenizer_dir), "--t5xxl_max_token_length", "16",
                   "--shuffle_caption", "--caption_variants", "3"]
    assert cache_text_encoder_outputs.main(te) == 0
    assert len(list((data / "3_shapes").glob("*_sd3_te.npz"))) == 3  # the unreadable image is left out
    (data / "3_shapes" / "s1.caption").write_text("circle, red")
    assert cache_text_encoder_outputs.main(te) == 0
    assert "1 encoded, 2 up to date" in capsys.readouterr().out


def test_cache_tool_errors_are_one_line(tmp_path, capsys):
    code = cache_latents.main(["--train_data_dir", str(tmp_path / "missing"), "--resolution", "64",
                               "--pretrained_model_name_or_path", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")


def test_debug_dataset_writes_report_and_sheet(tmp_path, capsys):
    data = _images(tmp_path)
    code = cache_latents.main(["--train_data_dir", str(data), "--resolution", "64", "--enable_bucket",
                               "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                               "--debug_dataset", "--output_dir", str(tmp_path / "dbg")])
    out = capsys.readouterr().out
    assert code == 0 and "batches per epoch" in out
    assert (tmp_path / "dbg" / "debug_dataset_epoch0.png").is_file()

"""Quick-start demo: fine-tune a miniature SD3.5-Medium on drawn shapes, then sample it. No downloads.

    python tools/train_demo.py [--output_dir outputs/demo] [--steps 300]

Builds (once) a miniature model with random weights in the real file formats, draws a small image
set with tag captions, caches latents and text-encoder outputs, trains with sd3_train.py's engine,
saves a checkpoint, renders one image per concept with sd3_minimal_inference.py and prints where
everything is. About two minutes on 2 CPU cores.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCEPTS = {"red circle": ((220, 40, 40), "ellipse"), "blue square": ((40, 70, 220), "rectangle"),
            "green triangle": ((40, 170, 60), "polygon")}


def draw_images(folder: Path, per_concept: int = 6) -> None:
    """Project-made training images: one shape per picture, tag captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, (color, shape) in CONCEPTS.items():
        for i in range(per_concept):
            image = Image.new("RGB", (128, 128), (245, 242, 235))
            draw = ImageDraw.Draw(image)
            x, y, size = rng.randint(10, 40), rng.randint(10, 40), rng.randint(56, 76)
            if shape == "polygon":
                draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=color)
            else:
                getattr(draw, shape)((x, y, x + size, y + size), fill=color)
            stem = f"{name.replace(' ', '_')}_{i:02d}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.caption").write_text(f"{name}, simple shape, flat color")


def main(argv: list[str] | None = None) -> int:
    from library.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    import sd3_minimal_inference
    import sd3_train
    from library.models.tiny.factory import make_tiny_model

    start = time.perf_counter()
    out = args.output_dir
    model_dir = out / "tiny_model"
    if not (model_dir / "sd35-medium.safetensors").is_file():
        make_tiny_model(model_dir, "sd35-medium", seed=0)
    draw_images(out / "images" / "4_shapes")
    train = ["--pretrained_model_name_or_path", str(model_dir / "sd35-medium.safetensors"),
             "--tokenizer_cache_dir", str(model_dir / "tokenizers"), "--train_data_dir", str(out / "images"),
             "--resolution", "128", "--train_batch_size", "4", "--max_train_steps", str(args.steps),
             "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "5%",
             "--optimizer_type", "AdamW", "--cache_latents", "--cache_text_encoder_outputs",
             "--t5xxl_max_token_length", "32", "--model_prediction_type", "raw", "--seed", "1",
             "--output_dir", str(out / "model"), "--output_name", "shapes", "--save_precision", "fp32"]
    if sd3_train.main(train) != 0:
        return 2
    checkpoint = out / "model" / "shapes.safetensors"
    samples = out / "samples"
    for seed, prompt in enumerate(CONCEPTS):
        code = sd3_minimal_inference.main(["--ckpt_path", str(checkpoint), "--tokenizer_cache_dir",
                                           str(model_dir / "tokenizers"), "--clip_l", str(model_dir / "clip_l.safetensors"),
                                           "--clip_g", str(model_dir / "clip_g.safetensors"),
                                           "--t5xxl", str(model_dir / "t5xxl.safetensors"), "--prompt", prompt, "--width", "128",
                                           "--height", "128", "--steps", "20", "--cfg_scale", "1.0", "--shift", "1.0",
                                           "--seed", str(seed), "--output_dir", str(samples),
                                           "--t5xxl_token_length", "32"])
        if code != 0:
            return code
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    print(f"  miniature base model: {model_dir}")
    print(f"  training images:      {out / 'images'}")
    print(f"  trained checkpoint:   {checkpoint}")
    print(f"  samples:              {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Full fine-tuning of SD3 / SD3.5 (MMDiT, optionally CLIP-L/G and T5) with sd-scripts' flags.

    accelerate launch sd3_train.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_model \
        --mixed_precision bf16 --optimizer_type adamw8bit --learning_rate 5e-5 --max_train_steps 2000 \
        --cache_latents --cache_text_encoder_outputs --training_shift 3 --weighting_scheme logit_normal

`python sd3_train.py --help` lists every flag; `--config_file run.toml` reads the same names.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _run(argv: list[str] | None) -> Path | None:
    """One run (or, with --stages, the curriculum); returns the final model file (None when nothing trains)."""
    from library.cli.train import TrainingRun, start_training

    start = start_training(argv, _run, network=False)
    if not isinstance(start, TrainingRun):
        return start
    from library.training.trainer import train_full

    final = train_full(start.cfg, start.blueprint, start.cache, vae_batch_size=start.vae_batch_size,
                       text_batch_size=start.text_batch_size)
    print(f"saved {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    return run_command(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())

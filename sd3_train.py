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
    from library.cli import data as data_flags
    from library.cli import train as train_flags

    cfg, ns = train_flags.parse_train_args(argv)
    if ns.stages:
        from library.cli.stages import run_stages

        return run_stages(argv, _run, network=False)
    if ns.output_config:
        print(f"wrote {train_flags.write_output_config(cfg, ns)}")
        return None
    blueprint = data_flags.dataset_blueprint(ns)
    if ns.debug_dataset:
        from library.data.dataset import TrainingData
        from library.data.debug_view import write_debug_view

        report, png = write_debug_view(TrainingData(blueprint, seed=cfg.train.seed or 0), cfg.save.output_dir)
        print(report, f"contact sheet: {png}", sep="\n")
        return None
    from library.training.setup import make_work_dir
    from library.training.trainer import train_full

    cache = data_flags.cache_options(ns, t5_max_length=cfg.model.t5xxl_max_token_length,
                                     apply_lg_attn_mask=cfg.model.apply_lg_attn_mask,
                                     apply_t5_attn_mask=cfg.model.apply_t5_attn_mask, temp_dir=make_work_dir(cfg.save.output_dir))
    final = train_full(cfg, blueprint, cache, vae_batch_size=ns.vae_batch_size,
                       text_batch_size=ns.text_encoder_batch_size or cfg_batch(ns))
    print(f"saved {final}")
    return final


def cfg_batch(ns) -> int:
    return max(1, getattr(ns, "train_batch_size", None) or 1)


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    return run_command(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())

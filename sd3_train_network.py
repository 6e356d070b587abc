"""Train LoRA / LoKr networks for SD3 / SD3.5 with sd-scripts' flags.

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora \
        --network_module networks.lora_sd3 --network_dim 16 --network_alpha 16 \
        --mixed_precision bf16 --fp8_base --optimizer_type adamw8bit --learning_rate 1e-4 \
        --max_train_steps 2000 --cache_latents --cache_text_encoder_outputs --network_train_unet_only

`python sd3_train_network.py --help` lists every flag; `--config_file run.toml` reads the same names.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _builder(cfg):
    from library.errors import UserError
    from library.training.network_files import parse_network_args
    from networks.training import NetworkSpec, SD3NetworkBuilder

    net = cfg.network
    try:
        args = parse_network_args(net.network_args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    multipliers = net.base_weights_multiplier or (1.0,) * len(net.base_weights)
    spec = NetworkSpec(module=net.network_module or "", dim=net.network_dim, alpha=net.network_alpha,
                       dropout=net.network_dropout, args=args, weights=net.network_weights,
                       dim_from_weights=net.dim_from_weights, multiplier=net.network_multiplier,
                       base_weights=tuple(zip(net.base_weights, multipliers)))
    if not spec.module:
        raise UserError("--network_module is required (networks.lora_sd3 or networks.lokr_sd3)")
    return SD3NetworkBuilder(spec)


def _run(argv: list[str] | None) -> Path | None:
    """One run (or, with --stages, the curriculum); returns the final model file (None when nothing trains)."""
    from library.cli.train import TrainingRun, start_training

    start = start_training(argv, _run, network=True)
    if not isinstance(start, TrainingRun):
        return start
    builder = _builder(start.cfg)
    from library.training.network_trainer import train_network

    final = train_network(start.cfg, start.blueprint, start.cache, builder, vae_batch_size=start.vae_batch_size,
                          text_batch_size=start.text_batch_size)
    print(f"saved {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    return run_command(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())

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
    from library.cli import data as data_flags
    from library.cli import train as train_flags

    cfg, ns = train_flags.parse_train_args(argv, network=True)
    if ns.stages:
        from library.cli.stages import run_stages

        return run_stages(argv, _run, network=True)
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
    builder = _builder(cfg)
    from library.training.network_trainer import train_network
    from library.training.setup import make_work_dir

    cache = data_flags.cache_options(ns, t5_max_length=cfg.model.t5xxl_max_token_length,
                                     apply_lg_attn_mask=cfg.model.apply_lg_attn_mask,
                                     apply_t5_attn_mask=cfg.model.apply_t5_attn_mask,
                                     temp_dir=make_work_dir(cfg.save.output_dir))
    final = train_network(cfg, blueprint, cache, builder, vae_batch_size=ns.vae_batch_size,
                          text_batch_size=ns.text_encoder_batch_size or max(1, ns.train_batch_size or 1))
    print(f"saved {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    from library.cli import run_command

    return run_command(lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())

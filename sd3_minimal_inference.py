"""Generate images with an SD3 / SD3.5 checkpoint (sd-scripts' flags plus samplers, schedulers, SLG).

    python sd3_minimal_inference.py --ckpt_path sd3.5_medium.safetensors --t5xxl t5xxl_fp16.safetensors \
        --tokenizer_cache_dir tokenizers --prompt "a cat --w 1024 --h 1024 --d 1" --bf16
    python sd3_minimal_inference.py --demo          # miniature model, no downloads
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from library.errors import UserError


def _demo_sources(ns) -> None:
    """Point the namespace at a miniature model (built once under OUTPUT_DIR/tiny_model)."""
    from library.models.tiny.factory import make_tiny_model

    folder = Path(ns.output_dir) / "tiny_model"
    if not (folder / "sd35-medium.safetensors").is_file():
        make_tiny_model(folder, "sd35-medium", seed=0)
    ns.ckpt_path, ns.tokenizer_cache_dir = str(folder / "sd35-medium.safetensors"), str(folder / "tokenizers")
    ns.width, ns.height = min(ns.width, 128), min(ns.height, 128)
    ns.steps = min(ns.steps, 20)


def _interactive(models, job, run_job) -> None:
    from library.inference.prompts import parse_prompt_line

    print("Enter a prompt (inline --w --h --s --d --n --l); an empty line quits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            return
        try:
            paths = run_job(models, replace(job, prompts=(parse_prompt_line(line, "prompt"),)))
            print("\n".join(str(p) for p in paths))
        except UserError as exc:
            print(f"error: {exc}")


def _run(ns) -> None:
    from library.cli import inference as cli
    from library.inference.pipeline import load_models
    from library.inference.run import encode_all, model_default_params, run_job, validate_params

    if ns.demo:
        _demo_sources(ns)
    prompts, defaults = cli.prompt_specs(ns), cli.sampling_defaults(ns)
    sources, options = cli.model_sources(ns), cli.load_options(ns)
    validate_params(replace(defaults, cfg_scale=1.0, shift=1.0))
    models = load_models(sources, options)
    if ns.lora_weights:
        from networks.apply import attach_networks

        attach_networks(ns.lora_weights, models.encoders, models.mmdit, merge=ns.merge_lora_weights,
                        device=options.device)
    job = cli.generation_job(ns, prompts, model_default_params(models.variant, ns.shift, ns.cfg_scale, defaults))
    if ns.interactive:
        _interactive(models, job, run_job)
        return
    table = encode_all(models, [p.prompt for p in prompts] + [p.negative_prompt or ns.negative_prompt for p in prompts])
    models.free_text_encoders()
    for path in run_job(models, job, table):
        print(path)


def main(argv: list[str] | None = None) -> int:
    from library.cli import inference as cli
    from library.cli import run_command

    ns = cli.inference_parser().parse_args(argv)
    return run_command(lambda: _run(ns))

if __name__ == "__main__":
    sys.exit(main())

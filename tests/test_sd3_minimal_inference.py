"""sd3_minimal_inference.py end to end on the miniature models, against diffusers' pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sd3_minimal_inference
from library.models.mmdit_config import to_diffusers_config


def _run(argv, capsys):
    code = sd3_minimal_inference.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _diffusers_latents(files, prompt, negative, seed, steps, cfg, shift, width, height, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from library.inference.pipeline import LoadOptions, ModelSources, encode, load_models

    models = load_models(ModelSources(str(files.checkpoint), tokenizer_cache_dir=str(files.tokenizer_dir)), LoadOptions())
    cond, uncond = encode(models, [prompt]), encode(models, [negative])
    cfg_dir = tmp_path / "dcfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(to_diffusers_config(files.config)))
    transformer = SD3Transformer2DModel.from_single_file(str(files.checkpoint), config=str(cfg_dir), local_files_only=True)
    pipe = StableDiffusion3Pipeline(transformer=transformer.float(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
                negative_pooled_prompt_embeds=uncond.pooled, height=height, width=width, num_inference_steps=steps,
                guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("variant", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_png_and_latents_match_diffusers(variant, tiny_models, tmp_path, capsys):
    files = tiny_models(variant)
    out, latents_path = tmp_path / "out", tmp_path / "latents.safetensors"
    argv = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt", "a red fox in snow",
            "--negative_prompt", "blurry", "--seed", 7, "--steps", 6, "--cfg_scale", 4.0, "--width", 128, "--height", 96,
            "--output_dir", out, "--output_latents", latents_path]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0, stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1
    image = Image.open(pngs[0])
    assert image.size == (128, 96)
    params = image.text["parameters"]
    assert params.startswith("a red fox in snow\nNegative prompt: blurry\n") and "Seed: 7" in params and "Shift: 3.0" in params
    from safetensors.torch import load_file

    ours = load_file(str(latents_path))["latents_0000"]
    ref = _diffusers_latents(files, "a red fox in snow", "blurry", 7, 6, 4.0, 3.0, 128, 96, tmp_path)
    assert ours.shape == ref.shape == (1, 16, 12, 16)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_prompt_file_samplers_and_batching(tiny_models, tmp_path, capsys):
    files = tiny_models("sd35-medium")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat --w 64 --h 80 --d 3 --s 3 --ss euler_a\na dog --n ugly --l 2.5 --fs 7 --ss dpmpp_2m\n")
    out = tmp_path / "o"
    argv = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt_file", prompts,
            "--steps", 3, "--width", 64, "--height", 64, "--seed", 11, "--images_per_prompt", 3, "--batch_size", 2,
            "--scheduler", "simple", "--output_dir", out, "--skip_layer_guidance_scale", 2.5, "--skip_layer_guidance_layers", "1"]
    code, _, stderr = _run(argv, capsys)
    assert code == 0, stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    sizes = [Image.open(p).size for p in pngs]
    assert sizes[:3] == [(64, 80)] * 3 and sizes[3:] == [(64, 64)] * 3
    texts = [Image.open(p).text["parameters"] for p in pngs]
    assert "Seed: 3" in texts[0] and "Seed: 5" in texts[2] and "Seed: 13" in texts[5]
    assert "Sampler: euler_a" in texts[0] and "Sampler: dpmpp_2m" in texts[3] and "Shift: 7.0" in texts[3]
    assert "Negative prompt: ugly" in texts[3] and "CFG scale: 2.5" in texts[3] and "Schedule type: simple" in texts[0]


def test_same_seed_same_image_regardless_of_batch(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    base = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt", "a boat",
            "--steps", 3, "--width", 64, "--height", 64, "--seed", 5, "--images_per_prompt", 2]
    assert _run(base + ["--output_dir", tmp_path / "a", "--batch_size", 1], capsys)[0] == 0
    assert _run(base + ["--output_dir", tmp_path / "b", "--batch_size", 2], capsys)[0] == 0
    a = [Image.open(p).tobytes() for p in sorted((tmp_path / "a").glob("*.png"))]
    b = [Image.open(p).tobytes() for p in sorted((tmp_path / "b").glob("*.png"))]
    assert len(a) == 2 and a[1] != a[0]
    # batched and unbatched runs agree to rounding of the uint8 pixels
    for x, y in zip(a, b):
        diff = torch.tensor(list(x), dtype=torch.int16) - torch.tensor(list(y), dtype=torch.int16)
        assert diff.abs().max().item() <= 1


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--ckpt_path", "/nonexistent/model.safetensors"], "not found"),
        (["--width", 100], "multiples of 16"),
        (["--sampler", "heun"], "unknown sampler"),
        (["--prompt", "a cat --q 3"], "unknown inline option --q"),
        (["--prompt", "a cat --w wide"], "--w"),
        (["--scheduler", "karras"], "unknown scheduler"),
        (["--blocks_to_swap", 2], "at most 1 can swap"),
    ],
)
def test_bad_input_is_one_line(extra, needle, tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    argv = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--steps", 2, "--width", 64,
            "--height", 64, "--output_dir", tmp_path] + extra
    code, _, stderr = _run(argv, capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], stderr
    assert not list(tmp_path.glob("*.png"))


def test_separate_files_bf16_and_interactive(tiny_models, tmp_path, capsys, monkeypatch):
    files = tiny_models("sd35-large")
    vae_only = tmp_path / "vae.safetensors"
    from library.models.safetensors_io import read_metadata, save_safetensors
    from library.models.vae import vae_ldm_tensors

    vae_meta = {k: v for k, v in read_metadata(files.checkpoint).items() if "vae" in k}
    save_safetensors({k[len("first_stage_model."):]: v for k, v in vae_ldm_tensors(files.checkpoint).items()}, vae_only, vae_meta)
    answers = iter(["a lighthouse --w 64 --h 64 --d 2", "a lighthouse --w 64 --h 64 --d 2 --q", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    argv = ["--ckpt_path", files.checkpoint, "--clip_l", files.clip_l, "--clip_g", files.clip_g, "--t5xxl", files.t5xxl,
            "--vae", vae_only, "--tokenizer_cache_dir", files.tokenizer_dir, "--steps", 2, "--bf16", "--interactive",
            "--output_dir", tmp_path / "out", "--offload", "--disable_mmap_load_safetensors"]
    code, stdout, _ = _run(argv, capsys)
    assert code == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    assert "error: prompt: unknown inline option --q" in stdout  # a bad line is reported, the session goes on


def test_fp16_on_cpu_is_refused(tiny_models, tmp_path, capsys):
    files = tiny_models("sd3-medium")
    argv = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--fp16", "--device", "cpu",
            "--output_dir", tmp_path]
    code, _, stderr = _run(argv, capsys)
    assert code == 2 and "fp16 needs a GPU" in stderr


def test_lora_weights_on_the_fly_equal_merged(tiny_models, tmp_path, capsys):
    from library.models.loading import load_mmdit
    from library.models.text_encoders import load_text_encoders
    from networks import lokr_sd3, lora_sd3
    from tests.networks.test_network import randomise

    files = tiny_models("sd35-medium")
    paths = []
    for module, name, extra in ((lora_sd3, "a", {}), (lokr_sd3, "b", {"factor": "4"})):
        mmdit, encoders = load_mmdit(files.checkpoint), load_text_encoders(files.checkpoint)
        network = module.create_network(1.0, 4, 2.0, None, encoders, mmdit, **extra)
        randomise(network, seed=len(paths) + 1)
        paths.append(tmp_path / f"{name}.safetensors")
        network.save_weights(paths[-1])
    base = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt", "a cat",
            "--steps", 3, "--width", 64, "--height", 64, "--seed", 4, "--output_dir", tmp_path / "o"]
    nets = ["--lora_weights", f"{paths[0]};0.8", f"{paths[1]};1.0"]
    results = {}
    for label, extra in (("none", []), ("fly", nets), ("merged", nets + ["--merge_lora_weights"])):
        out = tmp_path / f"{label}.safetensors"
        assert _run(base + extra + ["--output_latents", out], capsys)[0] == 0
        from safetensors.torch import load_file

        results[label] = load_file(str(out))["latents_0000"]
    assert (results["fly"] - results["merged"]).abs().max().item() <= 1e-4
    assert (results["fly"] - results["none"]).abs().max().item() > 1e-3  # the networks really act
    code, _, err = _run(base + ["--lora_weights", f"{files.checkpoint};1.0"], capsys)
    assert code == 2 and "not an SD3 LoRA/LoKr file" in err


def test_block_swap_gives_the_same_latents(tiny_models, tmp_path, capsys):
    """--blocks_to_swap 1 (with --offload, a LoRA on the fly, and SLG skipping the swapped block): same latents."""
    from safetensors.torch import load_file

    from library.models.loading import load_mmdit
    from networks import lora_sd3
    from tests.networks.test_network import randomise

    files = tiny_models("sd35-medium")
    network = lora_sd3.create_network(1.0, 4, 2.0, None, None, load_mmdit(files.checkpoint))
    randomise(network, seed=3)
    network.save_weights(tmp_path / "net.safetensors")
    base = ["--ckpt_path", files.checkpoint, "--tokenizer_cache_dir", files.tokenizer_dir, "--prompt", "a cat",
            "--steps", 4, "--width", 64, "--height", 48, "--seed", 4, "--output_dir", tmp_path / "o",
            "--lora_weights", f"{tmp_path / 'net.safetensors'};0.7", "--skip_layer_guidance_scale", 2.5,
            "--skip_layer_guidance_layers", "1,2", "--skip_layer_guidance_start", 0.0, "--skip_layer_guidance_stop", 1.0]
    latents = []
    for extra in ([], ["--blocks_to_swap", 1], ["--blocks_to_swap", 1, "--offload"]):
        out = tmp_path / f"{len(latents)}.safetensors"
        code, _, err = _run(base + extra + ["--output_latents", out], capsys)
        assert code == 0, err
        latents.append(load_file(str(out))["latents_0000"])
    assert latents[0].abs().max() > 0 and all(torch.equal(latents[0], other) for other in latents[1:])

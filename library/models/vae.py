"""The SD3 / SD3.5 VAE: diffusers' ``AutoencoderKL`` (SDXL layout, 16 latent channels, no quant convs).

Checkpoints hold the VAE in LDM naming (``encoder.down.0.block.0.conv1.weight``) under
``first_stage_model.`` (all-in-one) or without prefix (separate file); a separate file may also use
diffusers naming (``encoder.down_blocks.0.resnets.0.conv1.weight``). The config is inferred from the
shapes; a JSON ``AutoencoderKL`` config in the metadata key :data:`VAE_CONFIG_METADATA_KEY` overrides
it (tiny test models need fewer norm groups). The MMDiT works on ``l = (z - 0.0609) * 1.5305`` of the
VAE-space latents ``z``; decoding undoes it.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from library.errors import UserError
from library.models.safetensors_io import load_safetensors, read_metadata, read_shapes

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609
LATENT_CHANNELS = 16
LDM_PREFIX = "first_stage_model."
VAE_CONFIG_METADATA_KEY = "sd3_trainer.vae_config"
_VAE_PREFIXES = (LDM_PREFIX, "vae.")
_LOGVAR_RANGE = (-30.0, 20.0)
_MAX_LISTED = 3

Shapes = Mapping[str, tuple[int, ...]]

# Per key naming: the encoder's down-block resnet conv1 (level, index) and the mid attention's query.
_NAMINGS: Mapping[str, tuple[re.Pattern[str], str]] = MappingProxyType({
    "ldm": (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$"), "encoder.mid.attn_1.q.weight"),
    "diffusers": (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight$"),
                  "encoder.mid_block.attentions.0.to_q.weight"),
})


def latents_from_vae_space(z: Tensor) -> Tensor:
    """VAE-space latents -> MMDiT latents: ``(z - 0.0609) * 1.5305``."""
    return (z - SHIFT_FACTOR) * SCALING_FACTOR


def vae_space_from_latents(latents: Tensor) -> Tensor:
    """MMDiT latents -> VAE-space latents: ``l / 1.5305 + 0.0609``."""
    return latents / SCALING_FACTOR + SHIFT_FACTOR


def sample_posterior(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``z = mean + exp(0.5 * clamp(logvar, -30, 20)) * eps`` with ``eps ~ N(0, 1)``.

    ``eps`` is drawn in float32 on the generator's device (else the mean's) and then moved to the
    mean's device, so one seed gives the same sample whatever device the VAE runs on.
    """
    std = torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE))
    noise_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
    return mean + std * eps.to(device=mean.device, dtype=mean.dtype)


class SD3VAE(nn.Module):
    """A frozen SD3 VAE that encodes images in [-1, 1] to MMDiT latents and back.

    Latents are returned in float32 (scale/shift and sampling run in float32, whatever the VAE's
    dtype); decoded images are float32 and not clamped (they may leave [-1, 1] slightly).
    """

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, 16, H/8, W/8), float32."""
        x = images.to(device=self.device, dtype=self.dtype)
        posterior = self.autoencoder.encode(x).latent_dist
        return posterior.mean.float(), posterior.logvar.float()

    def encode(
        self, images: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> MMDiT latents (B, 16, H/8, W/8), float32.

        ``sample=True`` (the default, as sd-scripts caches) draws from the posterior with
        :func:`sample_posterior`; ``sample=False`` takes its mean.
        """
        mean, logvar = self.encode_moments(images)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return latents_from_vae_space(z)

    def decode(self, latents: Tensor) -> Tensor:
        """MMDiT latents (B, 16, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1], float32."""
        z = vae_space_from_latents(latents.float()).to(device=self.device, dtype=self.dtype)
        return self.autoencoder.decode(z).sample.float()


def _split_prefix(keys: list[str]) -> str:
    """The prefix the VAE keys live under ("" for a separate VAE file)."""
    for prefix in _VAE_PREFIXES:
        if any(k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder.") for k in keys):
            return prefix
    return ""


def _detect_naming(keys: list[str], source: str) -> str:
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
        return "ldm"
    raise UserError(
        f"no VAE weights found in {source}: expected '{LDM_PREFIX}encoder.*' keys (all-in-one "
        "checkpoint) or 'encoder.*'/'decoder.*' keys (separate VAE file); pass a VAE with --vae"
    )


def _down_blocks(shapes: Shapes, naming: str) -> dict[int, dict[int, int]]:
    """{level: {resnet index: out channels}} of the encoder's down blocks."""
    pattern = _NAMINGS[naming][0]
    blocks: dict[int, dict[int, int]] = {}
    for key, shape in shapes.items():
        if match := pattern.match(key):
            blocks.setdefault(int(match[1]), {})[int(match[2])] = shape[0]
    return blocks


def infer_vae_config(shapes: Shapes, naming: str = "ldm", source: str = "VAE") -> dict[str, Any]:
    """The ``AutoencoderKL`` config of a VAE state dict, from its shapes (prefix already stripped).

    Checks that it is an SD3-style VAE (16 latent channels, no quant convs) and raises a one-line
    :class:`UserError` naming ``source`` otherwise. ``norm_num_groups`` cannot be seen in the
    shapes and defaults to 32.
    """
    blocks = _down_blocks(shapes, naming)
    convs = [f"{part}.{conv}.weight" for part in ("encoder", "decoder") for conv in ("conv_in", "conv_out")]
    if not blocks or any(k not in shapes for k in convs):
        raise UserError(f"{source} is not a complete VAE: it lacks encoder/decoder conv_in/conv_out or down blocks")
    levels = sorted(blocks)
    latent = shapes["decoder.conv_in.weight"][1]
    moments = shapes["encoder.conv_out.weight"][0]
    has_quant = any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in shapes)
    if latent != LATENT_CHANNELS or moments != 2 * latent or has_quant:
        found = f"{latent} latent channels" + (" and quant_conv layers" if has_quant else "")
        raise UserError(
            f"{source} is not an SD3 VAE: it has {found} (an SD1.x/SDXL VAE?); SD3/SD3.5 need the "
            f"{LATENT_CHANNELS}-channel VAE without quant_conv (the one in the SD3 checkpoint)"
        )
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [blocks[level][0] for level in levels],
        "layers_per_block": len(blocks[levels[0]]),
        "act_fn": "silu", "latent_channels": latent, "norm_num_groups": 32, "sample_size": 1024,
        "scaling_factor": SCALING_FACTOR, "shift_factor": SHIFT_FACTOR, "force_upcast": True,
        "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": _NAMINGS[naming][1] in shapes,
    }


def _resnet_shapes(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    out = {
        f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
        f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
        f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
        f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,),
    }
    if c_in != c_out:
        out |= {f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)}
    return out


def _mid_shapes(prefix: str, c: int, attention: bool) -> dict[str, tuple[int, ...]]:
    out = _resnet_shapes(f"{prefix}.mid.block_1", c, c) | _resnet_shapes(f"{prefix}.mid.block_2", c, c)
    if attention:
        out |= {f"{prefix}.mid.attn_1.norm.weight": (c,), f"{prefix}.mid.attn_1.norm.bias": (c,)}
        for name in ("q", "k", "v", "proj_out"):  # LDM attention projections are 1x1 convs
            out |= {f"{prefix}.mid.attn_1.{name}.weight": (c, c, 1, 1), f"{prefix}.mid.attn_1.{name}.bias": (c,)}
    return out


def _conv(name: str, c_out: int, c_in: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def ldm_vae_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key (LDM naming, no prefix) and shape of the VAE described by an ``AutoencoderKL`` config."""
    chans = list(config["block_out_channels"])
    n, per_block, latent = len(chans), int(config["layers_per_block"]), int(config["latent_channels"])
    attention = bool(config.get("mid_block_add_attention", True))
    out = _conv("encoder.conv_in", chans[0], int(config.get("in_channels", 3)), 3)
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(per_block):
            out |= _resnet_shapes(f"encoder.down.{i}.block.{j}", c_prev if j == 0 else c, c)
        if i < n - 1:
            out |= _conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
        c_prev = c
    out |= _mid_shapes("encoder", chans[-1], attention)
    out |= {"encoder.norm_out.weight": (chans[-1],), "encoder.norm_out.bias": (chans[-1],)}
    out |= _conv("encoder.conv_out", 2 * latent, chans[-1], 3)
    out |= _conv("decoder.conv_in", chans[-1], latent, 3)
    out |= _mid_shapes("decoder", chans[-1], attention)
    c_prev = chans[-1]
    for i in reversed(range(n)):  # LDM numbers decoder levels like the encoder's: up.{n-1} runs first
        for j in range(per_block + 1):
            out |= _resnet_shapes(f"decoder.up.{i}.block.{j}", c_prev if j == 0 else chans[i], chans[i])
        if i > 0:
            out |= _conv(f"decoder.up.{i}.upsample.conv", chans[i], chans[i], 3)
        c_prev = chans[i]
    out |= {"decoder.norm_out.weight": (chans[0],), "decoder.norm_out.bias": (chans[0],)}
    out |= _conv("decoder.conv_out", int(config.get("out_channels", 3)), chans[0], 3)
    return out


class _Plan(NamedTuple):
    """What a VAE source holds: key prefix, naming scheme and the final ``AutoencoderKL`` config."""

    prefix: str
    naming: str
    config: Mapping[str, Any]


def vae_config_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata that makes :func:`load_vae` use ``config`` instead of inferring one."""
    return {VAE_CONFIG_METADATA_KEY: json.dumps(dict(config), sort_keys=True)}


def _metadata_overrides(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    raw = metadata.get(VAE_CONFIG_METADATA_KEY)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{source}: metadata '{VAE_CONFIG_METADATA_KEY}' is not a JSON AutoencoderKL config")
    return value


def _final_config(inferred: Mapping[str, Any], overrides: list[Mapping[str, Any]], source: str) -> dict[str, Any]:
    """Inferred config updated by each override in turn (private ``_*`` keys of saved configs ignored)."""
    from diffusers import AutoencoderKL

    config = dict(inferred)
    for override in overrides:
        config.update({k: v for k, v in override.items() if not k.startswith("_")})
    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise UserError(f"{source}: unknown VAE config keys {unknown}; valid keys are {sorted(accepted)}")
    groups = int(config["norm_num_groups"])
    if any(int(c) % groups for c in config["block_out_channels"]):
        channels = list(config["block_out_channels"])
        raise UserError(f"{source}: norm_num_groups={groups} does not divide the channels {channels}; "
                        f"store the right config in the '{VAE_CONFIG_METADATA_KEY}' metadata")
    return config


def _diffusers_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _same_shape(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal shapes; LDM attention 1x1 convs (C, C, 1, 1) may also be stored as linears (C, C)."""
    return found == expected or (len(expected) == 4 and expected[2:] == (1, 1) and found == expected[:2])


def _check_layout(found: Shapes, expected: Shapes, source: str) -> None:
    """Raise a one-line :class:`UserError` listing missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} != {s}" for k, s in expected.items() if k in found and not _same_shape(found[k], s)]
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
    problems = [f"{len(items)} {label}, e.g. {', '.join(items[:_MAX_LISTED])}" for label, items in labelled if items]
    if problems:
        raise UserError(f"{source} does not match the SD3 VAE layout: {'; '.join(problems)}")


def _plan(all_shapes: Shapes, overrides: list[Mapping[str, Any]], source: str) -> _Plan:
    """Find the VAE keys, infer and check the config, and check every key and shape before loading."""
    prefix = _split_prefix(list(all_shapes))
    shapes = {k[len(prefix):]: tuple(v) for k, v in all_shapes.items() if k.startswith(prefix)}
    naming = _detect_naming(list(shapes), source)
    config = _final_config(infer_vae_config(shapes, naming, source), overrides, source)
    expected = ldm_vae_shapes(config) if naming == "ldm" else _diffusers_shapes(config)
    _check_layout(shapes, expected, source)
    return _Plan(prefix=prefix, naming=naming, config=config)


def _plan_file(path: Path, source: str, config: Mapping[str, Any] | None) -> _Plan:
    overrides = [_metadata_overrides(read_metadata(path, what="VAE file"), source), dict(config or {})]
    return _plan(read_shapes(path, what="VAE file"), overrides, source)


def _build_autoencoder(config: Mapping[str, Any], state_dict: dict[str, Tensor], source: str) -> AutoencoderKL:
    """An ``AutoencoderKL`` built on the meta device that takes over the given tensors (strict)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{source}: VAE weights do not fit the model ({' '.join(str(exc).split())[:300]})") from None
    return model


def load_vae(
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    mmap: bool = True,
    config: Mapping[str, Any] | None = None,
) -> SD3VAE:
    """Load a frozen (eval, no grad) SD3 VAE.

    ``path_or_state_dict``: an all-in-one checkpoint (``first_stage_model.*``), a separate VAE file in
    LDM or diffusers naming, or such a state dict. ``config`` entries override the inferred config and
    the file's :data:`VAE_CONFIG_METADATA_KEY` metadata. Keys and shapes are checked before any tensor
    is read; tensors already in the target dtype and device are taken over, not copied.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if isinstance(path_or_state_dict, Mapping):
        source = "VAE state dict"
        plan = _plan({k: tuple(v.shape) for k, v in path_or_state_dict.items()}, [dict(config or {})], source)
        state_dict = {k[len(plan.prefix):]: v for k, v in path_or_state_dict.items() if k.startswith(plan.prefix)}
    else:
        path = Path(path_or_state_dict)
        source = f"VAE file {path}"
        plan = _plan_file(path, source, config)
        state_dict = load_safetensors(path, mmap=mmap, prefix=plan.prefix or None, what="VAE file")
    if plan.naming == "ldm":
        state_dict = convert_ldm_vae_checkpoint(state_dict, dict(plan.config))
    for key in list(state_dict):  # one tensor at a time, so two full copies never coexist
        state_dict[key] = state_dict[key].to(device=device, dtype=dtype)
    autoencoder = _build_autoencoder(plan.config, state_dict, source)
    del state_dict
    logger.info("loaded SD3 VAE from %s (%s naming, %s)", source, plan.naming, dtype)
    return SD3VAE(autoencoder).eval().requires_grad_(False)


def _diffusers_to_ldm(tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Rename a diffusers-named VAE state dict to LDM naming (attention linears back to 1x1 convs).

    diffusers has no reverse converter, so the key map is read off its forward converter: each LDM
    key gets a one-element probe tensor holding its index, and the converted dict says where it went.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    expected = ldm_vae_shapes(config)
    ldm_keys = list(expected)
    probe = {k: torch.full((1, 1, 1, 1), float(i)) for i, k in enumerate(ldm_keys)}
    converted = convert_ldm_vae_checkpoint(probe, dict(config))
    key_map = {d_key: ldm_keys[int(t.reshape(-1)[0])] for d_key, t in converted.items()}
    return {key_map[k]: v.reshape(expected[key_map[k]]) for k, v in tensors.items()}


def vae_ldm_tensors(path: str | os.PathLike, mmap: bool = True) -> dict[str, Tensor]:
    """The VAE tensors of ``path`` under ``first_stage_model.`` in LDM naming, for saving checkpoints.

    LDM-named sources come back exactly as stored (same tensors, dtypes and shapes); a
    diffusers-named VAE file is renamed to LDM naming (values and dtypes unchanged).
    """
    path = Path(path)
    source = f"VAE file {path}"
    plan = _plan_file(path, source, None)
    tensors = load_safetensors(path, mmap=mmap, prefix=plan.prefix or None, what="VAE file")
    if plan.naming == "diffusers":
        tensors = _diffusers_to_ldm(tensors, plan.config)
    return {LDM_PREFIX + k: v for k, v in tensors.items()}

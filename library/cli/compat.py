"""sd-scripts flags that mean nothing for SD3 here: accepted, so pasted command lines keep working, and
each one that is set gets a one-line notice (never silently dropped). None of them reaches the config.
"""

from __future__ import annotations

import argparse
import types
from typing import Mapping

_NO_EFFECT = "ignored: no effect in this trainer"
_EPS_ONLY = "ignored: an epsilon/v-prediction option; SD3 trains flow matching"
_SDPA = "attention always runs through torch SDPA"

# flag -> (value type, or None for an on/off switch; the notice after "--flag: ")
IGNORED_FLAGS: Mapping[str, tuple[type | None, str]] = types.MappingProxyType({
    "sdpa": (None, f"always on ({_SDPA})"),
    "xformers": (None, f"ignored: {_SDPA}"),
    "mem_eff_attn": (None, f"ignored: {_SDPA}"),
    "noise_offset": (float, _EPS_ONLY),
    "noise_offset_random_strength": (None, _EPS_ONLY),
    "multires_noise_iterations": (int, _EPS_ONLY),
    "multires_noise_discount": (float, _EPS_ONLY),
    "adaptive_noise_scale": (float, _EPS_ONLY),
    "ip_noise_gamma": (float, _EPS_ONLY),
    "ip_noise_gamma_random_strength": (None, _EPS_ONLY),
    "zero_terminal_snr": (None, _EPS_ONLY + " (sigma = 1 is pure noise already)"),
    "v_parameterization": (None, "ignored: SD3 always predicts flow velocity (see --model_prediction_type)"),
    "min_snr_gamma": (float, _EPS_ONLY + "; see --weighting_scheme / --loss_weighting"),
    "scale_v_pred_loss_like_noise_pred": (None, _EPS_ONLY),
    "debiased_estimation_loss": (None, _EPS_ONLY + "; see --weighting_scheme / --loss_weighting"),
    "no_half_vae": (None, _NO_EFFECT),
    "clip_skip": (int, "ignored: SD3 always uses the penultimate CLIP layer"),
})

# --save_model_as values sd-scripts accepts; SD3 checkpoints are written as .safetensors only.
SAVE_MODEL_AS = ("safetensors", "ckpt", "pt", "diffusers", "diffusers_safetensors")


def add_ignored_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sd-scripts flags with no effect on SD3 (accepted with a notice)")
    for name, (kind, why) in IGNORED_FLAGS.items():
        if kind is None:
            g.add_argument(f"--{name}", action="store_true", default=None, help=why)
        else:
            g.add_argument(f"--{name}", type=kind, default=None, help=why)


def ignored_flag_notices(ns: argparse.Namespace) -> list[str]:
    """One line per ignored flag that was set (a switch turned on, or a value given)."""
    notices = []
    for name, (_, why) in IGNORED_FLAGS.items():
        value = getattr(ns, name, None)
        if value is not None and value is not False:
            notices.append(f"--{name}: {why}")
    if getattr(ns, "save_model_as", "safetensors") not in (None, "safetensors"):
        notices.append(f"--save_model_as {ns.save_model_as}: SD3 checkpoints are saved as .safetensors only; "
                       "saving as safetensors")
    return notices

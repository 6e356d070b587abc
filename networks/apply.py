"""Attaching saved networks to loaded models for inference (``--lora_weights path;mult``)."""

from __future__ import annotations

from typing import Any

from library.errors import UserError
from library.models.safetensors_io import load_safetensors


def parse_network_spec(text: str) -> tuple[str, float]:
    """``path`` or ``path;multiplier`` (sd-scripts' syntax) -> (path, multiplier)."""
    path, _, mult = text.partition(";")
    try:
        return path, float(mult) if mult.strip() else 1.0
    except ValueError:
        raise UserError(f"--lora_weights {text!r}: the multiplier after ';' must be a number") from None


def load_network(path: str, multiplier: float, text_encoders: Any, mmdit: Any):
    """A LoRA or LoKr (detected from the keys) built on the models, weights loaded."""
    weights = load_safetensors(path, what="network file")
    if any(".lokr_" in k for k in weights):
        from networks import lokr_sd3 as module
    elif any(".lora_down." in k for k in weights):
        from networks import lora_sd3 as module
    else:
        raise UserError(f"{path} is not an SD3 LoRA/LoKr file (no lora_down or lokr_ tensors)")
    return module.create_network_from_weights(multiplier, path, None, text_encoders, mmdit, weights_sd=weights,
                                              for_inference=True)


def attach_networks(specs: list[str], text_encoders: Any, mmdit: Any, *, merge: bool, device: Any = "cpu") -> list:
    """Apply every ``path;mult`` network on the fly (its tensors moved to ``device``), or fold it into the
    weights with ``merge`` (the safe choice with ``--offload``, which moves models between devices)."""
    networks = []
    for spec in specs:
        path, multiplier = parse_network_spec(spec)
        network = load_network(path, multiplier, text_encoders, mmdit)
        if merge:
            network.merge_to()
        else:
            network.to(device)
            network.apply_to()
        networks.append(network)
    return networks

"""Building a network from a saved file (shared by networks.lora_sd3 and networks.lokr_sd3)."""

from __future__ import annotations

from typing import Any

from networks.network import SD3Network, network_from_sd


def network_from_file(kind: str, make_module: Any, multiplier: float, file: Any, weights_sd: Any,
                      text_encoders: Any, mmdit: Any, for_inference: bool) -> SD3Network:
    """The body of both modules' ``create_network_from_weights``: read, shape the network like the file."""
    from library.models.safetensors_io import load_safetensors

    source = str(file) if file is not None else "state dict"
    if weights_sd is None:
        weights_sd = load_safetensors(file, what="network file")
    network = network_from_sd(kind, make_module, multiplier, weights_sd, text_encoders, mmdit, source)
    if for_inference:
        network.requires_grad_(False)
    return network


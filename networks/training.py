"""The network side of sd3_train_network.py: which module ``--network_module`` names, merging
``--base_weights``, and building (or loading) the trained network. Plain values in, no argparse.

``--network_module lycoris.kohya`` with ``algo=lokr`` (or ``lora``/``locon``) in ``--network_args`` maps
to networks.lokr_sd3 (networks.lora_sd3), so LyCORIS command lines keep working.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)
MODULES = {"networks.lora_sd3": "networks.lora_sd3", "networks.lokr_sd3": "networks.lokr_sd3"}
LYCORIS_ALGOS = {"lokr": "networks.lokr_sd3", "lora": "networks.lora_sd3", "locon": "networks.lora_sd3"}


def resolve_module(name: str, network_args: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """(python module with create_network, network_args left for it) for a --network_module name."""
    remaining = dict(network_args)
    if name in ("lycoris.kohya", "lycoris"):
        algo = remaining.pop("algo", "lora").lower()
        if algo not in LYCORIS_ALGOS:
            raise UserError(f"--network_module {name} algo={algo}: only {', '.join(LYCORIS_ALGOS)} are available "
                            "for SD3 here; use networks.lokr_sd3 or networks.lora_sd3")
        name = LYCORIS_ALGOS[algo]
    if name not in MODULES:
        raise UserError(f"--network_module {name!r} is not an SD3 network module; use networks.lora_sd3 or "
                        "networks.lokr_sd3 (sd-scripts' networks.lora is for SD1/SDXL)")
    return importlib.import_module(MODULES[name]), remaining


@dataclass(frozen=True)
class NetworkSpec:
    module: str
    dim: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    args: dict[str, str] = field(default_factory=dict)
    weights: str | None = None
    dim_from_weights: bool = False
    multiplier: float = 1.0
    base_weights: tuple[tuple[str, float], ...] = ()


class SD3NetworkBuilder:
    """Implements the trainer's NetworkBuilder for networks.lora_sd3 / lokr_sd3."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.module, self.args = resolve_module(spec.module, spec.args)

    def merge_base_weights(self, mmdit: Any, text_encoders: Any) -> None:
        from networks.apply import load_network

        for path, multiplier in self.spec.base_weights:
            network = load_network(path, multiplier, text_encoders, mmdit)
            network.merge_to()
            logger.info("merged base weights %s (multiplier %g, %d modules)", path, multiplier,
                        len(network.adapters))

    def build(self, mmdit: Any, text_encoders: Any) -> Any:
        spec = self.spec
        if spec.dim_from_weights:
            if not spec.weights:
                raise UserError("--dim_from_weights needs --network_weights (the file to take the ranks from)")
            network = self.module.create_network_from_weights(spec.multiplier, spec.weights, None, text_encoders,
                                                              mmdit)
            network.requires_grad_(True)
            return network
        network = self.module.create_network(spec.multiplier, spec.dim, spec.alpha, None, text_encoders, mmdit,
                                             neuron_dropout=spec.dropout, **self.args)
        if spec.weights:
            network.load_weights(spec.weights)
            logger.info("loaded network weights %s", spec.weights)
        return network

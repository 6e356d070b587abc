"""``modelspec.*`` metadata (Stability AI's model spec) and our own training keys for saved files."""

from __future__ import annotations

import datetime
from typing import Mapping

from library.models.mmdit_config import MODELSPEC_ARCHITECTURE, MMDiTConfig

SPEC_VERSION = "1.0.1"
IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"


def modelspec_metadata(
    cfg: MMDiTConfig,
    *,
    title: str,
    resolution: int = 1024,
    adapter: str | None = None,
    date: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Metadata for a full checkpoint (``adapter=None``) or a network (``"lora"``/``"lokr"``).

    ``date`` defaults to now (ISO 8601, seconds); pass the stored value to re-save a file
    bit-identically. Prediction type is "flow" for every SD3 model.
    """
    architecture = MODELSPEC_ARCHITECTURE[cfg.variant] + (f"/{adapter}" if adapter else "")
    stamp = date or datetime.datetime.now().replace(microsecond=0).isoformat()
    meta = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": stamp,
        "modelspec.prediction_type": "flow",
    }
    meta.update(extra or {})
    return meta

"""Float32 regions for the training math: autocast off, whatever the caller's mixed precision."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def float32_region(device: torch.device | str) -> ContextManager[object]:
    """A context in which autocast is disabled for ``device``'s type (a no-op where autocast does not exist)."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)

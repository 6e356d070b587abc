"""Fixtures shared by the network tests."""

from __future__ import annotations

import pytest
import torch

from library.models.loading import load_mmdit
from library.models.text_encoders import load_text_encoders


@pytest.fixture(scope="module")
def models(tiny_models):
    """Loader of fresh, frozen (mmdit, text encoders) per variant, fp32.

    Frozen up front: SDPA's kernel choice depends on requires_grad, which alone moves outputs by 1 ulp.
    """

    def get(variant: str = "sd35-medium"):
        files = tiny_models(variant)
        return load_mmdit(files.checkpoint, dtype=torch.float32).requires_grad_(False), load_text_encoders(
            files.checkpoint
        )

    return get

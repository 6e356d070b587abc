"""Test-wide settings: offline hub, deterministic CPU threads."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(variant)`` -> TinyModelFiles, built once per session per variant."""
    from library.models.tiny.factory import make_tiny_model

    built = {}

    def get(variant: str = "sd35-medium"):
        if variant not in built:
            built[variant] = make_tiny_model(tmp_path_factory.mktemp(variant), variant, seed=0)
        return built[variant]

    return get

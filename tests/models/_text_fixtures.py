"""Shared fixtures for the text-encoder tests: tiny tokenizers and encoder files, built once per session.

Test modules import the fixtures they use. Files are written under pytest's session base temp
folder and reused by every module of the session (a marker file says a folder is complete).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T5_LEN = 32
PROMPTS = [
    "a photo of a cat",
    "a watercolor painting of an ancient lighthouse on a rocky island at sunset, dramatic clouds, "
    "crashing waves, seagulls, warm golden light, highly detailed, trending on artstation, "
    "with a small red boat in the harbour, fishermen mending nets, children playing on the beach, "
    "a dog chasing a ball, kites in the sky, sharp focus, intricate details, soft shadows, "
    "an old woman selling flowers from a wooden cart, a bicycle leaning against a stone wall, "
    "distant mountains covered in snow, a flock of birds flying south",  # > 77 CLIP tokens
]


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    root = tmp_path_factory.getbasetemp() / name
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        build(root)
        done.touch()
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from library.models.tiny.tokenizers import write_tiny_tokenizers

    return _once(tmp_path_factory, "tiny_text_tokenizers", write_tiny_tokenizers)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from library.models.tiny.text import write_tiny_text_encoder_files

    return _once(tmp_path_factory, "tiny_text_encoders", write_tiny_text_encoder_files)


@pytest.fixture(scope="session")
def tiny_text_files(tiny_text_dir: Path) -> dict[str, Path]:
    names = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl", "all_in_one": "text_encoders"}
    return {k: tiny_text_dir / f"{v}.safetensors" for k, v in names.items()}


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_tokenizer_dir: Path):
    from library.models.tokenizers import load_tokenizers

    return load_tokenizers(tokenizer_cache_dir=tiny_tokenizer_dir, t5_max_length=T5_LEN)


@pytest.fixture(scope="session")
def tiny_encoders(tiny_text_files: dict[str, Path]):
    from library.models.text_encoders import load_text_encoders

    return load_text_encoders(tiny_text_files["all_in_one"])


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    """The message of a raised UserError, checked to be a single line."""
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()

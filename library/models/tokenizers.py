"""The three SD3 tokenizers (CLIP-L, CLIP-G, T5), found offline first.

Sources, in order, for each tokenizer separately:
1. ``tokenizer_cache_dir`` (``--tokenizer_cache_dir``) with ``tokenizer/``, ``tokenizer_2/``,
   ``tokenizer_3/`` sub-folders in ``save_pretrained`` layout;
2. ``diffusers_dir``, a local diffusers-style SD3 folder with the same sub-folders;
3. the Hugging Face hub ids below: the local hub cache is always consulted (no network); the
   network is used only with ``allow_download``. A tokenizer fetched that way is saved into
   ``tokenizer_cache_dir`` (when given) so that later runs work offline.

Settings applied whatever the source: both CLIPs ``model_max_length`` 77, CLIP-L pads with its EOS
token ``<|endoftext|>`` (49407), CLIP-G pads with ``!`` (id 0); T5 ``model_max_length`` =
``t5_max_length``, pad 0, eos 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from library.errors import UserError

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
DEFAULT_T5_MAX_LENGTH = 256
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")
_PROBE = "a photo of a cat"
_CLIP_PROBE_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # the real CLIP BPE, as in every SD3 folder


@dataclass(frozen=True)
class Tokenizers:
    """The tokenizers for CLIP-L, CLIP-G and T5 (transformers tokenizer objects)."""

    clip_l: Any
    clip_g: Any
    t5: Any


def _is_clip_bpe(tok: Any) -> bool:
    return tok(_PROBE).input_ids == _CLIP_PROBE_IDS


def _is_t5_sentencepiece(tok: Any) -> bool:
    ids = tok(_PROBE).input_ids
    return tok.unk_token_id not in ids and ids[-1] == 1 and tok.pad_token_id == 0


@dataclass(frozen=True)
class _TokenizerSpec:
    label: str
    subfolder: str
    hub_id: str
    class_name: str
    pad_token: str | None
    pad_id: int | None
    is_real: Callable[[Any], bool]  # transformers 5 builds silent dummies from missing files


_SPECS = MappingProxyType(
    {
        "clip_l": _TokenizerSpec(
            "CLIP-L", "tokenizer", "openai/clip-vit-large-patch14", "CLIPTokenizer", "<|endoftext|>", None, _is_clip_bpe
        ),
        "clip_g": _TokenizerSpec(
            "CLIP-G", "tokenizer_2", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "CLIPTokenizer", "!", 0, _is_clip_bpe
        ),
        "t5": _TokenizerSpec("T5", "tokenizer_3", "google/t5-v1_1-xxl", "T5Tokenizer", None, 0, _is_t5_sentencepiece),
    }
)


def _tokenizer_class(name: str) -> Callable[..., Any]:
    import transformers

    return getattr(transformers, name)


def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _load_local(spec: _TokenizerSpec, folder: Path) -> Any:
    try:
        tok = _tokenizer_class(spec.class_name).from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for broken folders
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"{spec.label} tokenizer in {folder} could not be loaded ({type(exc).__name__}: {first_line}); "
            f"replace it with a save_pretrained copy"
        ) from None
    if not spec.is_real(tok):
        raise UserError(
            f"{spec.label} tokenizer in {folder} is not a working {spec.label} tokenizer "
            f"({_PROBE!r} -> {tok(_PROBE).input_ids[:8]}); replace it with a save_pretrained copy"
        )
    return tok


def _load_hub(spec: _TokenizerSpec, allow_download: bool) -> Any | None:
    try:
        tok = _tokenizer_class(spec.class_name).from_pretrained(spec.hub_id, local_files_only=not allow_download)
    except Exception as exc:  # offline, not cached, or no network
        logger.debug("%s tokenizer %s not available from the hub: %s", spec.label, spec.hub_id, exc)
        return None
    return tok if spec.is_real(tok) else None  # nothing cached -> transformers 5 returns a dummy


def _miss_message(spec: _TokenizerSpec, places: list[Path], cache_dir: Path | None, allow_download: bool) -> str:
    where = str(cache_dir) if cache_dir is not None else "DIR"
    looked = ", ".join(str(p) for p in places) or "no local folder given"
    how = "could not be downloaded" if allow_download else "not found offline"
    return (
        f"{spec.label} tokenizer {how} (looked in: {looked}; hub cache {spec.hub_id}); "
        f"put tokenizer/, tokenizer_2/, tokenizer_3/ (save_pretrained layout, as in a diffusers SD3 folder) "
        f"in {where} and pass --tokenizer_cache_dir {where}"
    )


def _configure(spec: _TokenizerSpec, tok: Any, max_length: int) -> Any:
    tok.model_max_length = max_length
    if spec.pad_token is not None and tok.pad_token != spec.pad_token:
        logger.info("%s tokenizer: pad token %r -> %r", spec.label, tok.pad_token, spec.pad_token)
        tok.pad_token = spec.pad_token
    if spec.pad_id is not None and tok.pad_token_id != spec.pad_id:
        raise UserError(
            f"{spec.label} tokenizer pads with id {tok.pad_token_id}, expected {spec.pad_id}; "
            f"use the SD3 tokenizer files for {spec.subfolder}/"
        )
    return tok


def _load_one(
    spec: _TokenizerSpec, roots: list[Path], cache_dir: Path | None, allow_download: bool
) -> Any:
    places = [root / spec.subfolder for root in roots]
    for folder in places:
        if _has_tokenizer_files(folder):
            logger.info("%s tokenizer: %s", spec.label, folder)
            return _load_local(spec, folder)
    tok = _load_hub(spec, allow_download)
    if tok is None:
        raise UserError(_miss_message(spec, places, cache_dir, allow_download))
    logger.info("%s tokenizer: hub %s", spec.label, spec.hub_id)
    if cache_dir is not None:
        tok.save_pretrained(str(cache_dir / spec.subfolder))
        logger.info("%s tokenizer saved to %s for offline use", spec.label, cache_dir / spec.subfolder)
    return tok


def load_tokenizers(
    tokenizer_cache_dir: str | Path | None = None,
    diffusers_dir: str | Path | None = None,
    t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
    allow_download: bool = False,
) -> Tokenizers:
    """Load the CLIP-L, CLIP-G and T5 tokenizers (see the module docstring for the order)."""
    if t5_max_length < 1:
        raise UserError(f"--t5xxl_max_token_length must be positive, got {t5_max_length}")
    cache_dir = Path(tokenizer_cache_dir) if tokenizer_cache_dir is not None else None
    roots = [p for p in (cache_dir, Path(diffusers_dir) if diffusers_dir is not None else None) if p is not None]
    lengths = {"clip_l": CLIP_MAX_LENGTH, "clip_g": CLIP_MAX_LENGTH, "t5": t5_max_length}
    loaded = {
        name: _configure(spec, _load_one(spec, roots, cache_dir, allow_download), lengths[name])
        for name, spec in _SPECS.items()
    }
    return Tokenizers(**loaded)

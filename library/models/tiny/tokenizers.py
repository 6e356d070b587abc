"""Offline tokenizers for tests: real CLIP BPE, a small trained T5 sentencepiece model.

``write_tiny_tokenizers(out_dir)`` writes ``tokenizer/`` (CLIP-L), ``tokenizer_2/`` (CLIP-G) and
``tokenizer_3/`` (T5) in ``save_pretrained`` layout, the same layout as a diffusers SD3 folder, so
``load_tokenizers(tokenizer_cache_dir=out_dir)`` reads them without any download.

CLIP: the real 49,408-entry BPE vocabulary, rebuilt from the merges list that ships inside the
``open-clip-torch`` wheel (found with ``importlib.util.find_spec``; nothing is imported from it).
T5: a unigram sentencepiece model (pad 0, eos 1, unk 2, no bos) trained in well under a second on
a prompt-like corpus generated here from the project's own word lists.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import logging
import random
from pathlib import Path

from library.errors import UserError

logger = logging.getLogger(__name__)

CLIP_MERGE_COUNT = 48_894  # 49,408 - 2 * 256 byte tokens - 2 special tokens
CLIP_MAX_LENGTH = 77
T5_PIECES = 512  # upper bound: hard_vocab_limit is off, small corpora yield fewer
T5_EXTRA_IDS = 100
TINY_T5_TOKENIZER_MAX = T5_PIECES + T5_EXTRA_IDS  # len(tokenizer) never exceeds this

_SUBJECTS = (
    "cat dog fox owl horse rabbit dragon robot knight wizard sailor farmer dancer child woman man "
    "astronaut lighthouse castle cottage bridge tower village harbour garden forest meadow canyon "
    "glacier volcano island desert river waterfall lake ocean mountain valley street market cafe "
    "library train station bicycle motorcycle sailboat airship teapot violin lantern umbrella "
    "butterfly hummingbird jellyfish octopus penguin tiger elephant giraffe squirrel hedgehog"
).split()
_ADJECTIVES = (
    "red blue green golden silver purple crimson pale dark bright misty foggy rainy snowy sunny "
    "ancient modern tiny enormous quiet busy lonely happy sleepy curious fierce gentle shiny rusty "
    "wooden glass marble velvet paper crystal neon glowing frozen burning floating broken elegant"
).split()
_STYLES = (
    "photograph|oil painting|watercolor|pencil sketch|charcoal drawing|digital art|anime screenshot|"
    "pixel art|low poly render|studio portrait|macro shot|aerial view|isometric illustration|"
    "ink wash painting|concept art|children's book illustration|vintage postcard|film still"
).split("|")
_DETAILS = (
    "at sunset|at night|in the morning|under a full moon|in heavy rain|in autumn|in winter|"
    "with dramatic lighting|with soft shadows|in high detail|with shallow depth of field|"
    "surrounded by flowers|next to a river|on a wooden table|in a crowded city|far in the distance|"
    "reflected in a puddle|seen through a window|covered in snow|lit by candles"
).split("|")
_TEMPLATES = (
    "a {style} of a {adj} {subj} {detail}",
    "{adj} {subj} and a {adj2} {subj2}, {style}",
    "an {adj} {subj} {detail}, {style}, trending, highly detailed",
    "close-up of the {subj}'s face, {adj} eyes, {style}",
    "the {subj} was {adj} and the {subj2} looked {adj2} {detail}.",
    "{count} {adj} {subj}s walking past a {subj2} {detail}",
)
_COUNTS = "two three four five seven twelve 2 3 10 42 100".split()


def tiny_corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic prompt-like sentences built from the word lists above."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        template = rng.choice(_TEMPLATES)
        out.append(
            template.format(
                style=rng.choice(_STYLES),
                adj=rng.choice(_ADJECTIVES),
                adj2=rng.choice(_ADJECTIVES),
                subj=rng.choice(_SUBJECTS),
                subj2=rng.choice(_SUBJECTS),
                detail=rng.choice(_DETAILS),
                count=rng.choice(_COUNTS),
            )
        )
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    byte_order = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_order.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_order, codes)}


def _clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    raise UserError(
        "the CLIP BPE vocabulary (open_clip/bpe_simple_vocab_16e6.txt.gz) was not found; "
        "install it with: pip install --no-deps open-clip-torch"
    )


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP vocabulary (49,408 entries) and its merges, in CLIP's id order."""
    text = gzip.decompress(_clip_bpe_file().read_bytes()).decode("utf-8")
    merge_lines = text.split("\n")[1 : 1 + CLIP_MERGE_COUNT]  # line 0 is a version header
    merges = [tuple(line.split()) for line in merge_lines]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def _write_clip(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(str(out_dir))
    # also the classic vocab.json/merges.txt pair, as in diffusers repos and older transformers
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")


def train_tiny_sentencepiece(seed: int = 0) -> bytes:
    """Train the small unigram model (deterministic: one thread, no input shuffling)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed=seed)),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_PIECES,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _write_t5(out_dir: Path, seed: int, max_length: int) -> None:
    from transformers import T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(train_tiny_sentencepiece(seed))
    tok = T5Tokenizer.from_pretrained(str(out_dir), model_max_length=max_length, extra_ids=T5_EXTRA_IDS)
    tok.save_pretrained(str(out_dir))


def write_tiny_tokenizers(out_dir: str | Path, seed: int = 0, t5_max_length: int = 256) -> Path:
    """Write ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` under ``out_dir``; return it."""
    out = Path(out_dir)
    vocab, merges = clip_vocab_and_merges()
    _write_clip(out / "tokenizer", vocab, merges, pad_token="<|endoftext|>")
    _write_clip(out / "tokenizer_2", vocab, merges, pad_token="!")
    _write_t5(out / "tokenizer_3", seed, t5_max_length)
    logger.info("wrote tiny tokenizers to %s", out)
    return out

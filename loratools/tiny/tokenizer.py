"""A tiny CLIP byte-level BPE tokenizer written to vocab.json + merges.txt by code.

Real CLIP vocabularies start with the 256 byte-level symbols, then the same symbols with the
``</w>`` word-end suffix, then one entry per merge, then the two special tokens. This one has the
same shape at a few hundred entries: every byte exists (so any text tokenizes, falling back to
letters), and a short list of words used by tests and the demo is merged into single tokens, so
captions like ``"tinychar, red circle"`` become a handful of real ids. ``"!"`` is id 0 exactly as
in CLIP, which matters for SDXL's second tokenizer (it pads with id 0).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

#: Words merged into single tokens (lower case: the tokenizer lower-cases its input).
WORDS = (
    "a", "an", "the", "of", "and", "with", "in", "on", "photo", "picture", "drawing", "painting",
    "cat", "dog", "toy", "girl", "boy", "solo", "1girl", "1boy", "person", "face", "smile",
    "red", "green", "blue", "yellow", "white", "black", "purple", "orange", "pink",
    "circle", "square", "triangle", "stripes", "shape", "background", "simple", "pattern",
    "tinychar", "tinystyle", "sks", "ohwx", "masterpiece", "best", "quality", "blurry", "lowres",
    "score_9", "score_8_up", "looking", "at", "viewer", "upper", "body", "sitting", "standing",
)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that fuse ``word`` (ASCII) into one ``word</w>`` token."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    left = parts[0]
    for right in parts[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the vocabulary and ordered merge list (deterministic, no randomness involved)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    known = set(tokens)
    for word in WORDS:
        for pair in _word_merges(word):
            if pair in seen_merges:
                continue
            seen_merges.add(pair)
            merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab()
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def make_tokenizer(pad_token: str = EOS, directory: str | Path | None = None) -> CLIPTokenizer:
    """Load a ``CLIPTokenizer`` from freshly written vocab/merges files.

    Args:
        pad_token: ``"<|endoftext|>"`` as SD1/SD2 and SDXL's first tokenizer; ``"!"`` (id 0) as
            SDXL's second tokenizer.
        directory: where to write the files; a temporary folder (removed afterwards) if None.

    Example:
        >>> tok = make_tokenizer()
        >>> tok("tinychar, red circle").input_ids[:3]  # bos, tinychar, ","
    """
    from transformers import CLIPTokenizer

    def load(folder: Path) -> CLIPTokenizer:
        write_tokenizer_files(folder)
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, pad_token=pad_token)

    if directory is not None:
        return load(Path(directory))
    with tempfile.TemporaryDirectory(prefix="loratools-tok-") as tmp:
        return load(Path(tmp))

"""CLIP and OpenCLIP tokenizers, built offline from the BPE file that ships with brushwork.

SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) share one byte-level BPE
vocabulary of 49408 tokens (``vocab/bpe_simple_vocab_16e6.txt.gz``, MIT, from OpenAI CLIP
via open_clip). They differ only in the padding token: CLIP pads with ``<|endoftext|>``,
OpenCLIP pads with id 0 (``!``).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

VOCAB_SIZE = 49408
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("brushwork.models").joinpath("vocab/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    assert len(symbols) == VOCAB_SIZE
    return {s: i for i, s in enumerate(symbols)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers ``CLIPTokenizer`` with the CLIP vocabulary; ``pad_token="!"`` for OpenCLIP (SD 2.x)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = MAX_LENGTH
    return tok


@lru_cache(maxsize=2)
def tokenizer_for(text_encoder_kind: str):
    """The tokenizer a family's text encoder expects: ``clip`` (SD 1.x) or ``openclip`` (SD 2.x).

    Built once per process (about a second); tokenizers are only read from, so it is shared.
    """
    if text_encoder_kind == "openclip":
        return clip_tokenizer(pad_token="!")
    return clip_tokenizer()

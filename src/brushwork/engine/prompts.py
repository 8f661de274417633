"""Prompts as A1111 reads them: emphasis weights and prompts longer than 77 tokens.

Syntax: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)`` x1.5, ``\\(`` for a
literal bracket, ``BREAK`` to start a new 75-token chunk. A long prompt is cut into chunks of 75
tokens; each is encoded on its own as ``<start> 75 tokens <end>`` and the results are joined, so
nothing after token 75 is dropped. Weights scale the token embeddings, then the mean is restored
(as A1111 does). A plain prompt under 76 tokens gives exactly diffusers' embedding.
"""

from __future__ import annotations

import re

CHUNK = 75

_TOKEN_RE = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [cat]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 0.909...)]``.

    Unbalanced brackets are closed at the end, as A1111 does. ``BREAK`` becomes ``("BREAK", -1)``.
    """
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _TOKEN_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            parts = _BREAK_RE.split(tok)
            for i, part in enumerate(parts):
                if i:
                    out.append(["BREAK", -1.0])
                if part:
                    out.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not out:
        return [("", 1.0)]
    merged: list[list] = []
    for text_part, w in out:  # join neighbours of equal weight
        if merged and merged[-1][1] == w and w != -1.0 and merged[-1][0] != "BREAK":
            merged[-1][0] += text_part
        else:
            merged.append([text_part, w])
    return [(t, w) for t, w in merged]


def tokenize_weighted(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """Chunks of at most 75 (token id, weight) pairs."""
    chunks: list[list[tuple[int, float]]] = [[]]
    for part, weight in parse_weights(text):
        if weight == -1.0:  # BREAK
            chunks.append([])
            continue
        ids = tokenizer(part, add_special_tokens=False)["input_ids"]
        for token in ids:
            if len(chunks[-1]) == CHUNK:
                chunks.append([])
            chunks[-1].append((token, weight))
    return [c for c in chunks if c] or [[]]


def encode(text_encoder, tokenizer, prompt: str, negative: str, *, clip_skip: int = 1, device=None):
    """(prompt_embeds, negative_prompt_embeds), each (1, 77*k, width) with the same k."""

    pos, neg = tokenize_weighted(tokenizer, prompt), tokenize_weighted(tokenizer, negative)
    k = max(len(pos), len(neg))
    pos += [[] for _ in range(k - len(pos))]
    neg += [[] for _ in range(k - len(neg))]
    return (_encode_chunks(text_encoder, tokenizer, pos, clip_skip, device),
            _encode_chunks(text_encoder, tokenizer, neg, clip_skip, device))


def _encode_chunks(text_encoder, tokenizer, chunks, clip_skip: int, device):
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, weights = [], []
    for chunk in chunks:
        tokens = [bos] + [t for t, _ in chunk] + [eos]
        w = [1.0] + [w for _, w in chunk] + [1.0]
        tokens += [pad] * (CHUNK + 2 - len(tokens))
        w += [1.0] * (CHUNK + 2 - len(w))
        ids.append(tokens)
        weights.append(w)
    input_ids = torch.tensor(ids, device=device)
    with torch.inference_mode():
        if clip_skip <= 1:
            z = text_encoder(input_ids)[0]
        else:
            hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
            final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
            z = final_norm(hidden)
        w = torch.tensor(weights, dtype=z.dtype, device=z.device)
        if not torch.all(w == 1):
            mean = z.mean()
            z = z * w.unsqueeze(-1)
            z = z * (mean / z.mean())
    return z.reshape(1, -1, z.shape[-1])

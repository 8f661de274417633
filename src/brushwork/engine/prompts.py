"""Prompts as A1111 reads them: emphasis weights and prompts longer than 77 tokens.

Syntax: ``(word)`` x1.1, ``((word))`` x1.21, ``[word]`` /1.1, ``(word:1.5)`` x1.5, ``\\(`` for a
literal bracket, ``BREAK`` to start a new 75-token chunk. A long prompt is cut into chunks of 75
tokens as A1111 cuts it: when a chunk fills up and its last comma is at most
``comma_padding_backtrack`` (20) tokens back, the words after that comma move to the next chunk.
Each chunk is encoded on its own as ``<start> 75 tokens <end>`` and the results are joined, so
nothing after token 75 is dropped. Emphasis (A1111's option of that name): ``Original`` scales the
token embeddings by their weights, then restores the chunk's mean; ``No norm`` only scales;
``Ignore`` reads the brackets but applies no weights; ``None`` reads brackets and ``BREAK`` as plain
text. A plain prompt under 76 tokens gives exactly diffusers' embedding.

A1111's extra-network tags (``<lora:name:0.8>``) are found by ``extra_network_spans`` (the caller applies and
removes them: ``engine/networks.py``). Textual-inversion embeddings (``models/embeddings.py``) are matched in
the token ids as A1111 matches them, and their vectors take the places of their tokens (``EmbeddingToken``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from ..request import EMPHASIS_CHOICES, InvalidRequest

CHUNK = 75
MAX_CHUNKS = 200  # 15000 tokens; past that a prompt is refused before the rest of it is tokenized
DEFAULT_EMPHASIS = "Original"
DEFAULT_COMMA_PADDING_BACKTRACK = 20

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_TEXT = r"(?:[^\\()\[\]:]++|:(?!\s*[\d.+\-]))*+"  # text, with the colons that cannot start a weight
_WEIGHT = r":\s*" + _NUMBER + r"\s*\)"
_RUN = _TEXT + r"(?:(?:[()\[\]]|" + _WEIGHT + r")" + _TEXT + r")*+"
# A1111's attention syntax (modules/prompt_parser.py): what is not matched here is text. Matched many of A1111's
# tokens at a time, so that a long prompt takes few steps: a run of brackets and ":1.5)" weights, each with the
# text after it, or a run of escapes (group 1). Every alternative starts with a character of its own, so that
# text is skipped fast, and none backtracks more than linearly (A1111's number pattern is quadratic on a long run
# of digits); spaces around a weight are allowed, as in ``(word: 1.5)``.
_SYNTAX_RE = re.compile(r"\(" + _RUN + r"|\)" + _RUN + r"|\[" + _RUN + r"|]" + _RUN + r"|" + _WEIGHT + _RUN
                        + r"|(\\[()\[\]\\]?(?:\\[()\[\]\\]?)*+)")
# in a run: brackets of one kind, or a weight, and the text after them
_STEP_RE = re.compile(r"(\(++|\)++|\[++|]++|:[^)]*\))(" + _TEXT + r")")
_BREAK_RE = re.compile(r"\bBREAK\b")  # the whitespace around it is stripped after the split (linear time)
_EXACT_WORK = 5_000_000  # item multiplications done one by one, in A1111's order, before the fast fallback
_PIECE = 8192  # characters; a longer fragment is tokenized piece by piece, so that a huge prompt stops early


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [cat]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 0.909...)]``.

    A1111's parse: unbalanced brackets are closed at the end, a lone ``\\`` is dropped, neighbours of
    equal weight are joined; ``BREAK`` becomes ``("BREAK", -1)``. Empty fragments are left out.
    Linear time in the text's length, where A1111's own parse is quadratic on deeply nested brackets.
    """
    items: list[str] = []  # the text between two bracket events, or a BREAK
    signs: list[float] = []  # each item's starting weight: 1, or -1 for a BREAK
    # the brackets, in the order they close: the first item inside, the item after the last, the factor
    firsts: list[int] = []
    stops: list[int] = []
    factors: list[float] = []
    round_open: list[int] = []
    square_open: list[int] = []
    pending: list[str] = []  # the text since the last bracket event, to be one item

    def flush() -> int:
        if pending:
            items.append(pending[0] if len(pending) == 1 else "".join(pending))
            signs.append(1.0)
            pending.clear()
        return len(items)

    def add_text(tok: str) -> None:  # as A1111 adds text: split at BREAK (even into empty parts)
        if "BREAK" not in tok:
            pending.append(tok)
            return
        parts = _BREAK_RE.split(tok)
        for i, part in enumerate(parts):
            if i:
                flush()
                items.append("BREAK")
                signs.append(-1.0)
                part = part.lstrip()
            pending.append(part.rstrip() if i < len(parts) - 1 else part)

    def close(stack: list[int], factor: float, count: int = 1) -> int:
        """Close ``count`` brackets (innermost first) or as many as are open; how many it closed."""
        if not stack:
            return 0
        end = flush()
        if count == 1:
            firsts.append(stack.pop())
            stops.append(end)
            factors.append(factor)
            return 1
        count = min(count, len(stack))
        firsts.extend(reversed(stack[-count:]))
        del stack[-count:]
        stops.extend([end] * count)
        factors.extend([factor] * count)
        return count

    pos = 0
    for m in _SYNTAX_RE.finditer(text):
        start, end = m.span()
        if start > pos:
            add_text(text[pos:start])
        pos = end
        if m.lastindex == 1:
            pending.append(m.group(1)[1::2])  # "\(" -> "(", "\\" -> "\", a lone "\" (only ever last) -> ""
            continue
        for head, rest in _STEP_RE.findall(m.group()):  # the hot loop of a pathological prompt: flush() inlined
            bracket = head[0]
            if bracket == "(" or bracket == "[":
                if pending:
                    items.append(pending[0] if len(pending) == 1 else "".join(pending))
                    signs.append(1.0)
                    pending.clear()
                (round_open if bracket == "(" else square_open).extend([len(items)] * len(head))
            elif bracket == ":":
                if not close(round_open, float(head[1:-1])):
                    pending.append(head)  # a weight outside brackets: text
            else:
                closed = close(round_open, 1.1, len(head)) if bracket == ")" else close(square_open, 1 / 1.1, len(head))
                if closed < len(head):
                    pending.append(head[closed:])  # more closing brackets than open ones: text
            if rest:
                if "BREAK" in rest:
                    add_text(rest)
                else:
                    pending.append(rest)
    if pos < len(text):
        add_text(text[pos:])
    end = flush()
    for stack, factor in ((round_open, 1.1), (square_open, 1 / 1.1)):  # unclosed: closed at the end, outermost first
        firsts += stack
        stops += [end] * len(stack)
        factors += [factor] * len(stack)
    if sum(stops) - sum(firsts) <= _EXACT_WORK:
        weights = signs[:]
        for s, e, f in zip(firsts, stops, factors, strict=True):  # as A1111: each bracket multiplies its items
            if e - s == 1:
                weights[s] *= f
            elif e > s:
                weights[s:e] = [w * f for w in weights[s:e]]
    else:
        weights = _fast_weights(signs, firsts, stops, factors)
    out: list[tuple[str, float]] = []
    group: list[str] = []
    for i, piece in enumerate(items):  # A1111 joins runs of equal weight
        group.append(piece)
        if i + 1 == len(items) or weights[i + 1] != weights[i]:
            joined = "".join(group)
            if joined:
                out.append((joined, weights[i]))
            group = []
    return out or [("", 1.0)]


def _fast_weights(signs: list[float], firsts: list[int], stops: list[int], factors: list[float]) -> list[float]:
    """The weights as sums of logarithms: A1111's but for the last bits. Only for pathological prompts
    (thousands of brackets around thousands of fragments), where multiplying one by one takes minutes."""
    import numpy as np

    n = len(signs)
    start, stop = np.array(firsts, dtype=np.intp), np.array(stops, dtype=np.intp)
    factor = np.array(factors, dtype=np.float64)

    def covered(values) -> np.ndarray:  # per item: the sum of ``values`` over the brackets around it
        acc = np.bincount(start, values, minlength=n + 1) - np.bincount(stop, values, minlength=n + 1)
        return np.cumsum(acc)[:n]

    magnitude = np.abs(factor)
    usable = np.isfinite(magnitude) & (magnitude > 0)
    with np.errstate(over="ignore"):
        w = np.exp(covered(np.log(np.where(usable, magnitude, 1.0))))
    w[covered(None) < 0.5] = 1.0  # exactly 1 outside every bracket
    if not usable.all() or (factor < 0).any():
        zeros, infinite = covered(factor == 0) > 0.5, covered(np.isinf(factor)) > 0.5
        w[infinite] = np.inf
        w[zeros] = 0.0
        w[(covered(np.isnan(factor)) > 0.5) | (zeros & infinite)] = np.nan
        w[np.round(covered(factor < 0)) % 2 == 1] *= -1.0
    w *= np.asarray(signs)
    return w.tolist()


def _is_word(ch: str) -> bool:  # the regular expression ``\w`` for str
    return ch.isalnum() or ch == "_"


def extra_network_spans(text: str):
    """A1111's extra-network tags (``modules/extra_networks.py``: ``<(\w+):([^>]+)>``) in ``text``: (start, end,
    kind, arguments split at ``:``) for each, left to right. In linear time, where that pattern is quadratic on
    many ``<word:`` without a ``>``."""
    n, pos, close = len(text), 0, -1
    start = text.find("<")
    while start != -1:
        colon = start + 1
        while colon < n and _is_word(text[colon]):
            colon += 1
        if colon > start + 1 and colon < n and text[colon] == ":":
            if close <= colon:
                close = text.find(">", colon + 1)  # the first ">" after the colon, kept while it is ahead
                if close == -1:
                    return
            if close > colon + 1:
                yield start, close + 1, text[start + 1:colon], text[colon + 1:close].split(":")
                pos = close + 1
                start = text.find("<", pos)
                continue
        start = text.find("<", start + 1)


def strip_extra_networks(text: str) -> str:
    """``text`` without its extra-network tags (A1111 removes every ``<kind:...>`` tag before reading the prompt)."""
    if "<" not in text:
        return text
    out, pos = [], 0
    for start, end, _, _ in extra_network_spans(text):
        out.append(text[pos:start])
        pos = end
    out.append(text[pos:])
    return "".join(out)


class EmbeddingToken(int):
    """One place in a chunk that a textual-inversion embedding's vector fills (vector ``index`` of ``embedding``).
    Its token id is 0, A1111's placeholder; the encoder's token embedding there is replaced by the vector."""

    embedding: object
    index: int

    def __new__(cls, embedding, index: int):
        token = int.__new__(cls, 0)
        token.embedding, token.index = embedding, index
        return token


def _embedding_at(lookup: dict, ids: list[int], position: int):
    """(embedding, how many token ids its name is) if an embedding's name starts at ``position``, else None;
    the longest name first (A1111's ``find_embedding_at_position``)."""
    for name_ids, embedding in lookup.get(ids[position], ()):
        if tuple(ids[position:position + len(name_ids)]) == name_ids:
            return embedding, len(name_ids)
    return None


def comma_token_id(tokenizer) -> int | None:
    """The id of ``,</w>`` in this tokenizer's vocabulary (CLIP and OpenCLIP: 267), or None."""
    try:
        token_id = tokenizer.convert_tokens_to_ids(",</w>")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if token_id is None or (token_id == tokenizer.unk_token_id and tokenizer.unk_token != ",</w>"):
        return None
    return token_id


def _token_ids(tokenizer, text: str):
    """``text``'s token ids, a long text in pieces cut at spaces (the CLIP tokenizers never join across one)."""
    pos, n = 0, len(text)
    while pos < n:
        cut = n
        if n - pos > _PIECE:
            cut = text.rfind(" ", pos + 1, pos + _PIECE)
            if cut < 0:
                cut = text.find(" ", pos + _PIECE)
                cut = n if cut < 0 else cut
        yield tokenizer(text[pos:cut], add_special_tokens=False)["input_ids"]
        pos = cut


def tokenize_weighted(tokenizer, text: str, *, emphasis: str = DEFAULT_EMPHASIS,
                      comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK,
                      embeddings=None) -> list[list[tuple[int, float]]]:
    """A1111's chunks: lists of at most 75 (token id, weight) pairs, one list per 75-token chunk.

    A chunk that ended at a comma (``comma_padding_backtrack``) or at ``BREAK`` is shorter; it is padded
    when encoded. Raises InvalidRequest as soon as there would be more than MAX_CHUNKS chunks, without
    tokenizing the rest. ``embeddings`` (``models.embeddings.EmbeddingDatabase``): where the token ids of an
    embedding's name are, its vectors (``EmbeddingToken``) count as that many tokens, all in one chunk (as A1111;
    the comma backtrack moves them with the words around them, where A1111 leaves them behind).
    """
    lookup = embeddings.lookup(tokenizer) if embeddings is not None else None
    parsed = [(text, 1.0)] if emphasis == "None" else parse_weights(text)
    comma = comma_token_id(tokenizer)
    chunks: list[list[tuple[int, float]]] = []
    chunk: list[tuple[int, float]] = []
    last_comma = -1

    def too_long() -> InvalidRequest:
        return InvalidRequest(f"the prompt is too long: more than {MAX_CHUNKS * CHUNK} tokens ({MAX_CHUNKS} "
                              f"chunks of {CHUNK}); shorten it")

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        if len(chunks) == MAX_CHUNKS:
            raise too_long()
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for part, weight in parsed:
        if part == "BREAK" and weight == -1:
            next_chunk()
            continue
        for ids in _token_ids(tokenizer, part):
            skip = 0  # token ids of an embedding's name, already taken
            for position, token in enumerate(ids):
                if skip:
                    skip -= 1
                    continue
                if token == comma:
                    last_comma = len(chunk)
                elif (comma_padding_backtrack and len(chunk) == CHUNK and last_comma != -1
                      and len(chunk) - last_comma <= comma_padding_backtrack):
                    moved = chunk[last_comma + 1:]  # the words after the comma go to the next chunk
                    chunk = chunk[:last_comma + 1]
                    next_chunk()
                    chunk = moved
                if len(chunk) == CHUNK:
                    next_chunk()
                if len(chunks) == MAX_CHUNKS:  # this token would open one chunk too many
                    raise too_long()
                found = _embedding_at(lookup, ids, position) if lookup else None
                if found is None:
                    chunk.append((token, weight))
                    continue
                embedding, skip = found
                skip -= 1
                if len(chunk) + embedding.count > CHUNK:
                    next_chunk()
                    if len(chunks) == MAX_CHUNKS:
                        raise too_long()
                chunk += [(EmbeddingToken(embedding, i), weight) for i in range(embedding.count)]
                embeddings.used[embedding.name] = embedding
    if chunk or not chunks:
        next_chunk()
    return chunks


def chunk_inputs(tokenizer, chunks) -> tuple[list[list[int]], list[list[float]]]:
    """Each chunk as the text encoder reads it: 77 token ids ``<start> tokens <end> <pad>...`` and their weights."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, weights = [], []
    for chunk in chunks:
        tokens = [bos] + [t for t, _ in chunk] + [eos]
        w = [1.0] + [w for _, w in chunk] + [1.0]
        ids.append(tokens + [pad] * (CHUNK + 2 - len(tokens)))
        weights.append(w + [1.0] * (CHUNK + 2 - len(w)))
    return ids, weights


def encode(text_encoder, tokenizer, prompt: str, negative: str, *, clip_skip: int = 1, device=None,
           emphasis: str = DEFAULT_EMPHASIS, comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK,
           embeddings=None):
    """(prompt_embeds, negative_prompt_embeds), each (1, 77*k, width) with the same k. ``embeddings``: the
    textual-inversion embeddings the prompts may name (``models.embeddings.EmbeddingDatabase``). ``negative``
    None: a run without CFG never reads it, so it is not encoded (zeros of the prompt's shape)."""
    if emphasis not in EMPHASIS_CHOICES:
        raise InvalidRequest(f"unknown emphasis {emphasis!r}; choose one of: {', '.join(EMPHASIS_CHOICES)}")
    options = dict(emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack, embeddings=embeddings)
    if negative is None:
        z = _encode_chunks(text_encoder, tokenizer, tokenize_weighted(tokenizer, prompt, **options), clip_skip,
                           device, emphasis)
        return z, z.new_zeros(z.shape)
    pos, neg = tokenize_weighted(tokenizer, prompt, **options), tokenize_weighted(tokenizer, negative, **options)
    k = max(len(pos), len(neg))
    pos += [[] for _ in range(k - len(pos))]  # the shorter one is padded with empty chunks (the empty prompt)
    neg += [[] for _ in range(k - len(neg))]
    return (_encode_chunks(text_encoder, tokenizer, pos, clip_skip, device, emphasis),
            _encode_chunks(text_encoder, tokenizer, neg, clip_skip, device, emphasis))


def encode_xl(encoders, prompt: str, negative: str, *, clip_skip: int = 1, device=None,
              emphasis: str = DEFAULT_EMPHASIS, comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK,
              embeddings=None):
    """SDXL's conditioning: ``encoders`` is [(text_encoder, tokenizer), ...] (base: CLIP-L and OpenCLIP-bigG;
    the refiner: bigG alone), the last one with a projection. Each encoder reads the same chunks on its own,
    its penultimate layer (one further back per clip skip) weighted per chunk as A1111 does; the features are
    joined side by side. The pooled embedding is the last encoder's, of the first chunk, unweighted (as A1111).
    An empty negative prompt is zeros, embedding and pooled, as A1111's and diffusers' SDXL; so is ``negative``
    None (a run without CFG, which never reads it: not encoded).
    Returns (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)."""
    import torch

    if emphasis not in EMPHASIS_CHOICES:
        raise InvalidRequest(f"unknown emphasis {emphasis!r}; choose one of: {', '.join(EMPHASIS_CHOICES)}")
    options = dict(emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack, embeddings=embeddings)
    tokenizer = encoders[-1][1]  # the vocabularies are the same; only the padding differs
    pos = tokenize_weighted(tokenizer, prompt, **options)
    neg = tokenize_weighted(tokenizer, negative, **options) if negative else []  # "" and None: zeros, unread
    k = max(len(pos), len(neg))
    pos += [[] for _ in range(k - len(pos))]
    neg += [[] for _ in range(k - len(neg))]
    out = []
    for chunks in (pos, neg) if negative else (pos,):
        encoded = [_encode_chunks(te, tok, chunks, clip_skip, device, emphasis, penultimate=True)
                   for te, tok in encoders]
        out.append((torch.cat([z for z, _ in encoded], dim=-1), encoded[-1][1]))
    (z, pooled), (neg_z, neg_pooled) = out if negative else (out[0], out[0])
    if not negative:
        neg_z, neg_pooled = torch.zeros_like(neg_z), torch.zeros_like(neg_pooled)
    return z, neg_z, pooled, neg_pooled


@contextmanager
def _embedding_vectors(text_encoder, all_ids):
    """While encoding chunks (``place(ids)`` before each), the text encoder's token embeddings at a chunk's
    ``EmbeddingToken`` places are that embedding's vectors for this encoder (SDXL: clip_l or clip_g; A1111's
    ``EmbeddingsWithFixes``). Without embeddings in the chunks nothing is hooked."""
    if not any(isinstance(token, EmbeddingToken) for ids in all_ids for token in ids):
        yield lambda ids: None
        return
    from ..models.embeddings import encoder_kind

    layer, kind, current = text_encoder.get_input_embeddings(), encoder_kind(text_encoder), []

    def place(ids) -> None:
        current[:] = [(i, token) for i, token in enumerate(ids) if isinstance(token, EmbeddingToken)]

    def hook(module, args, output):
        if not current:
            return output
        output = output.clone()
        for i, token in current:
            output[:, i] = token.embedding.vectors_for(kind)[token.index].to(output.device, output.dtype)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield place
    finally:
        handle.remove()


def _encode_chunks(text_encoder, tokenizer, chunks, clip_skip: int, device, emphasis: str, *,
                   penultimate: bool = False):
    """Each chunk through the text encoder on its own, its weights applied to it alone (as A1111).
    ``penultimate`` (SDXL): the hidden states before the last layer (clip skip goes further back), without the
    final layer norm; returns (embeddings, the first chunk's pooled projection or None)."""
    import torch

    all_ids, all_weights = chunk_inputs(tokenizer, chunks)
    zs, pooled = [], None
    with torch.inference_mode(), _embedding_vectors(text_encoder, all_ids) as place:
        for ids, weights in zip(all_ids, all_weights, strict=True):
            input_ids = torch.tensor([ids], device=device)
            place(ids)  # the vectors of this chunk's embeddings take their tokens' places
            if penultimate:
                output = text_encoder(input_ids, output_hidden_states=True)
                z = output.hidden_states[-1 - max(1, clip_skip)]
                if pooled is None:
                    pooled = getattr(output, "text_embeds", None)
            elif clip_skip <= 1:
                z = text_encoder(input_ids)[0]
            else:
                hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
                final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
                z = final_norm(hidden)
            if emphasis in ("Original", "No norm") and any(w != 1.0 for w in weights):
                w = torch.tensor([weights], dtype=torch.float32, device=z.device)  # as A1111's multipliers
                weighted = z * w.unsqueeze(-1)
                if emphasis == "Original":  # restore this chunk's mean
                    weighted = weighted * (z.mean() / weighted.mean())
                z = weighted.to(z.dtype)
            zs.append(z)
    return (torch.cat(zs, dim=1), pooled) if penultimate else torch.cat(zs, dim=1)

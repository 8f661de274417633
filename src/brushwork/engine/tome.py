"""Token merging (opt-in, A1111's "Token merging ratio"): fewer tokens in the UNet's costliest attention.

ToMe for Stable Diffusion (Bolya & Hoffman 2023, arXiv:2303.17604): at the UNet's full latent
resolution, self-attention over h*w tokens dominates the cost of a step. Before each such
self-attention, a fraction ``ratio`` of the tokens is merged (averaged) into similar tokens, the
attention runs on the rest, and its output is copied back to every merged token. The pairing is a
bipartite matching: one "destination" token per 2x2 cell of the latent grid, every other token is a
"source" that may be merged into its most similar destination (cosine similarity); the ``r`` most
similar sources are merged. Which token of a cell is the destination rotates from call to call, so
no position is favoured; it does not depend on any random state, so a seed still gives one picture.

    with token_merging(parts.unet, ratio=0.5):
        pipe(...)

The tomesd package implements the same idea, but it patches diffusers' transformer blocks by
rewriting their ``forward`` and does not run with the diffusers this project uses; here only the
self-attention module is wrapped, so the block's own code (and any future change to it) stays.
"""

from __future__ import annotations

from contextlib import contextmanager


def _matching(x, h: int, w: int, r: int, turn: int):
    """(merge, unmerge) for tokens ``x`` (B, h*w, C): ``r`` source tokens merged into destinations."""
    import torch

    batch, count, channels = x.shape
    grid = torch.zeros(h, w, dtype=torch.bool)
    dy, dx = divmod(turn % 4, 2)
    grid[dy::2, dx::2] = True
    dst_idx = grid.flatten().nonzero().squeeze(1).to(x.device)
    src_idx = (~grid).flatten().nonzero().squeeze(1).to(x.device)
    r = min(r, src_idx.numel())
    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # (B, sources, destinations)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    into = best_dst.gather(1, merged)  # the destination of each merged source

    def expand(index):
        return index[..., None].expand(-1, -1, channels)

    def merge(t):
        src, dst = t[:, src_idx], t[:, dst_idx]
        dst = dst.scatter_reduce(1, expand(into), src.gather(1, expand(merged)), reduce="mean", include_self=True)
        return torch.cat([src.gather(1, expand(kept)), dst], dim=1)

    def unmerge(t):
        n_kept = kept.shape[1]
        kept_out, dst_out = t[:, :n_kept], t[:, n_kept:]
        src_out = t.new_empty(batch, src_idx.numel(), t.shape[-1])
        src_out.scatter_(1, expand(kept), kept_out)
        src_out.scatter_(1, expand(merged), dst_out.gather(1, expand(into)))
        out = t.new_empty(batch, count, t.shape[-1])
        out[:, src_idx] = src_out
        out[:, dst_idx] = dst_out
        return out

    return merge, unmerge


@contextmanager
def token_merging(unet, ratio: float):
    """Within the block, the self-attention at the UNet's full latent resolution sees ``ratio`` fewer tokens."""
    if not ratio:
        yield
        return
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    state = {"h": 0, "w": 0, "calls": 0}

    def wrapped(attention):
        compute = attention.forward

        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            h, w = state["h"], state["w"]
            if encoder_hidden_states is not None or hidden_states.dim() != 3 or hidden_states.shape[1] != h * w:
                return compute(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            merge, unmerge = _matching(hidden_states, h, w, int(h * w * ratio), state["calls"])
            return unmerge(compute(merge(hidden_states), None, attention_mask, **kwargs))

        return forward

    def note_size(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        state["h"], state["w"] = sample.shape[-2:]
        state["calls"] += 1

    from .hooks import patched_forwards

    with patched_forwards(unet, {block.attn1: wrapped(block.attn1) for block in blocks}, note_size):
        yield state

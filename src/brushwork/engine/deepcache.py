"""Fast mode (opt-in): reuse the UNet's deep features across steps, DeepCache-style.

DeepCache (Ma, Fang, Wang 2023, arXiv:2312.00858) observes that the deep, low-resolution part of
the UNet changes little from one denoising step to the next. Every ``interval``-th UNet call runs
in full and keeps the outputs of the deep blocks (every down block but the first, the middle block,
every up block but the last); the calls in between run only the full-resolution shell (``conv_in``,
the first down block, the last up block, ``conv_out``) on fresh inputs and take the deep features
from the last full call. It trades a little fidelity for speed; ``benchmarks/image.py`` reports both.

    with deep_cache(parts.unet, interval=3):
        pipe(...)
"""

from __future__ import annotations

from contextlib import contextmanager

DEFAULT_INTERVAL = 3


@contextmanager
def deep_cache(unet, interval: int = DEFAULT_INTERVAL):
    """Within the block, only every ``interval``-th call of ``unet`` computes its deep blocks."""
    if interval <= 1:
        yield
        return
    deep = [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]
    cache: dict[int, object] = {}
    state = {"calls": 0, "full": True}

    def cached(module):
        compute = module.forward

        def forward(*args, **kwargs):
            if state["full"] or id(module) not in cache:
                cache[id(module)] = compute(*args, **kwargs)
            return cache[id(module)]

        return forward

    def count(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        shape = tuple(sample.shape)
        # a full call every interval calls, and whenever the input's shape changes (a new batch)
        state["full"] = state["calls"] % interval == 0 or state.get("shape") != shape
        state["calls"], state["shape"] = state["calls"] + 1, shape

    from .hooks import patched_forwards

    try:
        with patched_forwards(unet, {module: cached(module) for module in deep}, count):
            yield state
    finally:
        cache.clear()


def interval_for(fast) -> int:
    """A request's fast mode as an interval: true -> every 3rd call in full; a number -> that interval (0, 1 and
    false: off, every call in full)."""
    if fast is None or fast is False or fast == 0:
        return 1
    if fast is True:
        return DEFAULT_INTERVAL
    try:
        interval = int(fast)
    except (TypeError, ValueError):
        interval = 0
    if interval < 1:
        from ..request import InvalidRequest

        raise InvalidRequest(f"fast must be true, false or a whole number of steps >= 1, got {fast!r}")
    return interval

"""Temporary changes to a UNet's modules for one run (fast mode, token merging), undone afterwards."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager


@contextmanager
def patched_forwards(unet, forwards: dict, before_each_call: Callable):
    """Within the block, each module in ``forwards`` runs the given function instead of its ``forward``,
    and ``before_each_call(unet, args, kwargs)`` sees every call of ``unet``. Everything is undone on exit."""
    for module, forward in forwards.items():
        module.forward = forward  # the instance attribute shadows the class's forward
    handle = unet.register_forward_pre_hook(before_each_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for module in forwards:
            del module.forward

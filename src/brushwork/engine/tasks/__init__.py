"""The task table: one module per pipeline, as the sampler table is one row per sampler.

A task says which models it takes, how a request becomes pipeline inputs for one batch (init image,
mask, noise, ...), what it does to the decoded pictures, and which infotext keys it adds. Everything
every task shares (sizes and seeds, batches, progress / cancel / interrupt / skip, the out-of-memory
ladder, decode, watermark, the result) is ``engine.run.generate``. A new pipeline is a new module here
and one line in ``_MODULES``. Importing this imports no torch.
"""

from __future__ import annotations

from importlib import import_module

from ...request import InvalidRequest, Mode
from .base import RunContext, RunControl, Task

__all__ = ["RunContext", "RunControl", "Task", "task_for"]

_MODULES = {
    Mode.TXT2IMG: "txt2img",
    Mode.IMG2IMG: "img2img",
    Mode.INPAINT: "inpaint",
    Mode.DEPTH2IMG: "depth2img",
    Mode.UPSCALE: "upscale",
}


def task_for(request, parts=None) -> Task:
    """The task that runs this request: by its mode, except a txt2img request with the hires fix on, and img2img
    on a depth model (``parts``, the loaded model), which is depth2img, as A1111's img2img on a depth checkpoint."""
    name = _MODULES.get(request.mode)
    if request.mode is Mode.TXT2IMG and getattr(request, "hires_enabled", False):
        name = "hires"  # txt2img, then an upscale and an img2img pass (still Mode.TXT2IMG)
    if request.mode is Mode.IMG2IMG and parts is not None and parts.family.unet_in_channels == 5:
        name = "depth2img"  # the UNet needs a depth channel (still Mode.IMG2IMG)
    if name is None:
        done = ", ".join(m.value for m in _MODULES)
        raise InvalidRequest(f"{request.mode.value} arrives in a later version; this one does {done}")
    return import_module(f"{__name__}.{name}").TASK

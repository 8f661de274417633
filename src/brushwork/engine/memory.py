"""Memory modes and the out-of-memory ladder.

``high``: everything on the device. ``medium``: + attention slicing and VAE slicing.
``low``: + model CPU offload (one component on the GPU at a time) and VAE tiling.
``minimal``: sequential CPU offload (one layer at a time) and VAE tiling.
``auto``: start from what free memory suggests; on an out-of-memory error step down and retry
the same request (same seed, so the same image).
"""

from __future__ import annotations

MODES = ("high", "medium", "low", "minimal")


def check_mode(mode: str) -> str:
    from ..request import InvalidRequest

    if mode not in ("auto", *MODES):
        raise InvalidRequest(f"unknown memory mode {mode!r}; choose one of: auto, {', '.join(MODES)}")
    return mode


def initial_mode(mode: str, policy, model_bytes: int) -> str:
    """The mode to start with. On a CPU the modes change nothing but VAE tiling for huge images."""
    if mode != "auto":
        return mode
    if policy.is_cpu or not policy.device.startswith("cuda"):
        return "high"
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(policy.device))
    if free > model_bytes * 2.5:
        return "high"
    if free > model_bytes * 1.5:
        return "medium"
    if free > model_bytes * 0.6:
        return "low"
    return "minimal"


def next_mode(mode: str) -> str | None:
    i = MODES.index(mode)
    return MODES[i + 1] if i + 1 < len(MODES) else None


def apply(pipe, mode: str, policy, *, large_image: bool = False) -> None:
    """Configure a pipeline (whose modules are already loaded) for a memory mode."""
    on_gpu = not policy.is_cpu
    if mode in ("medium", "low", "minimal"):
        pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()
    if mode in ("low", "minimal") or large_image:
        pipe.vae.enable_tiling()
    if on_gpu and mode == "low":
        pipe.enable_model_cpu_offload(device=policy.device)
    elif on_gpu and mode == "minimal":
        pipe.enable_sequential_cpu_offload(device=policy.device)


def is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()

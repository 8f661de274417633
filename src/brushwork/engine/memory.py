"""Memory modes and the out-of-memory ladder, as one explicit plan per run.

``high``: every component on the device; attention through PyTorch's SDPA (memory-efficient
kernels, so no attention slicing); VAE tiling only for images over a megapixel.
``medium``: + VAE slicing (one image of a batch decoded at a time) and VAE tiling (an image larger
than the VAE's native tile is decoded in overlapping, blended tiles: bounded memory at any size).
``low``: + model CPU offload (one component on the GPU at a time); VAE tiles of at most 512 pixels.
``minimal``: sequential CPU offload (one layer on the GPU at a time) + attention slicing; VAE tiles
of 256 pixels (even a 512x512 image is decoded in blended tiles, in a fraction of the memory).
``auto``: start from what free device memory suggests for this model and image size; on an
out-of-memory error step down the ladder and retry the same request (same seed, same image as
that mode gives); the mode that worked is kept for the next requests to the same model.

On a CPU there is nothing to offload to: ``low`` and ``minimal`` are ``medium``, and the ladder
skips modes that would change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("high", "medium", "low", "minimal")

# Rough peak activation memory per output pixel of one image, at 2 bytes per value (fp16/bf16),
# for SD-sized models: the VAE decoder dominates (a few KB/pixel untiled); the UNet with SDPA is far
# below. Used only to pick the first mode in ``auto``; the out-of-memory ladder corrects mistakes.
ACTIVATION_BYTES_PER_PIXEL = 6_000
TILE_PIXELS = 512 * 512  # about what a tiled decode holds at once
MARGIN_BYTES = 512 * 2**20
LARGE_IMAGE_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    """What a memory mode means for one run: which diffusers mechanisms are on."""

    mode: str
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str | None = None  # None (all on the device) | "model" | "sequential"
    vae_tile: int | None = None  # largest VAE tile in pixels; None: the VAE's native size

    def mechanisms(self) -> tuple:
        return (self.attention_slicing, self.vae_slicing, self.vae_tiling, self.offload, self.vae_tile)


def check_mode(mode: str) -> str:
    from ..request import InvalidRequest

    if mode not in ("auto", *MODES):
        raise InvalidRequest(f"unknown memory mode {mode!r}; choose one of: auto, {', '.join(MODES)}")
    return mode


def plan(mode: str, policy, *, pixels: int = 0) -> MemoryPlan:
    """The mechanisms a mode uses on this device, for an image of ``pixels`` pixels."""
    check_mode(mode)
    on_gpu = not policy.is_cpu
    if mode == "high":
        return MemoryPlan("high", vae_tiling=pixels > LARGE_IMAGE_PIXELS)
    if mode == "medium" or not on_gpu:
        return MemoryPlan(mode, vae_slicing=True, vae_tiling=True)
    if mode == "low":
        return MemoryPlan("low", vae_slicing=True, vae_tiling=True, offload="model", vae_tile=512)
    return MemoryPlan("minimal", attention_slicing=True, vae_slicing=True, vae_tiling=True, offload="sequential",
                      vae_tile=256)


def next_mode(mode: str, policy=None, *, pixels: int = 0) -> str | None:
    """The next mode down the ladder that changes something on this device, or None at the bottom."""
    current = plan(mode, policy, pixels=pixels).mechanisms() if policy is not None else None
    for candidate in MODES[MODES.index(mode) + 1:]:
        if policy is None or plan(candidate, policy, pixels=pixels).mechanisms() != current:
            return candidate
    return None


def initial_mode(mode: str, policy, modules, *, pixels: int, batch: int, floor: str | None = None) -> str:
    """The mode to start with: the one asked for, or in ``auto`` what free memory suggests
    (never above ``floor``, the mode an earlier out-of-memory error stepped down to)."""
    if mode != "auto":
        return mode
    chosen = "high"
    if policy.device.startswith("cuda"):
        chosen = _mode_for_free_memory(policy, modules, pixels=pixels, batch=batch)
    if floor is not None and MODES.index(floor) > MODES.index(chosen):
        chosen = floor
    return chosen


def _mode_for_free_memory(policy, modules, *, pixels: int, batch: int) -> str:
    import torch

    device = torch.device(policy.device)
    free, _total = torch.cuda.mem_get_info(device)
    sizes = {name: _bytes(m) for name, m in modules.items()}
    resident = sum(_bytes(m, on=device) for m in modules.values())
    budget = free + resident  # our own weights already on the GPU count as available to us
    scale = policy.dtype.itemsize / 2
    per_image = ACTIVATION_BYTES_PER_PIXEL * scale
    if budget > sum(sizes.values()) + batch * pixels * per_image + MARGIN_BYTES:
        return "high"
    if budget > sum(sizes.values()) + min(pixels, TILE_PIXELS) * per_image + MARGIN_BYTES:
        return "medium"
    if budget > max(sizes.values()) + min(pixels, TILE_PIXELS) * per_image + MARGIN_BYTES:
        return "low"
    return "minimal"


def _bytes(module, on=None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if on is None or p.device == on)


def apply(pipe, memory_plan: MemoryPlan, policy) -> None:
    """Configure a pipeline for a plan. Modules keep the settings of the last plan applied to them
    (they outlive the pipeline), so everything a plan does not want is switched off here."""
    remove_offload(pipe)
    if memory_plan.attention_slicing:
        pipe.enable_attention_slicing("max")
    elif _sliced(pipe.unet):
        pipe.disable_attention_slicing()  # back to SDPA
    if memory_plan.vae_slicing:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    if memory_plan.vae_tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    set_vae_tile(pipe.vae, memory_plan.vae_tile)
    if memory_plan.offload == "model":
        pipe.enable_model_cpu_offload(device=policy.device)
    elif memory_plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=policy.device)
    else:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                       getattr(pipe, "controlnet", None)):
            if module is not None and any(p.device.type != policy.device.split(":")[0] for p in module.parameters()):
                module.to(policy.device)


def set_vae_tile(vae, pixels: int | None) -> None:
    """Tiles of at most ``pixels`` (never above the VAE's native size), or the native size for None."""
    native = vae.config.sample_size
    native = native[0] if isinstance(native, list | tuple) else native
    side = min(native, pixels) if pixels else native
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size = side
    vae.tile_latent_min_size = side // factor


def remove_offload(pipe) -> None:
    """Undo CPU offload (accelerate hooks); the weights come back from the meta device to the CPU."""
    import gc

    import torch

    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    hooked = any(hasattr(sub, "_hf_hook") for m in modules for sub in m.modules())
    pipe.remove_all_hooks()
    if hooked:  # a full collection walks every live object (~1 s with torch and diffusers loaded): only when needed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sliced(unet) -> bool:
    from diffusers.models.attention_processor import SlicedAttnProcessor

    return any(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())


def is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    # CUDA and MPS say "out of memory"; a CPU allocation failure says "DefaultCPUAllocator: can't allocate memory"
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Ladder:
    """The memory modes one run goes through: it starts where ``initial_mode`` says, puts each pipeline the run
    uses in the current mode (``use``), and on an out-of-memory error steps down and runs the same attempt again
    (same seeds: the picture that mode gives). In ``auto`` the mode that worked becomes ``state["floor"]``, where
    later runs of the same model start; a fixed mode that runs out, or the bottom of the ladder, is a one-line
    error naming what to try."""

    def __init__(self, memory_mode: str, policy, modules, *, pixels: int, batch: int, state: dict):
        self.asked, self.policy, self.pixels, self.state = memory_mode, policy, pixels, state
        self.mode = self.first = initial_mode(memory_mode, policy, modules, pixels=pixels, batch=batch,
                                              floor=state.get("floor"))
        self._applied: tuple | None = None  # (pipeline, mode) last configured
        self._pipe = None

    def use(self, pipe) -> None:
        if self._applied != (id(pipe), self.mode):
            self._pipe = pipe
            apply(pipe, plan(self.mode, self.policy, pixels=self.pixels), self.policy)
            self._applied = (id(pipe), self.mode)

    def attempt(self, run):
        """``run()``, again one mode lower after each out-of-memory error."""
        from ..request import Cancelled, InvalidRequest

        while True:
            try:
                return run()
            except Cancelled:
                raise
            except Exception as err:
                if not is_oom(err):
                    raise
                lower = next_mode(self.mode, self.policy, pixels=self.pixels)
                del err  # its traceback holds the tensors that filled the memory
                if self.asked != "auto" or lower is None:
                    if self._pipe is not None:
                        remove_offload(self._pipe)
                    hint = (f"try --memory {lower} or " if lower else "try ") + "a smaller size or batch"
                    raise InvalidRequest(f"out of memory in memory mode {self.mode}; {hint}") from None  # err is deleted above (its memory)
                self.mode = self.state["floor"] = lower

    def note(self) -> str | None:
        if self.mode == self.first:
            return None
        return (f"out of memory in memory mode {self.first}; ran again in mode {self.mode} with the same seeds "
                "(later runs of this model start there)")

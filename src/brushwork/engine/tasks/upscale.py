"""upscale: a picture four times larger, by the SD 2 x4 upscaler (diffusers' StableDiffusionUpscalePipeline).

The model denoises latents at the low-res picture's own size, with the picture (noised to ``noise_level`` by the
pipeline's low-res DDPM scheduler) beside them as 3 more input channels and the noise level as a class label; the
VAE (3 levels, scaling factor 0.08333) decodes them at 4x. The prompt is optional (empty by default).

Seeds: each image of a batch gets its own CPU generator seeded ``seed + i``, which the pipeline draws from in its
own order (the low-res picture's noise, the starting latents, then the sampler's noise), so brushwork's result is
plain diffusers' result with those generators, on any device.

Sizes: the output is exactly 4x the input. An input that is not a multiple of 8 is padded (its edge pixels
repeated) to one, upscaled, and the padding cut off again. ``width`` / ``height`` do not apply.

Tiles (``tile_size``, ``tile_overlap``, in low-res pixels = latent pixels): an input larger than the tile runs
the UNet per overlapping tile at every step, blended (``engine.tiles``), and decodes per tile; memory is bounded by
the tile, not the picture. Smaller inputs run whole, exactly as the plain pipeline.

Out of memory (``smaller_tiles``): the UNet's denoising, or the decode, runs again in tiles of half the size (and
half the overlap), down to ``MIN_TILE`` latent pixels, in any memory mode: memory is bounded by the tile, so this is
what frees it (an input no larger than the tile then runs in tiles). The same seeds; the picture changes a little,
as any tiling does, and the result's notes say the tile it ended with. At the smallest tile the error goes on to the
memory ladder (``memory.Ladder``: the lower modes, in ``auto``), which keeps that tile.

CFG: with an empty prompt and an empty negative prompt the two halves of CFG get the same text, so
``uncond + s * (cond - uncond)`` is ``cond``: the same prediction for half the UNet passes. Such a request runs
without CFG, whatever its scale (the picture is the same, up to float rounding).

Defaults, measured (``benchmarks/upscale.py``, docs/upscale.md): the plain pipeline's 75 DDIM steps with CFG 9 are
150 UNet passes per picture; brushwork's ``upscale`` command runs ``DEFAULTS`` (20 DPM++ 2M Karras steps, one
pass each with an empty prompt), and ``PLAIN_DEFAULTS`` (``--plain-defaults``) are the plain pipeline's.
"""

from __future__ import annotations

from ...request import Cancelled, InvalidRequest, Mode, ProgressInfo
from .base import RunContext, Stop, Task, needs_init_image

FACTOR = 4
MIN_TILE = 32  # latent pixels: the smallest tile an out-of-memory error halves the tile to (the request's minimum)
DEFAULTS = {"sampler": "DPM++ 2M", "scheduler": "Karras", "steps": 20, "cfg_scale": 9.0}
PLAIN_DEFAULTS = {"sampler": "DDIM", "scheduler": "Automatic", "steps": 75, "cfg_scale": 9.0}  # diffusers' own


def accepts(parts) -> str | None:
    if parts.family.unet_in_channels != 7:
        return (f"{parts.name} ({parts.family.label}) is not an upscaler; upscale takes the SD x4 upscaler "
                "(x4-upscaler-ema.safetensors), or use --upscaler for a non-diffusion upscaler")
    return None


def padded(image, multiple: int = 8):
    """``image`` grown to a multiple of ``multiple`` on the right and bottom, its edge pixels repeated."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    right, bottom = -w % multiple, -h % multiple
    if not (right or bottom):
        return image
    return Image.fromarray(np.pad(np.asarray(image), ((0, bottom), (0, right), (0, 0)), mode="edge"))


def guidance(request) -> float:
    """The CFG scale the pipeline runs: none (1) when the prompt and the negative prompt are both empty."""
    if not request.prompt.strip() and not request.negative_prompt.strip():
        return 1.0
    return float(request.cfg_scale)


def prepare(ctx: RunContext) -> None:
    needs_init_image(ctx)
    r = ctx.request
    for name, value in (("fast mode", r.fast), ("token merging", r.token_merging_ratio)):
        if value:
            raise InvalidRequest(f"{name} does not apply to upscale; leave it off")
    limit = ctx.parts.pipeline_config.get("max_noise_level", 350)
    if r.noise_level > limit:
        raise InvalidRequest(f"noise level {r.noise_level} is over this model's limit of {limit}")
    image = r.init_image.convert("RGB")
    ctx.data["size"] = image.size
    ctx.data["source"] = padded(image)


def current_tile(ctx: RunContext) -> tuple[int, int]:
    """(tile, overlap) in latent pixels: the request's, or what out-of-memory errors halved them to."""
    return ctx.data.setdefault("tile", (int(ctx.request.tile_size), int(ctx.request.tile_overlap)))


def smaller_tiles(ctx: RunContext, run):
    """``run(tile, overlap)``, again with both halved after each out-of-memory error (the tile a multiple of 8, at
    least ``MIN_TILE``); an error at the smallest tile, and any other error, is raised."""
    from ..memory import is_oom

    while True:
        tile, overlap = current_tile(ctx)
        try:
            return run(tile, overlap)
        except Exception as err:
            smaller = max(MIN_TILE, tile // 2 // 8 * 8)
            if not is_oom(err) or smaller >= tile:
                raise
        # out of the except block: the error's traceback, which holds the tensors that filled the memory, is gone
        _free_memory()
        ctx.data["tile"] = (smaller, overlap * smaller // tile)  # overlap <= tile / 2 stays so


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def notes(ctx: RunContext) -> list[str]:
    r = ctx.request
    tile, overlap = current_tile(ctx)
    if tile == r.tile_size:
        return []
    return [f"out of memory in tiles of {r.tile_size} latent pixels (overlap {r.tile_overlap}); ran in tiles of "
            f"{tile} (overlap {overlap}) with the same seeds, which changes the picture a little"]


def pipe(ctx: RunContext):
    """StableDiffusionUpscalePipeline over the loaded components (made once per run), in the memory mode."""
    if "upscale" not in ctx._pipes:
        import diffusers

        from ..samplers import build_scheduler

        parts, r = ctx.parts, ctx.request
        config = parts.pipeline_config
        ctx._pipes["upscale"] = diffusers.StableDiffusionUpscalePipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            low_res_scheduler=diffusers.DDPMScheduler.from_config(config["low_res_scheduler"]),
            scheduler=build_scheduler(parts.scheduler_config, r.sampler, r.scheduler),
            max_noise_level=config.get("max_noise_level", 350))
        ctx._pipes["upscale"].set_progress_bar_config(disable=True)
    p = ctx._pipes["upscale"]
    ctx.apply_memory(p)
    return p


def denoise(ctx: RunContext, seeds: list[int]):
    import torch

    from ..run import latent_preview
    from ..tiles import tiled_unet

    r, control, parts = ctx.request, ctx.control, ctx.parts
    n = len(seeds)

    def on_step(i, t, latents):  # the pipeline's (legacy) per-step callback
        if control.cancel is not None and control.cancel.is_set():
            raise Cancelled("cancelled")
        if control.stop_requested():
            raise Stop(latents, i + 1, r.steps)
        if control.progress is not None:
            preview = latent_preview(parts.vae, latents) if control.want_previews else None
            control.progress(ProgressInfo(step=i + 1, total=r.steps, batch=ctx.batch, batches=r.n_iter,
                                          preview=preview))

    upscaler = pipe(ctx)
    embeds = ctx.embeddings(n)

    def run(tile: int, overlap: int):  # fresh generators for each try: the same seeds, the same noise
        with torch.inference_mode(), tiled_unet(parts.unet, tile, overlap):
            return upscaler(**embeds, image=[ctx.data["source"]] * n, noise_level=int(r.noise_level),
                            num_inference_steps=r.steps, guidance_scale=guidance(r), eta=float(r.eta),
                            generator=ctx.generators(seeds), output_type="latent", callback=on_step,
                            callback_steps=1).images

    return smaller_tiles(ctx, run)


def decode(ctx: RunContext, latents) -> tuple[list, bool]:
    """The latents decoded in tiles (``engine.tiles``) when they are larger than one, else whole (smaller tiles
    after an out-of-memory error); a fp16 VAE that gives NaNs is redone in fp32, as every task's decode."""
    import torch

    from ..run import to_pil
    from ..tiles import decode_tiled

    vae = ctx.parts.vae

    def run(z):
        return smaller_tiles(ctx, lambda tile, overlap: decode_tiled(vae, z, tile, overlap))

    pixels = run(latents)
    if torch.isnan(pixels).any() and vae.dtype != torch.float32:
        vae.to(torch.float32)
        return to_pil(run(latents.float())), True
    return to_pil(pixels), False


def finish(ctx: RunContext, images: list) -> list:
    """The padding cut off: exactly 4x the input."""
    w, h = ctx.data["size"]
    return [im.crop((0, 0, w * FACTOR, h * FACTOR)) if im.size != (w * FACTOR, h * FACTOR) else im for im in images]


def infotext(request) -> dict:
    keys = {"Noise level": request.noise_level, "Tile size": request.tile_size, "Tile overlap": request.tile_overlap}
    if request.init_image is not None:  # the picture made: 4x the input (width / height do not apply)
        w, h = request.init_image.size
        keys["Size"] = f"{w * FACTOR}x{h * FACTOR}"
    return keys


TASK = Task(mode=Mode.UPSCALE, pipeline="StableDiffusionUpscalePipeline", denoise=denoise, accepts=accepts,
            prepare=prepare, finish=finish, infotext=infotext, decode=decode, notes=notes)

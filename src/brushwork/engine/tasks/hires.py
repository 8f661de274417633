"""The hires fix (A1111's "Hires. fix"): txt2img at width x height, upscaled, then img2img at the target size.

``task_for`` picks this task for a txt2img request with ``hires_enabled``; the mode stays txt2img. As A1111's
``StableDiffusionProcessingTxt2Img.sample_hr_pass``:

1. the first pass is exactly txt2img (same noise, steps, sampler), at the request's width x height;
2. the target is ``GenerationRequest.hires_sizes``: width x height times the scale, or the resize size (both
   sides: scaled to cover it, then centre-cropped), rounded down to a multiple of 8;
3. a latent upscaler ("Latent", ... ``HIRES_LATENT_MODES``) interpolates the first pass's latents
   (``torch.nn.functional.interpolate`` with A1111's mode and antialias); an image upscaler ("Lanczos",
   "Nearest", or an upscaler model of the library: ``engine.upscalers``) decodes them, resizes the pictures as
   A1111's upscalers do (its own filter or model up to the scale, Lanczos to the exact size) and encodes them
   again (the VAE's mean, so no random numbers are drawn);
4. the second pass is diffusers' img2img on those latents (4-channel latents given as ``image`` are used as
   they are): fresh per-image CPU generators seeded with the same seeds (as A1111's new ``ImageRNG`` over
   the same seeds) draw the noise, at the target size, with the hires prompt and sampler when set.

A hires checkpoint (A1111's ``hr_checkpoint_name``; ``RunContext.hires_parts``, loaded by the engine beside the
model) runs the second pass: its UNet, its text encoders for the prompts, its scheduler config, and its VAE for
the final decode; an image upscaler decodes the first pass with the model's VAE and encodes the upscaled pictures
with the checkpoint's, as A1111 switches checkpoints between the two. The prompts' LoRAs go on it too for its
pass (``RunContext.networks_of``), as A1111 activates them again on the checkpoint it switches to.

Steps: A1111 runs exactly ``hires_steps or steps`` steps in the second pass, the last ones of a schedule of
``int(N / min(strength, 0.999))`` steps (``sd_samplers_common.setup_img2img_steps`` with steps given). Diffusers'
img2img runs the last ``int(num_inference_steps * strength)`` of ``num_inference_steps``; so it is called with
that schedule length and the strength that runs exactly N of it (``second_pass``), which starts the second
pass at the same point of the same schedule as A1111. Strength 0 skips the second pass (the upscaled picture
is the answer). Progress counts the first pass's steps, then the second's, out of one total.
"""

from __future__ import annotations

from ...request import HIRES_LATENT_MODES, GenerationRequest, Mode
from .base import RunContext, Task
from .txt2img import no_refiner_alone


def second_pass(request: GenerationRequest) -> tuple[int, int, float]:
    """(steps that run, diffusers ``num_inference_steps``, diffusers ``strength``) for the second pass."""
    steps = request.hires_steps or request.steps
    strength = float(request.hires_strength)
    if strength <= 0:
        return 0, 0, 0.0
    schedule = int(steps / min(strength, 0.999))  # A1111's setup_img2img_steps
    return steps, schedule, min(1.0, (steps + 0.5) / schedule)  # int(schedule * this) == steps, exactly


def _settings(ctx: RunContext):
    from ...settings import Settings

    return ctx.settings if ctx.settings is not None else Settings.load()


def prepare(ctx: RunContext) -> None:
    from .. import upscalers

    ctx.request.check_hires_size(ctx.width, ctx.height)
    ctx.data["hires_sizes"] = ctx.request.hires_sizes(ctx.width, ctx.height)
    if ctx.request.hires_upscaler not in HIRES_LATENT_MODES:  # a name validate() cannot know: the library's
        ctx.data["upscaler"] = upscalers.find(upscalers.hires_upscaler(ctx.request.hires_upscaler, _settings(ctx)),
                                              _settings(ctx))


def _crop(latents, size: tuple[int, int], factor: int):
    """Centre-crop latents to ``size`` pixels, as A1111 truncates them after the upscale."""
    h, w = latents.shape[-2:]
    dx, dy = w - size[0] // factor, h - size[1] // factor
    return latents[:, :, dy // 2:h - (dy + 1) // 2, dx // 2:w - (dx + 1) // 2]


def upscale_image(image, width: int, height: int, upscaler, settings=None, device: str | None = None):
    """A1111's ``images.resize_image`` (just resize) with an upscaler of ``engine.upscalers`` (a name or its
    entry): that filter or model up to the scale, then Lanczos to the exact size."""
    from .. import upscalers

    return upscalers.upscale_to(upscaler, image, width, height, settings, device=device)


def upscale(ctx: RunContext, latents):
    """The first pass's latents -> latents at the target size, with the request's upscaler."""
    import torch

    r = ctx.request
    (uw, uh), out = ctx.data["hires_sizes"]
    f = ctx.vae_factor
    if r.hires_upscaler in HIRES_LATENT_MODES:
        mode, antialias = HIRES_LATENT_MODES[r.hires_upscaler]
        up = torch.nn.functional.interpolate(latents.float(), size=(uh // f, uw // f), mode=mode,
                                             antialias=antialias)
        return _crop(up, out, f).to(latents.dtype)
    import numpy as np

    from ..run import decode

    images, _ = decode(ctx.parts.vae, latents)
    upscaler = ctx.data.get("upscaler", r.hires_upscaler)
    images = [upscale_image(im, uw, uh, upscaler, ctx.settings, device=ctx.policy.device) for im in images]
    left, top = (uw - out[0]) // f // 2 * f, (uh - out[1]) // f // 2 * f  # the latent crop's, in pixels
    images = [im.crop((left, top, left + out[0], top + out[1])) for im in images]
    vae = (ctx.hires_parts or ctx.parts).vae  # the second pass's model encodes what it denoises
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    pixels = (pixels.float() / 127.5 - 1).to(ctx.policy.device, vae.dtype)  # as decode: offload hooks move the VAE
    with torch.inference_mode():
        encoded = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    return encoded.to(ctx.policy.device, ctx.policy.latent_dtype)


def denoise(ctx: RunContext, seeds: list[int]):
    from ..samplers import build_scheduler

    r = ctx.request
    steps, schedule, strength = second_pass(r)
    total = r.steps + steps
    generators = ctx.generators(seeds)
    latents = ctx.run_pipe(ctx.pipe("StableDiffusionPipeline"), total=total, **ctx.embeddings(len(seeds)),
                           num_inference_steps=r.steps, generator=generators, latents=ctx.noise(generators),
                           height=ctx.height, width=ctx.width)
    latents = upscale(ctx, latents)
    if not steps:
        return latents
    model = ctx.hires_parts or ctx.parts  # the hires checkpoint, else the model
    own = r.hires_sampler is not None or r.hires_scheduler is not None
    scheduler = build_scheduler(model.scheduler_config, *r.hires_sampler_and_schedule) if own else None
    pipe = ctx.pipe("StableDiffusionImg2ImgPipeline", scheduler=scheduler, parts=model)
    embeds = ctx.embeddings(len(seeds), prompt=r.hires_prompt or None, negative=r.hires_negative_prompt or None,
                            parts=model)
    return ctx.run_pipe(pipe, step_offset=r.steps, total=total, **embeds, image=latents,
                        num_inference_steps=schedule, strength=strength, generator=ctx.generators(seeds))


def infotext(r: GenerationRequest) -> dict:
    """A1111's keys; ``Size`` (written by the engine) stays the first pass's size, as A1111."""
    from ..samplers import display_name

    keys: dict = {"Denoising strength": r.hires_strength}
    if r.hires_resize_x or r.hires_resize_y:
        keys["Hires resize"] = f"{r.hires_resize_x}x{r.hires_resize_y}"
    else:
        keys["Hires upscale"] = r.hires_scale
    if r.hires_steps:
        keys["Hires steps"] = r.hires_steps
    keys["Hires upscaler"] = r.hires_upscaler
    first, second = display_name(r.sampler, r.scheduler), display_name(*r.hires_sampler_and_schedule)
    if second[0] != first[0]:
        keys["Hires sampler"] = second[0]
    if second[1] != first[1]:
        keys["Hires schedule type"] = second[1]
    if r.hires_prompt and r.hires_prompt != r.prompt:
        keys["Hires prompt"] = r.hires_prompt
    if r.hires_negative_prompt and r.hires_negative_prompt != r.negative_prompt:
        keys["Hires negative prompt"] = r.hires_negative_prompt
    return keys


TASK = Task(mode=Mode.TXT2IMG, pipeline="StableDiffusionPipeline", denoise=denoise, prepare=prepare,
            infotext=infotext, accepts=no_refiner_alone)

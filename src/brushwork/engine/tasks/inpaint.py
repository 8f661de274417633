"""inpaint: repaint where the mask is white, keep the rest (A1111's img2img inpaint tab).

The mask (an RGBA mask's alpha where it has transparency, else its grey) is binarized, inverted on request
and blurred by ``mask_blur`` (PIL's Gaussian). The pipeline (diffusers' StableDiffusionInpaintPipeline, for
9-channel inpainting UNets and ordinary 4-channel ones, which it blends with the noised original each step)
gets that mask rounded at latent resolution; the decoded picture is laid over the original with the blurred
mask, ``original * (1 - m) + generated * m``, so every pixel outside the blurred mask is the original's exactly.
"Only masked" (``inpaint_full_res``) repaints the mask's bounding box plus padding, grown to the output's
aspect ratio, at the full requested size, and pastes it back at the original's size.

Masked content (``inpainting_fill``), as A1111's: "original" starts the masked area from the original's pixels,
"fill" from the colours around it (painted into the source before the pipeline encodes it). "latent noise" and
"latent nothing" change the encoded original instead (A1111's StableDiffusionProcessingImg2Img.init, fills 2 and
3): with ``m`` the latent mask, ``init = init * (1 - m) + noise * m`` (noise: the seed's own CPU noise,
``randn`` from a fresh CPU generator per image seeded ``seed + i``, the tensor txt2img starts from, as A1111's
``create_random_tensors``) or ``init = init * (1 - m)``. That modified init is what gets noised to the
strength, and, being the original outside the mask, what a 4-channel model is blended with each step; a
9-channel model's masked-image channels stay the encoded masked original. The route is the pipeline's public
inputs, no subclass: ``fill_inputs`` encodes the original exactly as StableDiffusionInpaintPipeline would (its
image processor, ``retrieve_latents`` per image with that image's generator, the VAE's scaling factor), changes
the latents and hands them in as ``image`` (a 4-channel tensor the pipeline takes as latents, unencoded); the
masked original goes in as ``masked_image_latents`` in pixels, which the pipeline encodes itself. So each
generator is drawn from in the pipeline's own order (encode, noise, masked-image encode, sampler) and with the
latents left unchanged the route gives "original"'s pixels exactly. At strength 1 the pipeline starts from pure
noise and never reads the masked area's init latents, so there the latent fills equal "original".
"""

from __future__ import annotations

from ...request import InvalidRequest, Mode
from .base import RunContext, Task, needs_init_image, resized

LATENT_FILLS = ("latent noise", "latent nothing")
SUPPORTED_FILLS = ("original", "fill", *LATENT_FILLS)


def accepts(parts) -> str | None:
    channels = parts.family.unet_in_channels
    if channels not in (4, 9):
        return f"{parts.name} ({parts.family.label}, a {channels}-channel UNet) cannot inpaint; use an SD model"
    return None


def mask_from(image):
    """A binary L mask (255 = repaint): an RGBA/LA mask with any transparency gives its alpha, else its grey."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return image.convert("L").point(lambda v: 255 if v > 128 else 0)


def blurred(mask, radius: int):
    from PIL import ImageFilter

    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def fill(image, mask):
    """The masked area painted with the colours around it: ever finer blurs of the kept pixels, layered (as
    A1111's "fill"); pixels the mask leaves at 0 stay exactly as they were."""
    from PIL import Image, ImageFilter, ImageOps

    keep = ImageOps.invert(mask.convert("L"))
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = (kept.filter(ImageFilter.GaussianBlur(radius)) if radius else kept).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def overlay(original, generated, mask):
    """``original * (1 - m) + generated * m`` per pixel, ``m`` = mask / 255; where m is 0 the original exactly."""
    import numpy as np
    from PIL import Image

    m = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    a = np.asarray(original.convert("RGB"), dtype=np.float32)
    b = np.asarray(generated.convert("RGB"), dtype=np.float32)
    out = np.where(m > 0, a * (1 - m) + b * m, a)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def latent_mask(mask, width: int, height: int, factor: int):
    """The mask rounded at latent resolution (as A1111), at pixel size (nearest) for the pipeline, which then
    takes exactly these latent cells."""
    from PIL import Image

    small = mask.convert("L").resize((width // factor, height // factor), Image.Resampling.BILINEAR)
    small = small.point(lambda v: 255 if v >= 128 else 0)
    return small.resize((width, height), Image.Resampling.NEAREST)


def prepare(ctx: RunContext) -> None:
    from PIL import Image

    needs_init_image(ctx)
    r = ctx.request
    if r.mask_image is None:
        raise InvalidRequest("inpaint needs a mask image (--mask)")
    fill_mode = r.inpainting_fill
    if fill_mode not in SUPPORTED_FILLS:
        raise InvalidRequest(f"unknown inpainting fill {fill_mode!r}; choose one of: {', '.join(SUPPORTED_FILLS)}")
    original = r.init_image.convert("RGB")
    mask = mask_from(r.mask_image)
    if r.inpainting_mask_invert:
        mask = mask.point(lambda v: 255 - v)
    if mask.size != original.size:
        mask = mask.resize(original.size, Image.Resampling.LANCZOS)
    mask = blurred(mask, int(r.mask_blur))
    w, h = ctx.width, ctx.height
    ctx.data["empty"] = mask.getbbox() is None
    if r.inpaint_full_res:
        from diffusers.image_processor import VaeImageProcessor

        ctx.data["init"] = original  # the answer's base, at the original's size
        ctx.data["overlay"] = mask
        if ctx.data["empty"]:
            return
        crop = VaeImageProcessor.get_crop_region(mask, w, h, pad=int(r.inpaint_full_res_padding))
        ctx.data["crop"] = crop
        source = resized(original.crop(crop), w, h)
        region = mask.crop(crop).resize((w, h), Image.Resampling.LANCZOS)
    else:
        source = resized(original, w, h)
        region = mask.resize((w, h), Image.Resampling.LANCZOS) if mask.size != (w, h) else mask
        ctx.data["init"] = source
        # as A1111's whole-picture overlay: the blurred mask doubled, so the painted area is fully repainted and
        # the blur fades outward from its edge
        ctx.data["overlay"] = region.point(lambda v: min(255, 2 * v))
    if fill_mode == "fill":
        source = fill(source, region)
    ctx.data["source"] = source
    ctx.data["mask"] = latent_mask(region, w, h, ctx.vae_factor)


def passthrough(ctx: RunContext) -> bool:
    """An empty mask (nothing to repaint), or a strength that reaches no step: the original is the answer."""
    strength = float(ctx.request.strength)
    return ctx.data.get("empty", False) or (strength < 1 and int(ctx.request.steps * strength) < 1)


def fill_latents(latents, mask, fill_mode: str, noise=None):
    """A1111's latent fills on the encoded original (``mask`` 1 = repaint, at latent size): "latent noise"
    ``latents * (1 - m) + noise * m``, "latent nothing" ``latents * (1 - m)``; where m is 0 the latents exactly."""
    kept = latents * (1 - mask)
    return kept + noise * mask if fill_mode == "latent noise" else kept


def fill_inputs(ctx: RunContext, pipe, generators, seeds: list[int], dtype):
    """``image`` (the encoded original, latent-filled) and ``masked_image_latents`` (the masked original, in
    pixels, for the pipeline to encode) for StableDiffusionInpaintPipeline, prepared as it prepares its own."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_latents

    n, h, w = len(generators), ctx.height, ctx.width
    device = pipe._execution_device
    init = pipe.image_processor.preprocess([ctx.data["source"]] * n, height=h, width=w).to(dtype=torch.float32)
    mask = pipe.mask_processor.preprocess([ctx.data["mask"]] * n, height=h, width=w)
    masked = init * (mask < 0.5)
    pixels = init.to(device=device, dtype=dtype)
    with torch.inference_mode():
        latents = torch.cat([retrieve_latents(pipe.vae.encode(pixels[i:i + 1]), generator=g)
                             for i, g in enumerate(generators)])
        latents = pipe.vae.config.scaling_factor * latents
        m = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).to(device=device, dtype=latents.dtype)
        noise = None
        if ctx.request.inpainting_fill == "latent noise":  # fresh generators: the pipeline's stay untouched
            noise = ctx.noise(ctx.generators(seeds)).to(device=device, dtype=latents.dtype)
        latents = fill_latents(latents, m, ctx.request.inpainting_fill, noise)
    return latents, masked


def denoise(ctx: RunContext, seeds: list[int]):
    r = ctx.request
    n = len(seeds)
    generators = ctx.generators(seeds)
    pipe = ctx.pipe("StableDiffusionInpaintPipeline")
    embeds = ctx.embeddings(n)
    kwargs = {"image": [ctx.data["source"]] * n}
    if float(r.strength) >= 1:  # from pure noise: the CPU-seeded noise txt2img starts from
        kwargs["latents"] = ctx.noise(generators)
    elif r.inpainting_fill in LATENT_FILLS:
        kwargs["image"], kwargs["masked_image_latents"] = fill_inputs(ctx, pipe, generators, seeds,
                                                                      embeds["prompt_embeds"].dtype)
    return ctx.run_pipe(pipe, **embeds, mask_image=[ctx.data["mask"]] * n, height=ctx.height, width=ctx.width,
                        strength=float(r.strength), num_inference_steps=r.steps, generator=generators, **kwargs)


def finish(ctx: RunContext, images: list) -> list:
    from PIL import Image

    original, mask = ctx.data["init"], ctx.data["overlay"]
    out = []
    for image in images:
        if "crop" in ctx.data:
            x1, y1, x2, y2 = ctx.data["crop"]
            base = original.copy()
            base.paste(image.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            image = base
        out.append(overlay(original, image, mask))
    return out


def watermark(ctx: RunContext, images: list) -> list:
    """The watermark in the repainted area only: laid over the original with the same mask as the picture, so
    the kept pixels stay the original's exactly (a small repaint carries a weaker mark)."""
    from .base import watermarked

    original, mask = ctx.data["init"], ctx.data["overlay"]
    if ctx.data.get("empty"):
        return images
    return [overlay(original, marked, mask) for marked in watermarked(images)]


def infotext(request) -> dict:
    """A1111's keys for an inpainting (its processing.py writes each only when it applies)."""
    keys = {"Denoising strength": request.strength,
            "Mask blur": request.mask_blur if request.mask_blur > 0 else None,
            "Mask mode": "Inpaint not masked" if request.inpainting_mask_invert else None,
            "Masked content": request.inpainting_fill if request.inpainting_fill != "original" else None}
    if request.inpaint_full_res:
        keys["Inpaint area"] = "Only masked"
        keys["Masked area padding"] = request.inpaint_full_res_padding
    return keys


TASK = Task(mode=Mode.INPAINT, pipeline="StableDiffusionInpaintPipeline", denoise=denoise, accepts=accepts,
            prepare=prepare, finish=finish, infotext=infotext, passthrough=passthrough, watermark=watermark)

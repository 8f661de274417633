"""inpaint: repaint where the mask is white, keep the rest (A1111's img2img inpaint tab).

The mask (an RGBA mask's alpha where it has transparency, else its grey) is binarized, inverted on request
and blurred by ``mask_blur`` (PIL's Gaussian). The pipeline (diffusers' StableDiffusionInpaintPipeline, for
9-channel inpainting UNets and ordinary 4-channel ones, which it blends with the noised original each step)
gets that mask rounded at latent resolution; the decoded picture is laid over the original with the blurred
mask, ``original * (1 - m) + generated * m``, so every pixel outside the blurred mask is the original's exactly.
"Only masked" (``inpaint_full_res``) repaints the mask's bounding box plus padding, grown to the output's
aspect ratio, at the full requested size, and pastes it back at the original's size.
"""

from __future__ import annotations

from ...request import InvalidRequest, Mode
from .base import RunContext, Task, needs_init_image, resized

SUPPORTED_FILLS = ("original", "fill")


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
        raise InvalidRequest(f"inpainting fill {fill_mode!r} arrives in a later version; use original or fill")
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


def denoise(ctx: RunContext, seeds: list[int]):
    r = ctx.request
    n = len(seeds)
    generators = ctx.generators(seeds)
    kwargs = {}
    if float(r.strength) >= 1:  # from pure noise: the CPU-seeded noise txt2img starts from
        kwargs["latents"] = ctx.noise(generators)
    return ctx.run_pipe(ctx.pipe("StableDiffusionInpaintPipeline"), **ctx.embeddings(n),
                        image=[ctx.data["source"]] * n, mask_image=[ctx.data["mask"]] * n,
                        height=ctx.height, width=ctx.width, strength=float(r.strength),
                        num_inference_steps=r.steps, generator=generators, **kwargs)


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
            prepare=prepare, finish=finish, infotext=infotext, passthrough=passthrough)

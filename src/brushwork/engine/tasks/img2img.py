"""img2img: the init image, noised to ``strength`` and denoised toward the prompt (A1111's denoising strength)."""

from __future__ import annotations

from ...request import Mode
from .base import RunContext, Task, needs_init_image, resized


def prepare(ctx: RunContext) -> None:
    needs_init_image(ctx)
    ctx.data["init"] = resized(ctx.request.init_image, ctx.width, ctx.height)


def passthrough(ctx: RunContext) -> bool:
    """Strength 0 (or too few steps to reach one at this strength): nothing to denoise, the init image is the
    answer."""
    strength = float(ctx.request.strength)
    return strength < 1 and not (strength > 0 and int(ctx.request.steps * strength) >= 1)


def denoise(ctx: RunContext, seeds: list[int]):
    r = ctx.request
    if float(r.strength) >= 1:  # the init image is noised away entirely: exactly txt2img
        from .txt2img import denoise as txt2img

        return txt2img(ctx, seeds)
    return ctx.with_refiner(ctx.pipe("StableDiffusionImg2ImgPipeline"), **ctx.embeddings(len(seeds)),
                        num_inference_steps=r.steps, generator=ctx.generators(seeds), image=ctx.data["init"],
                        strength=float(r.strength))


TASK = Task(mode=Mode.IMG2IMG, pipeline="StableDiffusionImg2ImgPipeline", denoise=denoise, prepare=prepare,
            passthrough=passthrough, infotext=lambda request: {"Denoising strength": request.strength}, refines=True)

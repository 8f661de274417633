"""txt2img: a picture from the prompt alone, starting from CPU-seeded noise."""

from __future__ import annotations

from ...request import Mode
from .base import RunContext, Task, text_to_image_models


def no_refiner_alone(parts) -> str | None:
    """An SDXL refiner cannot start from noise on its own (its UNet takes an aesthetic score, not a target size)."""
    if parts.family.name == "sdxl-refiner":
        return (f"{parts.name} is an SDXL refiner: it finishes another model's picture; use it with --refiner "
                "(or for img2img)")
    return text_to_image_models(parts)


def denoise(ctx: RunContext, seeds: list[int]):
    generators = ctx.generators(seeds)
    latents = ctx.noise(generators)
    return ctx.with_refiner(ctx.pipe("StableDiffusionPipeline"), **ctx.embeddings(len(seeds)),
                        num_inference_steps=ctx.request.steps, generator=generators, latents=latents,
                        height=ctx.height, width=ctx.width)


TASK = Task(mode=Mode.TXT2IMG, pipeline="StableDiffusionPipeline", denoise=denoise, accepts=no_refiner_alone,
            refines=True)

"""txt2img: a picture from the prompt alone, starting from CPU-seeded noise."""

from __future__ import annotations

from ...request import Mode
from .base import RunContext, Task


def denoise(ctx: RunContext, seeds: list[int]):
    generators = ctx.generators(seeds)
    latents = ctx.noise(generators)
    return ctx.run_pipe(ctx.pipe("StableDiffusionPipeline"), **ctx.embeddings(len(seeds)),
                        num_inference_steps=ctx.request.steps, generator=generators, latents=latents,
                        height=ctx.height, width=ctx.width)


TASK = Task(mode=Mode.TXT2IMG, pipeline="StableDiffusionPipeline", denoise=denoise)

"""One request through a diffusers pipeline: the fixed lifecycle every image takes.

1. sizes and seeds  2. scheduler from the sampler table  3. pipeline for the mode
4. per batch: CPU-seeded noise -> denoise loop (progress, cancel, previews) -> latents
5. decode (fp16 NaNs are redone in fp32)  6. watermark + infotext  7. result
"""

from __future__ import annotations

import secrets
import time

from ..request import Cancelled, GenerationRequest, GenerationResult, InvalidRequest, Mode, ProgressInfo
from . import memory
from .samplers import build_scheduler, display_name

DEFAULT_CFG_SCALE = 7.0


def with_model_defaults(request: GenerationRequest, parts) -> GenerationRequest:
    """Fill what the request leaves open (``None``) from the model's recommendations, then the usual defaults."""
    import dataclasses

    filled = {}
    if request.cfg_scale is None:
        filled["cfg_scale"] = parts.defaults.get("cfg_scale", DEFAULT_CFG_SCALE)
    if request.cfg_end is None:
        filled["cfg_end"] = parts.defaults.get("cfg_end", 1.0)
    return dataclasses.replace(request, **filled) if filled else request


def guided_steps(cfg_end: float, total: int) -> int:
    """How many of ``total`` steps use CFG when the fraction ``cfg_end`` of them should (at least one)."""
    return max(1, min(total, round(float(cfg_end) * total)))


def end_guidance_after(cfg_end: float, pipe, step: int, tensors: dict) -> dict:
    """For a diffusers SD pipeline's ``callback_on_step_end`` (with ``prompt_embeds`` among its tensor inputs):
    after the guided steps, the remaining ones run the prompt alone (CFG 1, one UNet pass instead of two). The
    pipeline holds [negative, prompt] embeddings side by side; it goes on with the prompt's half."""
    total = getattr(pipe, "_num_timesteps", None) or step + 1
    if step + 1 == guided_steps(cfg_end, total) and pipe.do_classifier_free_guidance:
        pipe._guidance_scale = 1.0
        tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
    return tensors


def resolve_size(request: GenerationRequest, default_size: tuple[int, int]) -> tuple[int, int]:
    if request.init_image is not None and request.mode is not Mode.TXT2IMG:
        w, h = request.init_image.size
        default_size = (max(8, w - w % 8), max(8, h - h % 8))
    width = request.width or default_size[0]
    height = request.height or default_size[1]
    return width, height


def _pipelines(parts, mode: Mode, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if parts.family.unet_in_channels != 4:
        raise InvalidRequest(
            f"{parts.name} is an inpainting model ({parts.family.label}); inpainting arrives in a later version, "
            "use a text-to-image model for txt2img/img2img"
        )
    components = dict(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    cls = StableDiffusionImg2ImgPipeline if mode is Mode.IMG2IMG else StableDiffusionPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    parts,
    policy,
    request: GenerationRequest,
    *,
    model_name: str,
    model_hash: str | None,
    memory_mode: str,
    memory_state: dict | None = None,
    progress=None,
    cancel=None,
    interrupt=None,
    skip=None,
    want_previews: bool = False,
    version: str = "0",
) -> GenerationResult:
    """One request on a loaded model. ``cancel`` set: stop and raise ``Cancelled``; ``interrupt`` set: stop and
    return what there is (finished pictures, and the current batch decoded where its denoising stopped);
    ``skip`` set: end the current batch that way, clear ``skip`` and go on with the next (A1111's skip)."""

    def stop_requested() -> bool:
        return any(event is not None and event.is_set() for event in (interrupt, skip))

    timings = {"sample_s": 0.0, "decode_s": 0.0}
    notes: list[str] = []
    if request.mode not in (Mode.TXT2IMG, Mode.IMG2IMG):
        raise InvalidRequest(f"{request.mode.value} arrives in a later version; this one does txt2img and img2img")

    # 1. sizes and seeds
    width, height = resolve_size(request, parts.default_size)
    seed = request.seed if request.seed != -1 else secrets.randbelow(2**32)
    init = None
    if request.mode is Mode.IMG2IMG:
        init = request.init_image.convert("RGB")
        if init.size != (width, height):
            from PIL import Image

            init = init.resize((width, height), Image.Resampling.LANCZOS)

    # 2. scheduler, 3. pipeline
    scheduler = build_scheduler(parts.scheduler_config, request.sampler, request.scheduler)
    strength = float(request.strength)
    img2img_denoises = request.mode is Mode.IMG2IMG and 0 < strength < 1 and int(request.steps * strength) >= 1
    pipe = _pipelines(parts, Mode.IMG2IMG if img2img_denoises else Mode.TXT2IMG, scheduler)
    # the memory plan: the mode asked for, or in auto one that fits (and never above one that ran out before)
    memory_state = {} if memory_state is None else memory_state
    pixels = width * height
    mode = memory.initial_mode(memory_mode, policy, parts.modules, pixels=pixels, batch=request.batch_size,
                               floor=memory_state.get("floor"))
    first_mode, applied = mode, None
    from .deepcache import interval_for

    if (interval := interval_for(request.extra)) > 1:
        notes.append(f"fast mode: the UNet's deep features are computed every {interval} steps and reused between "
                     "(DeepCache); a little less faithful than the default")

    images, seeds = [], []
    interrupted = False
    for batch in range(request.n_iter):
        if interrupt is not None and interrupt.is_set():
            interrupted = True
            break
        batch_seeds = [(seed + batch * request.batch_size + i) % 2**32 for i in range(request.batch_size)]
        if request.mode is Mode.IMG2IMG and not img2img_denoises and strength < 1:
            # nothing to denoise: the init image is the answer
            images += [init.copy() for _ in batch_seeds]
            seeds += batch_seeds
            continue
        while True:
            try:
                if applied != mode:  # inside the try: moving the weights to the GPU can run out of memory too
                    memory.apply(pipe, memory.plan(mode, policy, pixels=pixels), policy)
                    applied = mode
                t0 = time.perf_counter()
                latents, stopped_at = _denoise(pipe, parts, policy, request, batch, batch_seeds, width, height, init,
                                               strength if img2img_denoises else None, progress, cancel,
                                               stop_requested, want_previews)
                t1 = time.perf_counter()
                decoded, fell_back = decode(parts.vae, latents)
                timings["sample_s"] += t1 - t0
                timings["decode_s"] += time.perf_counter() - t1
                if fell_back:
                    notes.append("the fp16 VAE gave NaNs; decoded again in fp32")
                if stopped_at is not None and interrupt is not None and interrupt.is_set():
                    interrupted = True
                    notes.append(f"interrupted after step {stopped_at} of {request.steps}: the last picture is "
                                 "not finished")
                elif stopped_at is not None:
                    skip.clear()
                    notes.append(f"batch {batch + 1} skipped after step {stopped_at} of {request.steps}: its "
                                 "pictures are not finished")
                break
            except Cancelled:
                raise
            except Exception as err:
                if not memory.is_oom(err):
                    raise
                lower = memory.next_mode(mode, policy, pixels=pixels)
                if memory_mode != "auto" or lower is None:
                    del err  # its traceback holds the tensors that filled the memory
                    memory.remove_offload(pipe)
                    hint = (f"try --memory {lower} or " if lower else "try ") + "a smaller size or batch"
                    raise InvalidRequest(f"out of memory in memory mode {mode}; {hint}") from None
                del err
                # same request, same seeds: the image is the one this lower mode gives
                mode = memory_state["floor"] = lower
        images += decoded
        seeds += batch_seeds
        if interrupted:
            break
    if mode != first_mode:
        notes.append(f"out of memory in memory mode {first_mode}; ran again in mode {mode} with the same seeds "
                     "(later runs of this model start there)")

    # 6. watermark + infotext
    if request.watermark:
        from ..output.watermark import embed

        images = [embed(im) for im in images]
    infotexts = [
        infotext_for(request, seed=s, width=width, height=height, model_name=model_name, model_hash=model_hash,
                     version=version)
        for s in seeds
    ]
    timings = {k: round(v, 3) for k, v in timings.items()}
    return GenerationResult(images, seeds, infotexts, request, model_name, model_hash, timings, notes,
                            interrupted=interrupted)


class _Stop(Exception):
    """Raised from the step callback when an interrupt asks to stop; carries where the latents were."""

    def __init__(self, latents, step: int):
        super().__init__("interrupted")
        self.latents, self.step = latents, step


def _denoise(pipe, parts, policy, request, batch, batch_seeds, width, height, init, strength, progress, cancel,
             stop_requested, want_previews):
    """Run the denoising loop for one batch; returns (latents, None), or where ``stop_requested()`` stopped it:
    (the latents of that step, the step number)."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
    latent_channels = parts.unet.config.in_channels
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    from .prompts import encode

    n = len(batch_seeds)
    prompt_embeds, negative_embeds = encode(parts.text_encoder, parts.tokenizer, request.prompt,
                                            request.negative_prompt, clip_skip=request.clip_skip,
                                            device=policy.device, emphasis=request.emphasis,
                                            comma_padding_backtrack=request.comma_padding_backtrack)
    kwargs = dict(
        prompt_embeds=prompt_embeds.repeat(n, 1, 1),
        negative_prompt_embeds=negative_embeds.repeat(n, 1, 1),
        num_inference_steps=request.steps,
        guidance_scale=float(request.cfg_scale),
        eta=float(request.eta),
        generator=generators,
        output_type="latent",
    )
    if strength is not None:
        kwargs.update(image=init, strength=strength)
    else:
        # the initial noise is drawn on the CPU, one generator per image: same seed, same image on any device
        noise = torch.stack([
            torch.randn((latent_channels, height // factor, width // factor), generator=g) for g in generators
        ])
        kwargs.update(latents=noise.to(policy.device, policy.latent_dtype), height=height, width=width)

    def on_step_end(p, i, t, callback_kwargs):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if stop_requested():
            raise _Stop(callback_kwargs["latents"], i + 1)
        end_guidance_after(request.cfg_end, p, i, callback_kwargs)
        if progress is not None:
            preview = None
            if want_previews:
                preview = latent_preview(parts.vae, callback_kwargs["latents"])
            total = getattr(p, "_num_timesteps", None) or request.steps
            progress(ProgressInfo(step=i + 1, total=total, batch=batch, batches=request.n_iter, preview=preview))
        return callback_kwargs

    from .deepcache import deep_cache, interval_for
    from .tome import token_merging

    with (torch.inference_mode(), deep_cache(parts.unet, interval_for(request.extra)),
          token_merging(parts.unet, float(request.token_merging_ratio))):
        try:
            out = pipe(**kwargs, callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        except _Stop as stop:
            return stop.latents, stop.step
    return out.images, None


def decode(vae, latents) -> tuple[list, bool]:
    """Latents -> PIL images. A fp16 VAE that gives NaNs (a known SD problem) is redone in fp32."""
    import torch

    def run(model, x):
        with torch.inference_mode():
            return model.decode(x.to(model.dtype) / model.config.scaling_factor).sample

    pixels = run(vae, latents)
    fell_back = False
    if torch.isnan(pixels).any() and vae.dtype != torch.float32:
        vae.to(torch.float32)
        pixels = run(vae, latents.float())
        fell_back = True
    return to_pil(pixels), fell_back


def to_pil(pixels) -> list:
    import numpy as np
    from PIL import Image

    arr = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to("cpu").permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a.astype(np.uint8)) for a in arr]


# A1111's "Approx cheap" latent -> RGB factors for SD's 4-channel latent space.
_CHEAP_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def latent_preview(vae, latents):
    """A small preview of the first image of the batch: a real decode for small VAEs, else a linear map."""
    import torch

    small = sum(p.numel() for p in vae.parameters()) < 5_000_000
    with torch.inference_mode():
        if small:
            return to_pil(vae.decode(latents[:1].to(vae.dtype) / vae.config.scaling_factor).sample)[0]
        factors = torch.tensor(_CHEAP_RGB, dtype=latents.dtype, device=latents.device)
        rgb = torch.einsum("chw,cr->rhw", latents[0, :4], factors)
        return to_pil(rgb[None])[0]


def infotext_for(request: GenerationRequest, *, seed, width, height, model_name, model_hash, version) -> str:
    from ..output.infotext import format_infotext
    from .deepcache import interval_for

    sampler, schedule = display_name(request.sampler, request.scheduler)
    fast_interval = interval_for(request.extra)
    params = {
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": request.cfg_scale,
        "CFG end": request.cfg_end if request.cfg_end is not None and request.cfg_end < 1 else None,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE": _stem(request.vae) if request.vae else None,
        "Denoising strength": request.strength if request.mode is not Mode.TXT2IMG else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Eta": request.eta if request.eta else None,
        "Token merging ratio": request.token_merging_ratio or None,
        "Emphasis": request.emphasis if request.emphasis != "Original" else None,  # A1111's key, only when not the default
        "Fast mode": fast_interval if fast_interval > 1 else None,
        "Version": f"brushwork {version}",
    }
    return format_infotext(request.prompt, request.negative_prompt, params)


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).name

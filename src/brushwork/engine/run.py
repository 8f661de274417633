"""One request on a loaded model: the lifecycle every task shares (the tasks themselves: ``engine.tasks``).

1. sizes and seeds  2. the task's inputs (``prepare``)  3. per batch, inside the out-of-memory ladder
(``memory.Ladder``): the task's denoising (CPU-seeded noise, progress, cancel, interrupt, skip) -> latents
-> decode (fp16 NaNs are redone in fp32) -> the task's ``finish``  4. watermark + infotext  5. result
"""

from __future__ import annotations

import secrets
import time

from ..request import GenerationRequest, GenerationResult, InvalidRequest, Mode
from . import backends, memory
from .samplers import display_name
from .tasks import RunContext, RunControl, task_for
from .tasks.base import Stop

DEFAULT_CFG_SCALE = 7.0


def with_model_defaults(request: GenerationRequest, parts) -> GenerationRequest:
    """Fill what the request leaves open (``None``) from the model's recommendations, then the usual defaults."""
    return model_defaults(request, parts)[0]


def model_defaults(request: GenerationRequest, parts, loras=None) -> tuple[GenerationRequest, list[str]]:
    """(the request with what it leaves open filled, notes for the user). What a request leaves open (``None``; the
    schedule type: Automatic) comes from the model's recommendations (its file's ``brushwork.defaults`` over its
    few-step kind's: SD-Turbo 1 step, CFG 1, SGM Uniform, 512; LCM 4 steps, guidance 8.5, the LCM sampler:
    ``models/fewstep.py``), then the request's ``fallbacks`` (/sdapi's: A1111's defaults, sizes too), then its
    sampler's (LCM's), then the usual ones. A few-step model's img2img keeps
    ``int(steps x strength) >= 1``: diffusers' img2img runs that many of the steps, and none is no picture.
    An LCM-LoRA in the prompt (``loras``: the library its tags are found in) on an ordinary model makes the LCM
    sampler the open sampler's default, and the LCM sampler (picked so or named) takes its 4 steps and CFG 1."""
    import dataclasses
    import math

    from ..models import fewstep
    from ..request import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_STEPS
    from .samplers import named_schedule, parse_sampler

    kind, why = fewstep.kind_for(parts, request.turbo)
    profile = fewstep.PROFILES.get(kind, {})
    recommended = {**profile, **parts.defaults}
    fallback = request.fallbacks or {}  # the front end's defaults where the model recommends nothing (/sdapi: A1111's)
    filled: dict = {}
    lcm_lora = _lcm_lora(request, loras) if kind is None else None  # (tag name, why) of an LCM-LoRA, or None
    if request.sampler is None:
        filled["sampler"] = "LCM" if lcm_lora else recommended.get("sampler", fallback.get("sampler", DEFAULT_SAMPLER))
    sampler_name = filled.get("sampler", request.sampler)
    sampler, _ = parse_sampler(sampler_name, request.scheduler)
    if lcm_lora and sampler.name == "LCM":  # the LoRA's few-step defaults over the checkpoint's own
        recommended = {**recommended, **fewstep.LCM_LORA_PROFILE}
    schedule = recommended.get("scheduler", "Automatic")
    if (request.scheduler == "Automatic" and schedule != "Automatic" and named_schedule(sampler_name) is None
            and schedule in sampler.schedules):  # Automatic: the model's own schedule (a Turbo model's: SGM Uniform)
        filled["scheduler"] = schedule
    for name, default in (("steps", DEFAULT_STEPS), ("cfg_scale", DEFAULT_CFG_SCALE), ("cfg_end", 1.0)):
        if getattr(request, name) is None:
            filled[name] = recommended.get(name, fallback.get(name, sampler.recommends.get(name, default)))
    if kind is not None and kind != getattr(parts, "fewstep", None) and request.mode is Mode.TXT2IMG:
        # --turbo on a file that did not say so: its kind's native size too (a file that says so has it already)
        filled.update({side: profile[side] for side in ("width", "height")
                       if side in profile and side not in parts.defaults and getattr(request, side) is None})
    for side in ("width", "height"):  # a fallback size gives way to the model's recommended one (Turbo: 512)
        if side in fallback and getattr(request, side) is None and side not in filled:
            filled[side] = recommended.get(side, fallback[side])
    notes = []
    if kind is not None and (used := [key for key in profile if key in filled and key not in parts.defaults]):
        notes.append(f"{parts.name} is {fewstep.LABELS[kind]} ({why}): {_described(filled, used, kind)} where the "
                     "request did not say" + ("; --no-turbo turns this off" if kind == "turbo" else ""))
    if lcm_lora and sampler.name == "LCM" and (used := [key for key in fewstep.LCM_LORA_PROFILE if key in filled]):
        notes.append(f"{lcm_lora[0]} is an LCM-LoRA ({lcm_lora[1]}): {_described(filled, used, 'lcm-lora')} where "
                     "the request did not say")
    steps, strength = filled.get("steps", request.steps), float(request.strength)
    if (kind is not None and request.mode in (Mode.IMG2IMG, Mode.INPAINT, Mode.DEPTH2IMG) and 0 < strength < 1
            and int(steps * strength) < 1 and math.ceil(1 / strength) <= MAX_STEPS):
        needed = max(steps, math.ceil(1 / strength))
        while int(needed * strength) < 1:  # 1 / strength rounded up may still fall short by the last bit
            needed += 1
        filled["steps"] = needed
        notes.append(f"steps raised from {steps} to {needed}: img2img at strength {strength:g} runs int(steps x "
                     f"strength) of the steps, and {steps} would run none")
    origin = int(parts.scheduler_config.get("original_inference_steps", 50))
    if sampler.name == "LCM" and filled.get("steps", request.steps) > origin:
        raise InvalidRequest(f"the LCM sampler takes at most {origin} steps (its timesteps are a part of LCM's "
                             f"{origin}-step schedule), got {filled.get('steps', request.steps)}; use fewer")
    return (dataclasses.replace(request, **filled) if filled else request), notes


def _lcm_lora(request: GenerationRequest, loras) -> tuple[str, str] | None:
    """(the tag's name, why) of the first LCM-LoRA the prompt's tags name at a UNet strength other than 0, or None.
    A tag that names no file is left to ``networks.Networks.prepare``, which refuses it."""
    if loras is None or "<" not in request.prompt:
        return None
    from .networks import lora_tags

    tags = [tag for tag in lora_tags(request.prompt)[0] if tag.unet != 0]
    files = loras.files() if tags else []
    for tag in tags:
        found = loras.find(tag.name, files)
        if found is not None and (why := loras.lcm_lora(found)):
            return tag.name, why
    return None


def _described(filled: dict, keys: list[str], kind: str) -> str:
    """``1 step, CFG 1 (...), Euler a, SGM Uniform, 512x512`` for the filled ``keys``."""
    out = []
    for key in keys:
        value = filled[key]
        if key == "steps":
            out.append(f"{value} step{'' if value == 1 else 's'}")
        elif key == "cfg_scale" and kind == "lcm":
            out.append(f"guidance {value:g} (its UNet's w-embedding, not CFG: one UNet pass a step)")
        elif key == "cfg_scale":
            out.append(f"CFG {value:g}" + (" (no CFG: one UNet pass a step)" if value <= 1 else ""))
        elif key in ("width", "height") and {"width", "height"} <= set(keys):
            if key == "width":
                out.append(f"{value}x{filled['height']}")
        elif key in ("width", "height"):
            out.append(f"{key} {value}")
        else:
            out.append(str(value))
    return ", ".join(out)


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
        # inpainting's, depth2img's and SDXL's (pooled text, size numbers), doubled for CFG
        for name in ("mask", "masked_image_latents", "depth_mask", "add_text_embeds", "add_time_ids"):
            if name in tensors:
                tensors[name] = tensors[name].chunk(2)[1]
        for name in ("image", "control_image"):  # a ControlNet pipeline's maps, doubled for CFG unless in guess mode
            if name in tensors:
                from .controlnet import cond_half

                tensors[name] = cond_half(tensors[name], tensors["latents"].shape[0])
    return tensors


def resolve_size(request: GenerationRequest, default_size: tuple[int, int]) -> tuple[int, int]:
    if request.init_image is not None and request.mode is not Mode.TXT2IMG:
        w, h = request.init_image.size
        default_size = (max(8, w - w % 8), max(8, h - h % 8))
    width = request.width or default_size[0]
    height = request.height or default_size[1]
    return width, height


def generate(
    parts,
    policy,
    request: GenerationRequest,
    *,
    model_name: str,
    model_hash: str | None,
    memory_mode: str,
    memory_state: dict | None = None,
    control: RunControl | None = None,
    version: str = "0",
    settings=None,
    refiner: tuple | None = None,
    hires_model: tuple | None = None,
    networks=None,
    controlnet=None,
) -> GenerationResult:
    """One request on a loaded model, through the task its mode names (``engine.tasks``). ``control``: progress,
    cancel (raise ``Cancelled``), interrupt (return what there is: finished pictures, and the current batch
    decoded where its denoising stopped), skip (end the current batch that way and go on, as A1111). ``refiner``,
    ``hires_model``: (parts, "name [hash]") of SDXL's refiner, of the hires fix's checkpoint."""
    control = control or RunControl()
    task = task_for(request, parts)
    if (problem := task.accepts(parts)) is not None:
        raise InvalidRequest(problem)
    timings = {"sample_s": 0.0, "decode_s": 0.0}
    notes: list[str] = []

    # 1. sizes and seeds
    width, height = resolve_size(request, parts.default_size)
    seed = request.seed if request.seed != -1 else secrets.randbelow(2**32)
    memory_state = {} if memory_state is None else memory_state
    pixels = width * height
    if request.hires_enabled:  # the hires fix's second pass and decode run at its larger size
        (hires_w, hires_h), _ = request.hires_sizes(width, height)
        pixels = max(pixels, hires_w * hires_h)
    ladder = memory.Ladder(memory_mode, policy, parts.modules, pixels=pixels, batch=request.batch_size,
                           state=memory_state)
    if refiner is not None and not task.refines:
        raise InvalidRequest(f"the refiner takes over txt2img and img2img; {task.mode.value}"
                             f"{' with the hires fix' if request.hires_enabled else ''} runs without it: "
                             "leave the refiner out")
    # networks: the prompt's LoRAs and embeddings (engine.networks), applied as it is read; controlnet: the units
    # (engine.controlnet.Controls), prepared; refiner: SDXL's refiner's parts; hires_parts: the second pass's model
    ctx = RunContext(parts, policy, request, width, height, control, apply_memory=ladder.use, settings=settings,
                     networks=networks, controlnet=controlnet, refiner=refiner[0] if refiner is not None else None,
                     hires_parts=hires_model[0] if hires_model is not None else None)
    task.prepare(ctx)
    from .deepcache import interval_for

    if (interval := interval_for(request.fast)) > 1:
        notes.append(f"fast mode: the UNet's deep features are computed every {interval} steps and reused between "
                     "(DeepCache); a little less faithful than the default")

    images, seeds = [], []
    interrupted = False
    for batch in range(request.n_iter):
        if control.interrupted:
            interrupted = True
            break
        ctx.batch = batch
        batch_seeds = [(seed + batch * request.batch_size + i) % 2**32 for i in range(request.batch_size)]
        if task.passthrough(ctx):
            images += [ctx.data["init"].copy() for _ in batch_seeds]
            seeds += batch_seeds
            continue

        def one_batch(batch_seeds=batch_seeds):
            t0 = time.perf_counter()
            try:
                latents, stopped_at = task.denoise(ctx, batch_seeds), None
            except Stop as stop:
                latents, stopped_at = stop.latents, (stop.step, stop.total)
            t1 = time.perf_counter()
            vae = final_vae(parts, ctx.refiner or ctx.hires_parts)
            owner = ctx.owner(vae)
            with backends.decoder_context(owner.backend, vae):  # OpenVINO's decoder where the model has it
                decoded, fell_back = task.decode(ctx, latents) if task.decode else decode(vae, latents)
            timings["sample_s"] += t1 - t0
            timings["decode_s"] += time.perf_counter() - t1
            return decoded, fell_back, stopped_at

        decoded, fell_back, stopped_at = ladder.attempt(one_batch)
        if fell_back:
            notes.append("the fp16 VAE gave NaNs; decoded again in fp32")
        if stopped_at is not None and control.interrupted:
            interrupted = True
            notes.append("interrupted after step {} of {}: the last picture is not finished".format(*stopped_at))
        elif stopped_at is not None:
            control.skip.clear()
            notes.append("batch {} skipped after step {} of {}: its pictures are not finished".format(
                batch + 1, *stopped_at))
        images += task.finish(ctx, decoded)
        seeds += batch_seeds
        if interrupted:
            break
    notes += task.notes(ctx)
    # a conversion done, a component kept on torch (the hires checkpoint can be the model itself: once)
    for owner in {id(m): m for m in (parts, ctx.refiner, ctx.hires_parts) if m is not None}.values():
        if owner.backend is not None:
            notes += owner.backend.take_notes()
    if networks is not None:
        notes += networks.notes
    if controlnet:
        notes += controlnet.notes
    if (note := ladder.note()) is not None:
        notes.append(note)

    # 6. watermark + infotext
    if request.watermark:
        images = task.watermark(ctx, images)
    own = task.infotext(request)
    if refiner is not None:  # A1111's keys
        own = {**own, "Refiner": refiner[1], "Refiner switch at": request.refiner_switch_at}
    if hires_model is not None:  # A1111's key, after the hires fix's upscaler
        keys = list(own.items())
        at = next((i + 1 for i, (key, _) in enumerate(keys) if key == "Hires upscaler"), len(keys))
        own = dict([*keys[:at], ("Hires checkpoint", hires_model[1]), *keys[at:]])
    if networks is not None:  # Lora hashes, TI hashes
        own = {**own, **networks.infotext()}
    if controlnet:  # ControlNet 0, ControlNet 1, ... as A1111's ControlNet extension
        own = {**own, **controlnet.infotext()}
    infotexts = [
        infotext_for(request, seed=s, width=width, height=height, model_name=model_name, model_hash=model_hash,
                     version=version, task_keys=own)
        for s in seeds
    ]
    timings = {k: round(v, 3) for k, v in timings.items()}
    return GenerationResult(images, seeds, infotexts, request, model_name, model_hash, timings, notes,
                            interrupted=interrupted, extras=dict(ctx.extras))


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


def final_vae(parts, finisher=None):
    """What decodes the finished latents: ``--vae taesd``'s tiny decoder (its scaling factor is 1.0, so ``decode``
    passes the latents as they are), else the VAE of the model that finished them (``finisher``: SDXL's refiner,
    the hires fix's checkpoint, as A1111)."""
    tiny = getattr(parts, "tiny_vae", None)
    return (finisher or parts).vae if tiny is None else tiny


# TAESD previews decode latents averaged down to at most this many latent pixels a side (256-pixel pictures for
# SD): a full 512x512 TAESD decode costs ~5 s on 2 CPU cores, a third of a UNet step, at every step
PREVIEW_LATENT_SIDE = 32


def latent_preview(vae, latents, tiny=None):
    """A small preview of the first image of the batch: with ``tiny`` (TAESD, ``models/taesd.py``) its decode,
    else a real decode for small VAEs, else a linear map."""
    import torch

    small = sum(p.numel() for p in vae.parameters()) < 5_000_000
    with torch.inference_mode():
        if tiny is not None:  # scaling factor 1.0: the latents as they are
            z = latents[:1].to(tiny.device, tiny.dtype)
            if (factor := -(-max(z.shape[-2:]) // PREVIEW_LATENT_SIDE)) > 1:
                z = torch.nn.functional.avg_pool2d(z.float(), factor, ceil_mode=True).to(z.dtype)
            return to_pil(tiny.decode(z).sample)[0]
        if small:
            return to_pil(vae.decode(latents[:1].to(vae.dtype) / vae.config.scaling_factor).sample)[0]
        factors = torch.tensor(_CHEAP_RGB, dtype=latents.dtype, device=latents.device)
        rgb = torch.einsum("chw,cr->rhw", latents[0, :4], factors)
        return to_pil(rgb[None])[0]


def infotext_for(request: GenerationRequest, *, seed, width, height, model_name, model_hash, version,
                 task_keys: dict | None = None) -> str:
    from ..output.infotext import format_infotext
    from .deepcache import interval_for

    sampler, schedule = display_name(request.sampler, request.scheduler)
    fast_interval = interval_for(request.fast)
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
        **(task_keys or {}),
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

"""What a task is, and the context one run gives it: the loaded model, the request, the control events,
and ``run_pipe``, the one denoising loop with progress, cancel, interrupt, skip and CFG end."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ...request import Cancelled, GenerationRequest, InvalidRequest, Mode, ProgressInfo


@dataclass
class RunControl:
    """How a caller follows and steers a run: ``progress(ProgressInfo)``; ``cancel`` set: stop and raise
    ``Cancelled``; ``interrupt`` set: stop and return what there is; ``skip`` set: end the current batch that
    way and go on (A1111's skip); ``want_previews``: progress reports carry a small preview image."""

    progress: Callable[[ProgressInfo], None] | None = None
    cancel: Any = None  # threading.Event
    interrupt: Any = None
    skip: Any = None
    want_previews: bool = False

    def stop_requested(self) -> bool:
        return any(event is not None and event.is_set() for event in (self.interrupt, self.skip))

    @property
    def interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt.is_set()


def unet_in_channels(parts) -> int:
    return parts.family.unet_in_channels


def text_to_image_models(parts) -> str | None:
    """``Task.accepts`` for tasks that need an ordinary (4-channel) UNet."""
    if unet_in_channels(parts) == 7:
        return f"{parts.name} is an upscaler ({parts.family.label}); use it with: brushwork upscale IMAGE --model ..."
    if unet_in_channels(parts) == 5:
        return (f"{parts.name} is a depth model ({parts.family.label}): it needs an init image; use depth2img "
                "(or img2img) with --init-img")
    if unet_in_channels(parts) != 4:
        return (f"{parts.name} is an inpainting model ({parts.family.label}); use it with inpaint, or use a "
                "text-to-image model for txt2img/img2img")
    return None


# how many prompt encodings a model keeps (``RunContext._encoded``; a few hundred KB each)
CONDITIONINGS_KEPT = 16

# A task names the SD pipeline it runs; on an SDXL model the same task runs SDXL's pipeline of that kind
XL_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionXLPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionXLInpaintPipeline",
}


@dataclass(frozen=True)
class Task:
    mode: Mode
    pipeline: str  # the diffusers pipeline class it runs
    denoise: Callable[[RunContext, list[int]], Any]  # one batch -> latents (through ctx.run_pipe)
    accepts: Callable[[Any], str | None] = text_to_image_models  # None, or why this model cannot run it
    prepare: Callable[[RunContext], None] = lambda ctx: None  # once per request: images, masks, ... in ctx.data
    finish: Callable[[RunContext, list], list] = lambda ctx, images: images  # the decoded pictures, per batch
    infotext: Callable[[GenerationRequest], dict] = lambda request: {}  # its own A1111 keys
    passthrough: Callable[[RunContext], bool] = lambda ctx: False  # nothing to denoise: the input is the answer
    watermark: Callable[[RunContext, list], list] = lambda ctx, images: watermarked(images)  # when it is on
    # latents -> (pictures, fell back to fp32); None: ``run.decode`` with the memory mode's VAE settings
    decode: Callable[[RunContext, Any], tuple[list, bool]] | None = None
    refines: bool = False  # hands the last steps to SDXL's refiner when the request names one (``with_refiner``)
    notes: Callable[[RunContext], list[str]] = lambda ctx: []  # what the run did that the user should know, at its end


def watermarked(images: list) -> list:
    """The invisible watermark in each whole picture."""
    from ...output.watermark import embed

    return [embed(image) for image in images]


class Stop(Exception):
    """Raised from the step callback when an interrupt or skip asks to stop; carries where the latents were."""

    def __init__(self, latents, step: int, total: int):
        super().__init__("interrupted")
        self.latents, self.step, self.total = latents, step, total


@dataclass
class RunContext:
    parts: Any
    policy: Any
    request: GenerationRequest
    width: int
    height: int
    control: RunControl
    apply_memory: Callable[[Any], None]  # puts a pipeline in the current memory mode
    batch: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # what a task's prepare() made, for its denoise()
    extras: dict[str, Any] = field(default_factory=dict)  # what the result carries beside the pictures (its extras)
    settings: Any = None  # the engine's Settings (its library: upscaler models); None: Settings.load()
    refiner: Any = None  # SDXL's refiner (models.load.ModelParts) when the request names one
    hires_parts: Any = None  # the hires fix's checkpoint (models.load.ModelParts) when the request names one
    networks: Any = None  # the request's LoRAs and embeddings (engine.networks.Networks); None: none
    controlnet: Any = None  # the request's ControlNet units (engine.controlnet.Controls); None: none
    _pipes: dict[tuple, Any] = field(default_factory=dict)
    _embeds: dict[int, tuple] = field(default_factory=dict)
    _preview_vae: tuple | None = None  # (TAESD decoder or None,) once looked up for this run; None: not yet

    def preview(self, latents):
        """The progress report's picture of ``latents``: TAESD's decode when the library's vae-approx/ has the one
        that fits (``models/taesd.py``), else ``run.latent_preview``'s. Never fails the run: a TAESD that does not
        load or decode is logged once and the rest of the run previews without it."""
        import logging

        from ...models import taesd
        from ..run import latent_preview

        if self._preview_vae is None:
            self._preview_vae = (taesd.preview_decoder(self.settings, self.parts, device=latents.device,
                                                       dtype=latents.dtype),)
        tiny = self._preview_vae[0]
        if tiny is not None:
            try:
                return latent_preview(self.parts.vae, latents, tiny)
            except Exception as err:  # a preview must never fail the run
                logging.getLogger(__name__).warning("live previews go on without TAESD: its decode failed (%s)", err)
                self._preview_vae = (None,)
        return latent_preview(self.parts.vae, latents)

    @property
    def latent_channels(self) -> int:
        """From the VAE, never the UNet's input (9 for inpainting, 7 for the x4 upscaler)."""
        return self.parts.vae.config.latent_channels

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.parts.vae.config.block_out_channels) - 1)

    def pipe(self, class_name: str, scheduler=None, parts=None):
        """A diffusers pipeline of this class over the loaded components (``parts``: others', e.g. the refiner's)
        made once per run, in the current memory mode."""
        import diffusers

        from ..controlnet import pipeline_name as controlnet_pipeline
        from ..samplers import build_scheduler

        parts = parts or self.parts
        key = (class_name, id(parts))
        if key not in self._pipes:
            scheduler = scheduler or build_scheduler(parts.scheduler_config, self.request.sampler,
                                                     self.request.scheduler)
            # ControlNet units (the model's and the hires checkpoint's, of the same kind; not the refiner's): the
            # ControlNet pipeline of the same kind
            ours = parts is self.parts or parts is self.hires_parts
            controls = self.controlnet if self.controlnet and ours else None
            control = {"controlnet": controls.model} if controls else {}
            if parts.family.xl:  # the same task on SDXL's pipeline of that kind
                name = XL_PIPELINES[class_name] if not controls else controlnet_pipeline(class_name, True)
                cls = getattr(diffusers, name)
                extra = {"requires_aesthetics_score": parts.text_encoder is None} if "Img2Img" in cls.__name__ else {}
                pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                           tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                           scheduler=scheduler, add_watermarker=False, **extra, **control)
            else:
                cls = getattr(diffusers, class_name if not controls else controlnet_pipeline(class_name, False))
                pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                           requires_safety_checker=False, **control)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        pipe = self._pipes[key]
        self.apply_memory(pipe)
        return pipe

    def generators(self, seeds: list[int]):
        import torch

        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def noise(self, generators, width: int | None = None, height: int | None = None):
        """The starting noise, drawn on the CPU, one generator per image: same seed, same picture on any device."""
        import torch

        w, h = (width or self.width) // self.vae_factor, (height or self.height) // self.vae_factor
        noise = torch.stack([torch.randn((self.latent_channels, h, w), generator=g) for g in generators])
        return noise.to(self.policy.device, self.policy.latent_dtype)

    def embeddings(self, n: int, prompt: str | None = None, negative: str | None = None, parts=None) -> dict:
        """Prompt and negative embeddings (A1111's weighting and chunking), repeated for a batch of ``n``; by the
        model's text encoders, or ``parts``' (the refiner's)."""
        from .. import prompts

        r = self.request
        parts = parts or self.parts
        own = prompt is None and negative is None
        text = r.prompt if prompt is None else prompt
        networks = self.networks_of(parts)
        if networks is not None:  # the LoRAs the prompt's tags name, at their strengths (engine.networks)
            networks.activate(text)
        networks = networks or self.networks  # the refiner's steps run without them (refiner_note), not its embeddings
        if own and id(parts) in self._embeds:
            embeds = self._embeds[id(parts)]
        else:
            texts = (prompts.strip_extra_networks(text), r.negative_prompt if negative is None else negative)
            if not self.guided(parts):  # no CFG: the negative prompt is never read, so it is not encoded
                texts = (texts[0], None)
            library = networks.embeddings_for(parts) if networks is not None else None
            options = dict(clip_skip=r.clip_skip, device=self.policy.device, emphasis=r.emphasis,
                           comma_padding_backtrack=r.comma_padding_backtrack, embeddings=library)
            lora = networks is not None and parts is networks.parts and networks.changes_text_encoder
            embeds = self._encoded(parts, texts, options, lora)
            if own:
                self._embeds[id(parts)] = embeds
        out = {"prompt_embeds": embeds[0].repeat(n, 1, 1), "negative_prompt_embeds": embeds[1].repeat(n, 1, 1)}
        if len(embeds) == 4:  # SDXL's pooled text
            out.update(pooled_prompt_embeds=embeds[2].repeat(n, 1),
                       negative_pooled_prompt_embeds=embeds[3].repeat(n, 1))
        return out

    def _encoded(self, parts, texts: tuple, options: dict, lora: bool) -> tuple:
        """``texts``' encoding by ``parts``' text encoders; the same texts with the same settings again (a new seed,
        the next picture of a batch count, the hires pass's same prompt) are read from the model's last encodings,
        as A1111 caches conds across generations, with the embeddings they used (the infotext's ``TI hashes``).
        The key holds the library's embeddings, so a file added or changed there is encoded again; an encoding a
        LoRA on the text encoder changes is never kept."""
        from .. import prompts
        from ..backends import text_context

        library = options["embeddings"]
        key = (texts, *(options[k] for k in ("clip_skip", "emphasis", "comma_padding_backtrack")),
               str(options["device"]), tuple(str(te.dtype) for te in parts.text_encoders),
               tuple(sorted((name, id(e)) for name, e in library.loaded.items())) if library is not None else ())
        cache = parts.conditionings
        if not lora and key in cache:
            embeds, used, _ = cache[key] = cache.pop(key)  # the most recent last
        else:
            used = {}  # what this encoding finds (``prompts.tokenize_weighted`` writes the library's ``used``)
            before = library.used if library is not None else None
            if library is not None:
                library.used = used
            try:
                with text_context(getattr(parts, "backend", None), parts,
                                  reasons=["a LoRA on the text encoder"] if lora else []):
                    if parts.family.xl:
                        embeds = prompts.encode_xl(parts.encoders, *texts, **options)
                    else:
                        embeds = prompts.encode(parts.text_encoder, parts.tokenizer, *texts, **options)
            finally:
                if library is not None:
                    library.used = before
            if not lora:
                # (the library's embeddings kept with it: the ids in the key stay theirs while it is kept)
                cache[key] = (embeds, used, tuple(library.loaded.values()) if library is not None else ())
                while len(cache) > CONDITIONINGS_KEPT:
                    cache.pop(next(iter(cache)))
        if library is not None:
            library.used.update(used)
        return embeds

    def networks_of(self, parts):
        """The request's LoRAs on ``parts``: the model's, the hires checkpoint's (A1111 activates them again on the
        checkpoint it switches to); None for the refiner (SDXL LoRAs do not fit its layers) and without LoRAs."""
        if self.networks is None:
            return None
        if parts is self.parts:
            return self.networks
        return self.networks.for_model(parts) if parts is self.hires_parts else None

    def guided(self, parts=None) -> bool:
        """Whether the run uses CFG (a negative prompt): as diffusers decides it, CFG scale above 1 and a UNet that
        does not take the guidance as an embedding (LCM's)."""
        unet = (parts or self.parts).unet
        return float(self.request.cfg_scale) > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None

    def with_refiner(self, pipe, **kwargs):
        """``run_pipe(pipe, **kwargs)``; with a refiner, the model stops at ``refiner_switch_at`` of the schedule and
        the refiner denoises the rest of the same schedule (diffusers' ``denoising_end`` / ``denoising_start``), as
        A1111 switches checkpoints mid-sampling. Progress counts both as one run."""
        if self.refiner is None:
            return self.run_pipe(pipe, **kwargs)
        r = self.request
        switch = float(r.refiner_switch_at)
        steps = int(kwargs["num_inference_steps"])
        total = steps if "strength" not in kwargs else min(steps, int(steps * float(kwargs["strength"])))
        latents = self.run_pipe(pipe, denoising_end=switch, total=total, **kwargs)
        done = getattr(pipe, "_num_timesteps", 0)
        refiner = self.pipe("StableDiffusionImg2ImgPipeline", parts=self.refiner)
        if self.networks is not None:
            self.networks.refiner_note()
        return self.run_pipe(refiner, **self.embeddings(latents.shape[0], parts=self.refiner), image=latents,
                             denoising_start=switch, num_inference_steps=steps, generator=kwargs.get("generator"),
                             step_offset=done, total=total)

    def owner(self, module):
        """The loaded model (``parts``, the refiner's or the hires checkpoint's) that ``module`` (a UNet, a VAE) is
        part of."""
        for other in (self.refiner, self.hires_parts):
            if other is not None and (module is other.unet or module is other.vae):
                return other
        return self.parts

    def backend_for(self, pipe, controls=None):
        """The CPU backend (``engine.backends``) of the model whose UNet ``pipe`` runs, for one denoising loop; torch
        where this request changes the UNet's insides."""
        from ..backends import unet_context
        from ..deepcache import interval_for

        r = self.request
        owner = self.owner(pipe.unet)
        nets = self.networks_of(owner)
        reasons = [why for why, applies in (
            ("fast mode", interval_for(r.fast) > 1), ("token merging", float(r.token_merging_ratio) > 0),
            ("a LoRA on the UNet", nets is not None and nets.changes_unet),
            ("ControlNet", bool(controls))) if applies]
        return unet_context(getattr(owner, "backend", None), pipe.unet, reasons=reasons)

    def run_pipe(self, pipe, *, step_offset: int = 0, total: int | None = None, **kwargs):
        """Run one denoising loop to latents, reporting progress (steps ``step_offset`` + 1.. of ``total``);
        raises ``Stop`` where an interrupt/skip stopped it and ``Cancelled`` for a cancel."""
        import torch

        from ..deepcache import deep_cache, interval_for
        from ..run import end_guidance_after
        from ..tome import token_merging

        r, control = self.request, self.control

        def on_step_end(p, i, t, callback_kwargs):
            if control.cancel is not None and control.cancel.is_set():
                raise Cancelled("cancelled")
            steps = total or getattr(p, "_num_timesteps", None) or r.steps
            if control.stop_requested():
                raise Stop(callback_kwargs["latents"], step_offset + i + 1, steps)
            end_guidance_after(r.cfg_end, p, i, callback_kwargs)
            if control.progress is not None:
                preview = self.preview(callback_kwargs["latents"]) if control.want_previews else None
                control.progress(ProgressInfo(step=step_offset + i + 1, total=steps, batch=self.batch,
                                              batches=r.n_iter, preview=preview))
            return callback_kwargs

        kwargs.setdefault("guidance_scale", float(r.cfg_scale))
        kwargs.setdefault("eta", float(r.eta))
        controls = self.controlnet if self.controlnet and getattr(pipe, "controlnet", None) is not None else None
        tensors = ("latents", "prompt_embeds", "mask", "masked_image_latents", "depth_mask", "add_text_embeds",
                   "add_time_ids")
        if controls:  # the units' maps, weights, start / end (engine.controlnet); their images halve with CFG end
            kwargs.update(controls.inputs(pipe, self, kwargs))
            tensors += ("image", "control_image")
        with (torch.inference_mode(), deep_cache(pipe.unet, interval_for(r.fast)),  # the UNet this loop runs
              token_merging(pipe.unet, float(r.token_merging_ratio)),
              controls.applied(pipe) if controls else nullcontext(), self.backend_for(pipe, controls)):
            out = pipe(**kwargs, output_type="latent", callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=[name for name in tensors
                                                           if name in pipe._callback_tensor_inputs])
        return out.images


def resized(image, width: int, height: int):
    """An RGB copy of ``image`` at this size (Lanczos), as the pipelines take their init images."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def needs_init_image(ctx: RunContext) -> None:
    if ctx.request.init_image is None:
        raise InvalidRequest(f"{ctx.request.mode.value} needs an init image (--init-img)")

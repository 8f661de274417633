"""What a task is, and the context one run gives it: the loaded model, the request, the control events,
and ``run_pipe``, the one denoising loop with progress, cancel, interrupt, skip and CFG end."""

from __future__ import annotations

from collections.abc import Callable
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
    _pipes: dict[str, Any] = field(default_factory=dict)
    _embeds: tuple | None = None

    @property
    def latent_channels(self) -> int:
        """From the VAE, never the UNet's input (9 for inpainting, 7 for the x4 upscaler)."""
        return self.parts.vae.config.latent_channels

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.parts.vae.config.block_out_channels) - 1)

    def pipe(self, class_name: str, scheduler=None):
        """A diffusers pipeline of this class over the loaded components (made once per run), in the current
        memory mode."""
        import diffusers

        from ..samplers import build_scheduler

        if class_name not in self._pipes:
            parts = self.parts
            cls = getattr(diffusers, class_name)
            pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
                       scheduler=scheduler or build_scheduler(parts.scheduler_config, self.request.sampler,
                                                              self.request.scheduler),
                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[class_name] = pipe
        pipe = self._pipes[class_name]
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

    def embeddings(self, n: int, prompt: str | None = None, negative: str | None = None) -> dict:
        """Prompt and negative embeddings (A1111's weighting and chunking), repeated for a batch of ``n``."""
        from .. import prompts

        r = self.request
        if prompt is None and negative is None and self._embeds is not None:
            pos, neg = self._embeds
        else:
            pos, neg = prompts.encode(self.parts.text_encoder, self.parts.tokenizer,
                                      r.prompt if prompt is None else prompt,
                                      r.negative_prompt if negative is None else negative,
                                      clip_skip=r.clip_skip, device=self.policy.device, emphasis=r.emphasis,
                                      comma_padding_backtrack=r.comma_padding_backtrack)
            if prompt is None and negative is None:
                self._embeds = (pos, neg)
        return {"prompt_embeds": pos.repeat(n, 1, 1), "negative_prompt_embeds": neg.repeat(n, 1, 1)}

    def run_pipe(self, pipe, *, step_offset: int = 0, total: int | None = None, **kwargs):
        """Run one denoising loop to latents, reporting progress (steps ``step_offset`` + 1.. of ``total``);
        raises ``Stop`` where an interrupt/skip stopped it and ``Cancelled`` for a cancel."""
        import torch

        from ..deepcache import deep_cache, interval_for
        from ..run import end_guidance_after, latent_preview
        from ..tome import token_merging

        r, control, parts = self.request, self.control, self.parts

        def on_step_end(p, i, t, callback_kwargs):
            if control.cancel is not None and control.cancel.is_set():
                raise Cancelled("cancelled")
            steps = total or getattr(p, "_num_timesteps", None) or r.steps
            if control.stop_requested():
                raise Stop(callback_kwargs["latents"], step_offset + i + 1, steps)
            end_guidance_after(r.cfg_end, p, i, callback_kwargs)
            if control.progress is not None:
                preview = latent_preview(parts.vae, callback_kwargs["latents"]) if control.want_previews else None
                control.progress(ProgressInfo(step=step_offset + i + 1, total=steps, batch=self.batch,
                                              batches=r.n_iter, preview=preview))
            return callback_kwargs

        kwargs.setdefault("guidance_scale", float(r.cfg_scale))
        kwargs.setdefault("eta", float(r.eta))
        with (torch.inference_mode(), deep_cache(parts.unet, interval_for(r.fast)),
              token_merging(parts.unet, float(r.token_merging_ratio))):
            out = pipe(**kwargs, output_type="latent", callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=[
                           name for name in ("latents", "prompt_embeds", "mask", "masked_image_latents", "depth_mask")
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

"""depth2img: img2img that keeps the picture's depth, on SD 2 depth (a 5-channel UNet: 4 latent + 1 depth).

As the original does it (stable-diffusion's ``scripts/gradio/depth2img.py`` and ``LatentDepth2ImageDiffusion``,
A1111's ``depth2img_image_conditioning``):

1. the depth: the model's own MiDaS DPT-Hybrid estimate of the init image (at the output size), or the request's
   ``depth_map`` (a grayscale picture, white = near, as MiDaS's inverse depth) instead. The estimator's input is
   MiDaS's transform (``ldm/modules/midas/api.py``, ``Resize(384, 384, keep_aspect_ratio=True,
   ensure_multiple_of=32, resize_method="minimal")`` + ``NormalizeImage(0.5, 0.5)``): resized bicubic (cv2's
   INTER_CUBIC kernel, no antialiasing) to the multiple of 32 nearest the size that scales the picture as little
   as possible toward 384 x 384 keeping its aspect ratio (a picture larger than 384 on both sides gets 384 on its
   short side; a smaller one grows until one side is 384), then mapped to [-1, 1] (mean and std 0.5);
2. the depth resized bicubic to the latent size and normalized per image to [-1, 1]:
   ``2 (d - min) / (max - min) - 1`` with the range held to at least ``DEPTH_EPS`` (the original's 0.001), so a
   flat map gives -1 everywhere, not NaN. Where the range is larger this is diffusers' ``prepare_depth_map``
   exactly, so the pictures equal plain diffusers' on the same depth;
3. diffusers' ``StableDiffusionDepth2ImgPipeline``, handed that depth ready (``PreparedDepthPipeline``): the init
   image encoded and noised to the strength with each picture's CPU generator (seed + i), the depth concatenated
   to the latents at every step. Strength 0 (or too few steps to reach one) returns the init image, as img2img.

An img2img request on a depth model runs this task too (A1111 does so: its img2img on a depth checkpoint is
depth2img); txt2img on one is refused, it needs a picture. The depth map used is in the result's
``extras["depth_map"]`` (a grayscale picture at the latent size: -1 black, 1 white), and with ``save_depth`` it is
written beside the pictures.
"""

from __future__ import annotations

import functools

from ...request import InvalidRequest, Mode
from .base import RunContext, Task, needs_init_image, resized

DEPTH_EPS = 1e-3  # the original's: 2 (d - min) / (max - min + 0.001) - 1
MIDAS_MULTIPLE = 32


def accepts(parts) -> str | None:
    if parts.family.unet_in_channels != 5:
        return (f"{parts.name} is not a depth model ({parts.family.label}); depth2img needs Stable Diffusion 2 depth "
                "(512-depth-ema), or use img2img")
    return None


def midas_size(width: int, height: int, net: int = 384) -> tuple[int, int]:
    """MiDaS's ``Resize.get_size`` with ``keep_aspect_ratio=True, ensure_multiple_of=32, resize_method="minimal"``:
    the one scale that changes the picture least (the side whose scale to ``net`` is nearest 1), each side then
    rounded to a multiple of 32 (numpy's round: halves to even)."""
    import numpy as np

    scale_w, scale_h = net / width, net / height
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    def multiple(x: float) -> int:
        return int(np.round(x / MIDAS_MULTIPLE) * MIDAS_MULTIPLE)

    return multiple(scale * width), multiple(scale * height)


def midas_input(image, net: int = 384):
    """The estimator's input for a picture, as MiDaS's transform makes it: (1, 3, H, W) float32 in [-1, 1]."""
    import numpy as np
    import torch

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # as the depth2img script's batch
    x = torch.from_numpy((rgb + 1.0) * 0.5).permute(2, 0, 1)[None]  # AddMiDaS: back to [0, 1]
    w, h = midas_size(image.width, image.height, net)
    # torch's bicubic is cv2's INTER_CUBIC (a = -0.75, pixel centres, no antialiasing)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return (x - 0.5) / 0.5


def predict_depth(model, pixels):
    """DPTForDepthEstimation's ``predicted_depth`` (B, H, W) at any size that is a multiple of 32, as MiDaS runs it.
    transformers' DPT-Hybrid takes only its square training size; at another size its position embeddings are
    resized to the grid (bilinear, as MiDaS's ``_resize_pos_embed``) and the neck is told the grid's shape."""
    h, w = pixels.shape[-2:]
    side = model.config.image_size
    if (h, w) == (side, side):
        return model(pixel_values=pixels).predicted_depth
    embeddings = model.dpt.embeddings(pixels, interpolate_pos_encoding=True)
    hidden = embeddings.last_hidden_states
    taps = list(embeddings.intermediate_activations)  # the ResNet's first two stages
    read = model.config.backbone_out_indices[2:]  # and these ViT blocks' outputs
    for i, layer in enumerate(model.dpt.encoder.layer):
        hidden = layer(hidden)
        if i in read:
            taps.append(hidden)
    patch = model.config.patch_size
    return model.head(model.neck(taps, h // patch, w // patch))


def estimate(estimator, image, device):
    """The estimator's raw depth of a picture (1, H, W), float32 on the CPU. It runs in fp32 on the run's device
    (MiDaS's batch norms and weight standardisation are not for fp16) and goes back to the CPU after, leaving the
    GPU's memory to the UNet."""
    import torch

    estimator.to(device=device, dtype=torch.float32)
    try:
        with torch.inference_mode():
            return predict_depth(estimator, midas_input(image, estimator.config.image_size).to(device)).float().cpu()
    finally:
        if torch.device(device).type != "cpu":
            estimator.to("cpu")


def depth_from_image(image):
    """A depth map picture -> (1, H, W) float32: grey levels in [0, 1] (16-bit and float pictures keep theirs)."""
    import numpy as np
    import torch

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
    else:
        values = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(values))[None]


def normalized(depth, height: int, width: int):
    """(B, H, W) raw depth -> (B, 1, height, width) in [-1, 1]: bicubic to that size, then per image
    ``2 (d - min) / max(max - min, DEPTH_EPS) - 1`` (diffusers' prepare_depth_map, the original's epsilon)."""
    import torch

    d = torch.nn.functional.interpolate(depth.float().unsqueeze(1), size=(height, width), mode="bicubic",
                                        align_corners=False)
    low = torch.amin(d, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(d, dim=[1, 2, 3], keepdim=True)
    return 2.0 * (d - low) / (high - low).clamp(min=DEPTH_EPS) - 1.0


def depth_picture(depth):
    """The first map of (B, 1, h, w) in [-1, 1] as a grayscale picture: -1 black, 1 white."""
    import numpy as np
    from PIL import Image

    grey = ((depth[0, 0].float().clamp(-1, 1) + 1.0) * 127.5).round().to("cpu").numpy().astype(np.uint8)
    return Image.fromarray(grey)  # uint8, 2-D: mode L


def prepare(ctx: RunContext) -> None:
    needs_init_image(ctx)
    r, parts = ctx.request, ctx.parts
    ctx.data["init"] = resized(r.init_image, ctx.width, ctx.height)
    if r.depth_map is not None:
        raw = depth_from_image(r.depth_map)
    else:
        estimator = getattr(parts, "depth_estimator", None)
        if estimator is None:
            raise InvalidRequest(f"{parts.name} carries no depth estimator (no depth_model.* weights); give a depth "
                                 "map: brushwork depth2img --depth-map FILE (a grayscale picture, white = near)")
        raw = estimate(estimator, ctx.data["init"], ctx.policy.device)
    depth = normalized(raw, ctx.height // ctx.vae_factor, ctx.width // ctx.vae_factor)
    ctx.data["depth"] = depth
    ctx.extras["depth_map"] = depth_picture(depth)


def passthrough(ctx: RunContext) -> bool:
    """Strength 0, or too few steps to reach one at this strength: the init image is the answer (as img2img)."""
    strength = float(ctx.request.strength)
    return not (strength > 0 and int(ctx.request.steps * strength) >= 1)


@functools.cache
def pipeline_class():
    """diffusers' StableDiffusionDepth2ImgPipeline, taking its ``depth_map`` ready (latent size, [-1, 1]): only
    repeated for the batch and doubled for CFG, as the end of its own ``prepare_depth_map``, which would estimate
    or normalize it again (and divide by zero on a flat map)."""
    import torch
    from diffusers import StableDiffusionDepth2ImgPipeline

    class PreparedDepthPipeline(StableDiffusionDepth2ImgPipeline):
        def prepare_depth_map(self, image, depth_map, batch_size, do_classifier_free_guidance, dtype, device):
            depth = depth_map.to(device=device, dtype=dtype)
            if depth.shape[0] < batch_size:
                depth = depth.repeat(batch_size // depth.shape[0], 1, 1, 1)
            return torch.cat([depth] * 2) if do_classifier_free_guidance else depth

    return PreparedDepthPipeline


def pipe(ctx: RunContext):
    """The pipeline over the loaded components (made once per run), in the current memory mode."""
    if "depth2img" not in ctx._pipes:
        from ..samplers import build_scheduler

        parts = ctx.parts
        ctx._pipes["depth2img"] = pipeline_class()(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=build_scheduler(parts.scheduler_config, ctx.request.sampler, ctx.request.scheduler),
            depth_estimator=None, feature_extractor=None)  # the depth comes ready: prepare()
        ctx._pipes["depth2img"].set_progress_bar_config(disable=True)
    ready = ctx._pipes["depth2img"]
    ctx.apply_memory(ready)
    return ready


def denoise(ctx: RunContext, seeds: list[int]):
    r = ctx.request
    return ctx.run_pipe(pipe(ctx), **ctx.embeddings(len(seeds)), image=ctx.data["init"],
                        depth_map=ctx.data["depth"], strength=float(r.strength), num_inference_steps=r.steps,
                        generator=ctx.generators(seeds))


TASK = Task(mode=Mode.DEPTH2IMG, pipeline="StableDiffusionDepth2ImgPipeline", denoise=denoise, accepts=accepts,
            prepare=prepare, passthrough=passthrough,
            infotext=lambda request: {"Denoising strength": request.strength})

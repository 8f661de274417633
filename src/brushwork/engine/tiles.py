"""Large pictures in overlapping tiles: the UNet per tile at every denoising step, and the VAE decode per tile.

The UNet (MultiDiffusion, Bar-Tal et al. 2023; Mixture of Diffusers, Jiménez 2023): at each step the model's
prediction for the whole latent is the weighted mean of its predictions for overlapping tiles,
``pred(x) = sum_i w_i * pred_i(x) / sum_i w_i``. MultiDiffusion's per-step least-squares fusion is this mean with
equal weights; Mixture of Diffusers weighs each tile by a window that falls off toward its edges, so that no tile
edge (where a tile sees least of its surroundings) shows as a seam. The window here is a linear ramp over the
overlap on each side that borders another tile (a side on the picture's border keeps full weight). Every
sampler in the table steps linearly in the prediction (DDIM, Euler, DPM++ multistep, ...), so fusing the
predictions and stepping once is fusing the tiles' steps. The scheduler, the noise and the text conditioning stay
whole-picture: one denoising loop, one set of random numbers, whatever the tiling.

The decode: each latent tile is decoded on its own and the pictures are blended with the same window at pixel
scale. The x4 upscaler's VAE has a self-attention layer in its middle block, over every latent pixel at once
(128x128 latents: 16k tokens; 512x512: 262k), so decoding in tiles both bounds its memory and changes it a little
(each tile attends within itself), which the blend hides.

Memory is bounded by the tile: one tile goes through the UNet, and one through the VAE, at a time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager


def spans(length: int, tile: int, overlap: int, *, fit: bool = False) -> list[tuple[int, int]]:
    """(start, end) of the tiles covering ``0..length``: one when it fits, else the fewest tiles of ``tile`` that
    overlap by at least ``overlap``, spread evenly (the first at 0, the last at the end). ``fit``: the tiles made
    just large enough (at most ``tile``) that the overlaps stay about ``overlap``, so fewer pixels run twice (the
    upscaler models of ``engine.upscalers``); without it every tile is exactly ``tile`` (the x4 UNet's tiles: a
    multiple of 8 the request chose)."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n)) if fit else tile
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def ramp(start: int, end: int, length: int, overlap: int):
    """The window along one axis of a tile: rising linearly over ``overlap`` from a side that borders another
    tile, 1 elsewhere (never 0, so every pixel has weight)."""
    import torch

    size = end - start
    k = torch.arange(size, dtype=torch.float32)
    w = torch.ones(size)
    if overlap > 0:
        if start > 0:
            w = torch.minimum(w, (k + 1) / (overlap + 1))
        if end < length:
            w = torch.minimum(w, (size - k) / (overlap + 1))
    return w


def grid(height: int, width: int, tile: int, overlap: int, scale: int = 1):
    """Each tile of a ``height`` x ``width`` latent as (y0, y1, x0, x1, window), at ``scale`` times that size
    (the VAE's pixels: the same tiles and window, ``scale`` times finer)."""
    out = []
    for y0, y1 in spans(height, tile, overlap):
        wy = ramp(y0 * scale, y1 * scale, height * scale, overlap * scale)
        for x0, x1 in spans(width, tile, overlap):
            wx = ramp(x0 * scale, x1 * scale, width * scale, overlap * scale)
            out.append((y0 * scale, y1 * scale, x0 * scale, x1 * scale, wy[:, None] * wx[None, :]))
    return out


def is_tiled(height: int, width: int, tile: int) -> bool:
    return height > tile or width > tile


@contextmanager
def tiled_unet(unet, tile: int, overlap: int):
    """Within the block, a call of ``unet`` on latents larger than ``tile`` runs it per tile and returns the
    windowed mean of the tiles' predictions (the module docstring); smaller latents run whole. Undone on exit.
    ``sample`` carries every input channel (the x4 upscaler's 4 latent + 3 low-res picture channels), so each
    tile sees its own part of the low-res picture; the text, the timestep and the class labels are the whole's."""
    original = unet.forward  # bound; an offload hook's forward where there is one
    own = "forward" in unet.__dict__

    import torch

    def forward(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        height, width = sample.shape[-2:]
        if not is_tiled(height, width, tile):
            return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        total = weights = None
        for y0, y1, x0, x1, window in grid(height, width, tile, overlap):
            pred = original(sample[..., y0:y1, x0:x1], timestep, encoder_hidden_states, *args, return_dict=False,
                            **kwargs)[0]
            if total is None:  # summed in fp32 whatever the UNet's dtype (bf16 sums would round at every tile)
                total = pred.new_zeros((*pred.shape[:-2], height, width), dtype=torch.float32)
                weights = pred.new_zeros((height, width), dtype=torch.float32)
            window = window.to(pred.device)
            total[..., y0:y1, x0:x1] += pred.float() * window
            weights[y0:y1, x0:x1] += window
            dtype = pred.dtype
        out = (total / weights).to(dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    unet.forward = forward
    try:
        yield
    finally:
        if own:
            unet.forward = original
        else:
            del unet.forward


@contextmanager
def whole_decode(vae):
    """diffusers' own VAE tiling (the memory modes switch it on) off within the block: our tiles, or none."""
    tiling = getattr(vae, "use_tiling", False)
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = tiling


def decode_tiled(vae, latents, tile: int, overlap: int):
    """Latents -> pixels in [-1, 1], one latent tile (of ``tile``, overlapping by ``overlap``) through the VAE at a
    time, blended with the window at pixel scale; latents no larger than a tile are decoded whole."""
    import torch

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = latents.shape[-2:]

    def run(z):
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample

    with torch.inference_mode(), whole_decode(vae):
        if not is_tiled(height, width, tile):
            return run(latents)
        total = weights = None
        for y0, y1, x0, x1, window in grid(height, width, tile, overlap, scale=factor):
            pixels = run(latents[..., y0 // factor:y1 // factor, x0 // factor:x1 // factor]).float()
            if total is None:
                total = pixels.new_zeros((*pixels.shape[:-2], height * factor, width * factor))
                weights = pixels.new_zeros((height * factor, width * factor))
            window = window.to(pixels.device)
            total[..., y0:y1, x0:x1] += pixels * window
            weights[y0:y1, x0:x1] += window
            del pixels
        return total / weights

"""TAESD and TAESDXL: the tiny VAE decoders (diffusers' ``AutoencoderTiny``), from the library's ``vae-approx/``.

Two uses: the live preview of every run (a real picture of the latents at each step instead of the linear
"Approx cheap" map) whenever the decoder that fits the model is in the library, and ``--vae taesd`` (HTTP: ``vae`` /
A1111's ``sd_vae``), the final decode, for when speed matters more than detail (the infotext says ``VAE: taesd``).
Encoding (img2img, inpaint, the hires fix's second pass) keeps the model's own VAE: its latents are the ones the UNet
was trained on, and it runs once a picture; so ``taesd_encoder.pth`` is not needed.

Files (github.com/madebyollin/taesd), in ``<library>/vae-approx/`` (``VAE_APPROX_FOLDERS``): ``taesd_decoder.pth`` for
SD 1.x / 2.x and ``taesdxl_decoder.pth`` for SDXL, ``.pth`` or ``.safetensors``; or a diffusers ``AutoencoderTiny``
folder ``taesd/`` / ``taesdxl/`` (config.json + diffusion_pytorch_model.safetensors: the hub's madebyollin/taesd).

The original files are the state dict of an ``nn.Sequential`` that starts with a weightless clamp, so their layer
``N`` is diffusers' ``DecoderTiny.layers[N - 1]`` (the clamp, ``tanh(x / 3) * 3``, is in ``DecoderTiny.forward``,
which also maps the original [0, 1] output to [-1, 1]). The architecture (latent channels, stages, blocks, channels)
is read from the tensor shapes, so a tiny decoder of another size loads too, and one whose latent channels or
upscale factor do not fit the model is refused rather than drawing garbage.

Scaling: TAESD decodes the latents the UNet works on as they are (they are already multiplied by the model's VAE
scaling factor, 0.18215 for SD), so its ``scaling_factor`` is 1.0 and ``latents / scaling_factor`` (what diffusers'
pipelines and ``engine.run.decode`` do) leaves them unchanged. ``latent_magnitude`` / ``latent_shift`` only turn
latents into bytes in ``AutoencoderTiny.forward`` (its training round trip); decoding never uses them.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger(__name__)

SOURCE = "github.com/madebyollin/taesd"
# name (what --vae and the infotext say) -> the models it fits; SDXL's latent space differs from SD's with the
# same shape (4 channels, 8x), so only the family tells them apart
TINY_VAES = {"taesd": "Stable Diffusion 1.x / 2.x", "taesdxl": "SDXL"}
SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass(frozen=True)
class TinyVaeFile:
    name: str  # "taesd" | "taesdxl"
    path: Path  # a decoder file, or a diffusers AutoencoderTiny folder


def name_for(family_name: str) -> str:
    """The tiny decoder that fits a model family: TAESDXL for SDXL ("sdxl*"), TAESD for the others."""
    return "taesdxl" if family_name.startswith("sdxl") else "taesd"


def _candidates(name: str) -> tuple[str, ...]:
    """The file and folder names ``name``'s decoder goes by, in order of preference."""
    return (*(f"{name}_decoder{s}" for s in SUFFIXES), name, *(f"{name}{s}" for s in SUFFIXES))


def library_files(store) -> dict[str, TinyVaeFile]:
    """The tiny decoders in the library's vae-approx/ folder(s), by name (``TINY_VAES``)."""
    found: dict[str, TinyVaeFile] = {}
    entries = {p.name.lower(): p for p in reversed(store.vae_approx())}  # the first folder wins a clash
    for name in TINY_VAES:
        for candidate in _candidates(name):
            path = entries.get(candidate)
            if path is not None and (path.is_file() or (path / "config.json").is_file()):
                found[name] = TinyVaeFile(name, path)
                break
    return found


def missing(name: str, store) -> str:
    """What to put where for ``name``."""
    return (f"no {name.upper()} decoder in the library: put {name}_decoder.pth (from {SOURCE}) in "
            f"{store.root / 'vae-approx'}/")


def requested(value: str | None, store) -> TinyVaeFile | None:
    """The tiny decoder a ``--vae`` value names: "taesd" / "taesdxl" (any case) or a vae-approx/ file's name from
    the library, or a path to a file or folder whose name starts with "taesd"; None for any other VAE.
    ``ModelError`` (saying which file to put where) when it names one that is not there."""
    if not value or not value.strip():
        return None
    wanted = value.strip()
    files = library_files(store)
    if wanted.lower() in TINY_VAES:
        if wanted.lower() not in files:
            raise ModelError(missing(wanted.lower(), store))
        return files[wanted.lower()]
    for file in files.values():
        if wanted == file.path.name:
            return file
    path = Path(wanted).expanduser()
    if path.name.lower().startswith("taesd") and path.exists():
        return TinyVaeFile("taesdxl" if path.name.lower().startswith("taesdxl") else "taesd", path)
    return None


# ---- reading ----------------------------------------------------------------------------------------------------


def _decoder_tensors(sd: dict, name: str) -> dict:
    """The decoder's tensors under diffusers' names (``layers.I....``), from the original layout (``N....``, also
    inside ``decoder.`` / ``taesd_decoder.``) or diffusers' (``decoder.layers.I....``)."""
    out = {}
    for key, value in sd.items():
        for prefix in ("taesd_decoder.", "decoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        head, _, rest = key.partition(".")
        if head == "layers":
            out[key] = value
        elif head.isdigit() and rest:
            if head == "0":  # the decoder's layer 0 is the clamp, which has no weights: this is an encoder
                raise ModelError(f"{name} is a TAESD encoder (or another model), not a decoder: use "
                                 f"taesd_decoder.pth from {SOURCE}")
            out[f"layers.{int(head) - 1}.{rest}"] = value
    if not out:
        raise ModelError(f"{name} holds no TAESD decoder weights (expected the layout of taesd_decoder.pth from "
                         f"{SOURCE}, or a diffusers AutoencoderTiny)")
    return out


def _decoder_config(shapes: dict[str, tuple], name: str) -> dict:
    """AutoencoderTiny's decoder arguments from the tensor shapes: conv_in, then per stage its blocks and a conv
    (without bias between stages, with bias at the end)."""
    layers: dict[int, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        index, _, rest = key.removeprefix("layers.").partition(".")
        layers.setdefault(int(index), {})[rest] = tuple(shape)
    first = layers.get(0, {}).get("weight")
    stages, channels, blocks, out_channels = [], [], 0, None
    for index in sorted(layers)[1:]:
        part = layers[index]
        if "conv.0.weight" in part:
            blocks += 1
        elif len(part.get("weight", ())) == 4:
            stages.append(blocks)
            channels.append(part["weight"][1])
            blocks = 0
            if "bias" in part:
                out_channels = part["weight"][0]
                break
    if first is None or len(first) != 4 or out_channels is None:
        raise ModelError(f"{name} is not a TAESD decoder: its layers do not read as one (see {SOURCE})")
    return {"latent_channels": first[1], "out_channels": out_channels, "decoder_block_out_channels": tuple(channels),
            "num_decoder_blocks": tuple(stages),
            # the encoder is not used (encoding keeps the model's VAE) and is removed once built: the least one
            "encoder_block_out_channels": (channels[0],), "num_encoder_blocks": (0,)}


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int, _size: int) -> tuple[dict, dict]:
    """(AutoencoderTiny config, decoder tensors on the CPU), once per file version."""
    from .load import load_state_dict

    where = Path(path)
    if where.is_dir():
        if not (where / "config.json").is_file():
            raise ModelError(f"{where} is a folder but not a diffusers AutoencoderTiny (no config.json)")
        config = json.loads((where / "config.json").read_text())
        if config.get("_class_name") != "AutoencoderTiny":
            raise ModelError(f"{where} is not a diffusers AutoencoderTiny folder (its config.json names "
                             f"{config.get('_class_name')!r})")
        weights = next((where / f"diffusion_pytorch_model{s}" for s in (".safetensors", ".bin")
                        if (where / f"diffusion_pytorch_model{s}").is_file()), None)
        if weights is None:
            raise ModelError(f"{where} has no diffusion_pytorch_model.safetensors")
        tensors = _decoder_tensors({k: v for k, v in load_state_dict(weights).items() if k.startswith("decoder.")},
                                   where.name)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(encoder_block_out_channels=(config.get("decoder_block_out_channels", (64,))[0],),
                      num_encoder_blocks=(0,))
        return config, _in_memory(tensors)
    tensors = _decoder_tensors(load_state_dict(where), where.name)
    return _decoder_config({k: tuple(v.shape) for k, v in tensors.items()}, where.name), _in_memory(tensors)


def _in_memory(tensors: dict) -> dict:
    """fp32 copies (a .pth is read memory-mapped: copying from the mapping at every load costs more than keeping it)."""
    import torch

    return {k: v.to(torch.float32, copy=True) for k, v in tensors.items()}


def load(file: TinyVaeFile | Path, *, device="cpu", dtype=None):
    """The tiny decoder (an ``AutoencoderTiny`` without its encoder), on ``device`` in ``dtype`` (default fp32):
    a fresh module each call, from a file read once per version (path, time, size)."""
    import accelerate
    import torch
    from diffusers import AutoencoderTiny

    path = Path(file.path if isinstance(file, TinyVaeFile) else file)
    stats = [p.stat() for p in ([*path.iterdir()] if path.is_dir() else [path]) if p.is_file()]
    if not stats:
        raise ModelError(f"{path} holds no TAESD decoder (see {SOURCE})")
    config, tensors = _read(str(path.resolve()), max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats))
    dtype = dtype or torch.float32
    try:
        with accelerate.init_empty_weights():
            tiny = AutoencoderTiny.from_config(config)
        del tiny.encoder
        tiny.load_state_dict({f"decoder.{k}": v.to(device=device, dtype=dtype, copy=True) for k, v in tensors.items()},
                             strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path.name} is not a TAESD decoder this version can read ({first})") from err
    return tiny.eval()


def upscale_factor(tiny) -> int:
    c = tiny.config
    return int(c.upsampling_scaling_factor) ** (len(c.decoder_block_out_channels) - 1)


def misfit(tiny, name: str, parts) -> str | None:
    """Why this tiny decoder cannot decode this model's latents (None when it can): the family (SD vs SDXL), the
    latent channels and the upscale factor must all agree."""
    family = parts.family
    if name in TINY_VAES and name != name_for(family.name):
        return (f"{name} is the tiny decoder for {TINY_VAES[name]} models; {parts.name} is {family.label}: use "
                f"--vae {name_for(family.name)}")
    vae = parts.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    if (tiny.config.latent_channels, upscale_factor(tiny)) != (vae.latent_channels, factor):
        return (f"{name} decodes {tiny.config.latent_channels}-channel latents {upscale_factor(tiny)}x up, but "
                f"{parts.name}'s latents have {vae.latent_channels} channels and its VAE scales them {factor}x up")
    return None


def for_model(file: TinyVaeFile, parts):
    """``--vae taesd``: the tiny decoder for this model (on the CPU, fp32), or ``ModelError`` saying why it does
    not fit."""
    tiny = load(file)
    if (problem := misfit(tiny, file.name, parts)) is not None:
        raise ModelError(problem)
    return tiny


def preview_decoder(settings, parts, *, device, dtype):
    """The tiny decoder for this model's live previews when the library has it, else None. Never raises: a file
    that does not load is logged (once per run: the caller keeps the answer) and the preview stays the linear map."""
    try:
        from ..settings import Settings
        from .store import ModelStore

        store = ModelStore(settings or Settings.load())
        file = library_files(store).get(name_for(parts.family.name))
        if file is None:
            return None
        tiny = load(file, device=device, dtype=dtype)
        if (problem := misfit(tiny, file.name, parts)) is not None:
            log.info("live previews keep the linear map: %s", problem)
            return None
        return tiny
    except Exception as err:  # a preview must never fail the run
        log.warning("live previews keep the linear map: the tiny decoder did not load (%s)", err)
        return None

"""Upscalers: one table for the hires fix, ``/sdapi/v1`` extras, the ``upscale`` command and the web UI.

The names, in order (``available``): "None", "Lanczos", "Nearest" (PIL filters, always there), then the upscaler
models of the library (``ModelStore.upscalers``: ``.pth`` / ``.safetensors`` files in its ``upscalers/``,
``ESRGAN/``, ``RealESRGAN/``, ``SwinIR/``, ``DAT/`` folders, by file stem): Real-ESRGAN, 4x-UltraSharp, SwinIR, DAT,
HAT, SPAN, ... Their architecture is read from the weights by spandrel (as ComfyUI does); a ``.pth`` is unpickled
with ``weights_only=True``, so a file that wants to run code is refused.

``upscale_with(name, image, scale, settings)`` works as A1111's upscalers: a model runs at its own scale (again,
up to three times, while the picture is smaller than asked), then Lanczos makes the exact size. Unlike A1111 the
size is not rounded down to a multiple of 8: ``scale`` 2 on 100x75 is 200x150. "None" is a plain Lanczos resize
(A1111's ``UpscalerNone``). Models run in overlapping tiles (at most ``TILE`` pixels, ``OVERLAP`` of them shared),
blended with ramps over the middle of each overlap so no seam shows; on an out-of-memory error the tile is halved
and the picture run again (a model that spandrel says tiles badly, or tiles itself, runs whole until then). On a
CPU they run in fp32; on a GPU in fp16 (bf16) where spandrel says the architecture supports it, again in fp32 if
that gives NaNs.

spandrel without torchvision (``_spandrel_loader``): spandrel's package ``__init__`` imports every architecture it
knows, and two of them (LaMa: inpainting, RestoreFormer: face restoration; neither is an upscaler) import
torchvision, which a CPU-only torch often cannot have (the torchvision wheels at hand are CUDA builds). Where
``import spandrel`` fails, its own modules are imported without that ``__init__``: a package module with
spandrel's ``__path__`` goes into ``sys.modules``, and its ``main_registry`` is replaced by a registry of the same
architectures in the same order (``SPANDREL_ARCHITECTURES``) less those two. Where ``import spandrel`` works
(torch with its torchvision, e.g. CUDA machines) spandrel is used as it is.

Importing this module imports no torch and touches nothing.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, ModelError

log = logging.getLogger(__name__)

PLAIN_UPSCALERS = ("None", "Lanczos", "Nearest")
TILE = 384  # pixels of the input picture per tile (a 4x model makes 1536x1536 of it)
OVERLAP = 32  # pixels each tile shares with its neighbour, blended
MIN_TILE = 32  # out of memory below this: give up with a clear error
MAX_SCALE = 16
MODEL_PASSES = 3  # as A1111: a 2x model runs up to three times for 8x

# spandrel 0.4.2's MAIN_REGISTRY order (spandrel/__helpers/main_registry.py), less LaMa and RestoreFormer (they
# import torchvision; neither upscales). The order matters: the first architecture that recognises the weights wins.
SPANDREL_ARCHITECTURES = (
    "Compact", "SwiftSRGAN", "HAT", "GRL", "Swin2SR", "SwinIR", "GFPGAN", "OmniSR", "SCUNet", "FBCNN", "Uformer",
    "RGT", "DAT", "CRAFT", "KBNet", "DITN", "MMRealSR", "SPAN", "RealCUGAN", "SAFMN", "SAFMNBCIE", "DCTLSA",
    "FFTformer", "NAFNet", "ATD", "MixDehazeNet", "DRUNet", "DnCNN", "IPT", "DRCT", "ESRGAN", "PLKSR",
    "RetinexFormer", "HVICIDNet", "SeemoRe", "MoSR", "MoESR", "RCAN", "FDAT", "AuraSR",
)
NEEDS_TORCHVISION = ("LaMa", "RestoreFormer")


@dataclass(frozen=True)
class Upscaler:
    name: str
    path: Path | None = None  # None: a plain PIL filter

    @property
    def is_model(self) -> bool:
        return self.path is not None


# ---- the table ------------------------------------------------------------------------------------


def _store(settings):
    from ..models.store import ModelStore

    return ModelStore(settings)


def upscalers(settings) -> list[Upscaler]:
    """"None", "Lanczos", "Nearest", then the library's upscaler models (their names never shadow those three)."""
    plain = [Upscaler(name) for name in PLAIN_UPSCALERS]
    taken = {name.lower() for name in PLAIN_UPSCALERS}
    models = [Upscaler(e.name, e.path) for e in _store(settings).upscalers() if e.name.lower() not in taken]
    return plain + models


def available(settings) -> list[str]:
    """The upscaler names, in order: None, Lanczos, Nearest, then the library's models by file stem."""
    return [u.name for u in upscalers(settings)]


def find(name: str, settings) -> Upscaler:
    """The upscaler called ``name`` (exactly, then ignoring case; a model also by its file name), or
    ``InvalidRequest`` naming the choices."""
    table = upscalers(settings)
    wanted = name.strip() if isinstance(name, str) else None
    if wanted:
        for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
            for u in table:
                if same(wanted, u.name) or (u.path is not None and same(wanted, u.path.name)):
                    return u
    shown = name[:60] if isinstance(name, str) else name
    models = "" if any(u.is_model for u in table) else (
        f" (no upscaler models: put .pth / .safetensors files in {settings.models_dir / 'upscalers'})")
    raise InvalidRequest(f"unknown upscaler {shown!r}; choose one of: {', '.join(u.name for u in table)}{models}")


def hires_upscaler(name: str, settings) -> str:
    """The hires fix's upscaler ``name`` as the table spells it: a latent mode (``HIRES_LATENT_MODES``) or one of
    ``available``; else ``InvalidRequest`` naming every choice."""
    from ..request import HIRES_LATENT_MODES

    latent = {mode.lower(): mode for mode in HIRES_LATENT_MODES}
    if isinstance(name, str) and name.strip().lower() in latent:
        return latent[name.strip().lower()]
    try:
        return find(name, settings).name
    except InvalidRequest:
        shown = name[:60] if isinstance(name, str) else name
        raise InvalidRequest(f"unknown hires upscaler {shown!r}; choose one of: "
                             f"{', '.join([*HIRES_LATENT_MODES, *available(settings)])}") from None


def model_scale(upscaler: Upscaler, settings) -> int | None:
    """The model's own scale without loading it: remembered from its last load, else read from its name ("4x-",
    "_x2"), else None (plain filters: None)."""
    import re

    if upscaler.path is None:
        return None
    try:
        known = _store(settings).hashes.known(upscaler.path, "upscaler_scale")
    except OSError:
        known = None
    if known:
        return int(known)
    match = re.search(r"(?:^|[^a-z0-9])(?:x(\d)|(\d)x)(?:[^a-z0-9]|plus|$)", upscaler.name.lower())
    return int(match.group(1) or match.group(2)) if match else None


# ---- upscaling ------------------------------------------------------------------------------------


def upscale_with(name: str | Upscaler, image, scale: float, settings, *, device: str | None = None):
    """``image`` (PIL) made ``scale`` times larger with the upscaler ``name``: a model at its own scale, then
    Lanczos to exactly ``round(width * scale)`` x ``round(height * scale)``. A model runs on ``device``, by default
    the one ``settings`` names (auto: CUDA, MPS, CPU)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) \
            or not 0 < scale <= MAX_SCALE:
        raise InvalidRequest(f"the upscale factor must be a number above 0 and at most {MAX_SCALE}, got {scale!r}")
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    return upscale_to(name, image, width, height, settings, device=device)


def upscale_to(name: str | Upscaler, image, width: int, height: int, settings, *, device: str | None = None):
    """``image`` resized to exactly ``width`` x ``height`` with the upscaler ``name``, as A1111's
    ``images.resize_image`` (just resize) with it: the upscaler up to the larger of the two ratios, then Lanczos."""
    from PIL import Image

    if isinstance(name, Upscaler):
        upscaler = name
    else:
        upscaler = Upscaler(name) if name in PLAIN_UPSCALERS else find(name, settings)
    scale = max(width / image.width, height / image.height)
    if upscaler.is_model:
        image = _model_upscale(upscaler, image, width, height, scale, settings, device)
    elif upscaler.name in ("Lanczos", "Nearest") and scale > 1:
        resample = Image.Resampling.NEAREST if upscaler.name == "Nearest" else Image.Resampling.LANCZOS
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


def _model_upscale(upscaler: Upscaler, image, width: int, height: int, scale: float, settings, device):
    from PIL import Image

    model, device, dtype = load_model(upscaler.path, settings, device=device)
    for i in range(MODEL_PASSES):  # as A1111's Upscaler.upscale
        if image.width >= width and image.height >= height and (i > 0 or scale != 1):
            break
        mode = {1: "L", 4: "RGBA"}.get(model.input_channels, "RGB")
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") and mode != "RGBA" else None
        out = tensor_to_image(run_model(model, image_to_tensor(image.convert(mode)), device=device, dtype=dtype))
        if alpha is not None:  # the model sees the colours; the alpha channel is resized alongside
            out = out.convert("RGBA")
            out.putalpha(alpha.resize(out.size, Image.Resampling.LANCZOS))
        if out.size == image.size:
            image = out
            break
        image = out
    return image


def image_to_tensor(image):
    """A PIL picture as a (1, C, H, W) float32 tensor in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def tensor_to_image(tensor):
    from PIL import Image

    array = (tensor[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array[:, :, :4] if array.shape[2] >= 4
                           else array[:, :, :3])


def run_model(model, pixels, *, device: str = "cpu", dtype=None, tile: int = TILE, overlap: int = OVERLAP):
    """A spandrel image model over ``pixels`` ((1, C, H, W) in [0, 1], on the CPU), in blended tiles (whole, where
    spandrel says the architecture tiles itself or tiles badly, until memory runs out); out of memory: the tile
    halved and again. Returns the (1, C', H * scale, W * scale) float32 CPU result."""
    import torch

    dtype = dtype or torch.float32
    if getattr(getattr(model, "tiling", None), "name", "SUPPORTED") != "SUPPORTED":  # INTERNAL, DISCOURAGED
        tile = max(tile, *pixels.shape[-2:])

    def one_tile(piece):
        return model(piece.to(device, dtype)).float().cpu()

    out, _ = tiled(one_tile, pixels, model.scale, tile=tile, overlap=overlap)
    if dtype != torch.float32 and not torch.isfinite(out).all():  # fp16 overflowed: again in fp32
        log.info("the upscaler gave NaNs in %s; running it again in fp32", dtype)
        model.float()
        out, _ = tiled(lambda piece: model(piece.to(device, torch.float32)).cpu(), pixels, model.scale,
                       tile=tile, overlap=overlap)
        model.to(dtype)
    return out


def tiled(fn, pixels, scale: int, *, tile: int = TILE, overlap: int = OVERLAP):
    """(``fn`` over ``pixels`` in overlapping tiles, blended, the tile size that fitted). ``fn`` maps a
    (1, C, h, w) tile to (1, C', h * scale, w * scale). An out-of-memory error halves the tile and starts again."""
    from .memory import is_oom

    while True:
        try:
            return _tiled_once(fn, pixels, scale, tile, min(overlap, tile // 4)), tile
        except Exception as err:
            if not is_oom(err):
                raise
            _free_memory()
            if tile // 2 < MIN_TILE:
                raise ModelError(f"out of memory upscaling even in tiles of {tile} pixels; free some memory "
                                 "(close other programs, or use a smaller picture)") from err
            log.warning("out of memory upscaling in tiles of %d pixels; trying %d", tile, tile // 2)
            tile //= 2


def _split(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile size, where the tiles begin) along one side: ``tiles.spans`` with ``fit``, the fewest tiles of at most
    ``tile`` that share about ``overlap`` with their neighbours, evenly spread from one end to the other."""
    from .tiles import spans

    found = spans(length, tile, overlap, fit=True)
    return found[0][1] - found[0][0], [start for start, _ in found]


def _ramp(starts: list[int], i: int, size: int, scale: int):
    """One tile's blend weights along one side (output pixels). Over an overlap with a neighbour the weight goes
    from ~0 to 1 across the overlap's middle half: its outer quarter, where a tile's edge leaves the model short
    of context, is the neighbour's alone. Never 0, so the weights of a pixel always sum to something."""
    import torch

    def rising(n):
        return ((torch.arange(n) + 0.5 - n / 4) / (n / 2)).clamp(1e-3, 1)

    w = torch.ones(size * scale)
    if i > 0:
        n = (starts[i - 1] + size - starts[i]) * scale
        w[:n] = torch.minimum(w[:n], rising(n))
    if i + 1 < len(starts):
        n = (starts[i] + size - starts[i + 1]) * scale
        w[-n:] = torch.minimum(w[-n:], rising(n).flip(0))
    return w


def _tiled_once(fn, pixels, scale: int, tile: int, overlap: int):
    import torch

    _, _, h, w = pixels.shape
    (th, ys), (tw, xs) = _split(h, tile, overlap), _split(w, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(pixels)
    out = None
    weight = torch.zeros(1, 1, h * scale, w * scale)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            piece = fn(pixels[:, :, y:y + th, x:x + tw])
            if out is None:
                out = torch.zeros(1, piece.shape[1], h * scale, w * scale)
            mask = _ramp(ys, iy, th, scale)[:, None] * _ramp(xs, ix, tw, scale)[None, :]
            window = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[window] += piece * mask
            weight[window] += mask
    return out / weight


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- loading --------------------------------------------------------------------------------------

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # the one model kept loaded: {"key": ..., "model": ...}
_spandrel: dict[str, Any] = {}
_spandrel_lock = threading.Lock()


def load_model(path: Path, settings, *, device: str | None = None):
    """(spandrel ImageModelDescriptor on its device in eval mode, device, dtype) for an upscaler file; the last
    one is kept loaded."""
    import torch

    from .device import available_device

    device = device or settings.device
    device = str(device) if device != "auto" else available_device()
    st = path.stat()
    with _lock:
        cached = _loaded.get("model")
        if cached is not None and _loaded["key"][:3] == (str(path), st.st_size, st.st_mtime_ns) \
                and _loaded["key"][3] == device:
            return cached, device, _loaded["dtype"]
        _loaded.clear()
        descriptor = describe(read_weights(path), path.name)
        dtype = torch.float32
        if device != "cpu" and settings.precision != "fp32":
            if descriptor.supports_half and settings.precision in ("auto", "fp16"):
                dtype = torch.float16
            elif descriptor.supports_bfloat16 and device.startswith("cuda") and torch.cuda.is_bf16_supported():
                dtype = torch.bfloat16
        descriptor.to(device).to(dtype).eval()
        _loaded.update(key=(str(path), st.st_size, st.st_mtime_ns, device), model=descriptor, dtype=dtype)
    try:  # for listings (``model_scale``) without loading it again
        _store(settings).hashes.remembered(path, "upscaler_scale", lambda: descriptor.scale)
    except OSError:
        pass
    return descriptor, device, dtype


def read_weights(path: Path) -> dict:
    """The tensors of an upscaler file, as spandrel canonicalises them (``params_ema``, ``state_dict``, ... opened).
    A ``.pth`` is unpickled with ``weights_only=True``: a pickle that wants to run code is refused."""
    import pickle
    import zipfile

    import torch

    from ..models.load import _short, load_state_dict

    if path.suffix.lower() == ".safetensors":
        state = load_state_dict(path)
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ModelError(
                f"{path.name} contains code, not only weights, so it was not loaded; if you trust its source, "
                f"convert it once with: brushwork models convert '{path}' (the .safetensors is then used)") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
            raise ModelError(f"{path.name} is not a readable model file ({_short(err)}); it may be "
                             "truncated") from err
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} holds no weights (a {type(state).__name__}); it is not an upscaler model")
    return _spandrel_loader()["canonicalize"](state)


def describe(state: dict, label: str = "the model"):
    """spandrel's descriptor for these weights (architecture and its settings read from them)."""
    spandrel = _spandrel_loader()
    try:
        descriptor = spandrel["loader"].load_from_state_dict(state)
    except spandrel["unsupported"]:
        raise ModelError(f"{label} is not an upscaler model spandrel knows (its weights match none of its "
                         "architectures: ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, SPAN, ...)") from None
    except (KeyError, ValueError, RuntimeError, AssertionError, IndexError) as err:
        raise ModelError(f"{label} looks like an upscaler model but cannot be loaded ({str(err)[:160]})") from err
    if type(descriptor).__name__ != "ImageModelDescriptor":
        raise ModelError(f"{label} is a {descriptor.purpose} model ({descriptor.architecture.name}), not an upscaler")
    return descriptor


def _spandrel_loader() -> dict:
    """spandrel's ``ModelLoader`` (with its registry), ``canonicalize_state_dict`` and ``UnsupportedModelError``:
    the package's own, or (where its ``__init__`` cannot import torchvision) its modules without that ``__init__``."""
    with _spandrel_lock:
        if _spandrel:
            return _spandrel
        import importlib.util

        if importlib.util.find_spec("spandrel") is None:
            raise ModelError("upscaler models need spandrel: pip install --no-deps spandrel==0.4.2 einops "
                             "(or pip install 'brushwork[upscalers]' where torch has a torchvision)")
        try:
            import spandrel

            _spandrel.update(loader=spandrel.ModelLoader(), canonicalize=spandrel.canonicalize_state_dict,
                             unsupported=spandrel.UnsupportedModelError, registry=spandrel.MAIN_REGISTRY)
        except Exception as err:  # no torchvision, or a CUDA torchvision that cannot load with this torch
            log.info("spandrel's package cannot be imported (%s); loading its upscaler architectures alone", err)
            _spandrel.update(_spandrel_without_torchvision())
        return _spandrel


def _spandrel_without_torchvision() -> dict:
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("spandrel")
    package = importlib.util.module_from_spec(spec)  # spandrel's __path__, its __init__ not run
    sys.modules["spandrel"] = package
    registry = importlib.import_module("spandrel.__helpers.registry")
    main = registry.ArchRegistry()
    main.add(*[registry.ArchSupport.from_architecture(
        getattr(importlib.import_module(f"spandrel.architectures.{name}"), f"{name}Arch")())
        for name in SPANDREL_ARCHITECTURES])
    stand_in = types.ModuleType("spandrel.__helpers.main_registry")  # what loader.py imports its default from
    stand_in.MAIN_REGISTRY = main
    sys.modules[stand_in.__name__] = stand_in
    loader = importlib.import_module("spandrel.__helpers.loader")
    canonicalize = importlib.import_module("spandrel.__helpers.canonicalize").canonicalize_state_dict
    descriptors = importlib.import_module("spandrel.__helpers.model_descriptor")
    # what `import spandrel` offers, for any other code that imports it now
    for name, value in (("ModelLoader", loader.ModelLoader), ("MAIN_REGISTRY", main),
                        ("ArchRegistry", registry.ArchRegistry), ("ArchSupport", registry.ArchSupport),
                        ("UnsupportedModelError", registry.UnsupportedModelError),
                        ("canonicalize_state_dict", canonicalize),
                        ("ImageModelDescriptor", descriptors.ImageModelDescriptor)):
        setattr(package, name, value)
    return {"loader": loader.ModelLoader(registry=main), "canonicalize": canonicalize,
            "unsupported": registry.UnsupportedModelError, "registry": main}

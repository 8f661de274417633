"""ControlNet preprocessors (A1111's ControlNet extension's "modules"): a table, as the sampler table is.

Each row is one module the extension's API knows by name (``canny``, ``invert``, ...), with its UI label (the
extension's ``alias_names``), its sliders (``threshold_a`` / ``threshold_b``: label, range, default) and whether it
reads ``processor_res``. The built-in ones need no weights and follow the extension's code
(``scripts/preprocessor/model_free_preprocessors.py`` and the legacy ``processor.py``), with OpenCV as it uses it:

- ``canny``: ``cv2.Canny`` on the RGB picture, low / high 100 / 200, at ``processor_res`` (512);
- ``invert``: ``255 - image`` (white background, black lines -> what line models take);
- ``blur_gaussian``: ``cv2.GaussianBlur`` with sigma ``threshold_a`` (9);
- ``scribble_xdog``: difference of Gaussians (sigma 0.5 and 5), lines where ``2 * DoG > threshold_a`` (32);
- ``tile_resample``: downsampled by ``threshold_a`` (1 = as it is; INTER_AREA);
- ``none``: the picture as it is (a map made elsewhere).

Those at a resolution first scale the picture so its short side is ``processor_res`` and pad it to a multiple of
64 with its edge pixels (the extension's ``resize_image_with_pad``), then crop the pad off the result. The map is
then fitted to the generation size by the unit's resize mode (``fit``: the extension's ``detectmap_proc``) and,
with pixel perfect, ``processor_res`` is the generation size's (``pixel_perfect_resolution``).

The weighted ones (depth, openpose, ...) are listed so a request names them clearly: they need their annotator
weights (``missing``: one line on which file and where). These run when their file (lllyasviel/Annotators' name) is
in the library's ``annotators/`` folder (``annotator_file``; ``find(name, root)`` gives them runnable), each on the
picture at ``processor_res`` padded to 64 and cropped back, as the extension's ``annotator/*``:

- ``depth_midas``: MiDaS DPT-Hybrid (``dpt_hybrid-midas-501f0c75.pt``, converted as ``models/dpt.py`` converts SD 2
  depth's), ``x / 127.5 - 1`` in, the depth's ``(d - min) / (max - min) * 255`` out as a grey picture;
- ``softedge_hed`` / ``softedge_hedsafe``: ControlNetHED (``ControlNetHED.pth``), the soft edges (hedsafe: in 3 steps);
- ``lineart_realistic`` / ``lineart_coarse``: informative-drawings' Generator (``sk_model.pth`` / ``sk_model2.pth``),
  ``lineart_anime``: a UNet (``netG.pth``), their drawings inverted (white lines on black);
- ``openpose``: CMU's body pose net (``body_pose_model.pth``), its parts and limbs found and drawn in the standard
  colours on black.

The networks and their maths are in ``annotators.py``; each model is loaded once and kept (``annotator_model``: the
last one, fp32 on the CPU). The others are not built in. Importing this imports no torch, no numpy and no OpenCV
(they are imported when a map is made).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's ResizeMode, in its order
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill",
                  "Just Resize (Latent upscale)": "Just Resize",
                  # brushwork's short spellings (the command line's)
                  "resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
RESOLUTION_RANGE = (64, 2048)  # processor_res, as the extension's slider
DEFAULT_RESOLUTION = 512
ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators"
# the library's top folders (any case) its annotator files are found in, sub-folders included (the extension's
# annotator/downloads/<kind>/, ComfyUI's ckpts/lllyasviel/Annotators/ copied in)
ANNOTATOR_FOLDERS = ("annotators", "annotator")


@dataclass(frozen=True)
class Slider:
    label: str
    low: float
    high: float
    default: float
    step: float = 1.0

    def to_json(self) -> dict:
        return {"name": self.label, "value": self.default, "min": self.low, "max": self.high, "step": self.step}


@dataclass(frozen=True)
class Preprocessor:
    name: str  # the API's module name
    label: str  # the extension's UI name (/controlnet/module_list?alias_names=true)
    run: Callable | None = None  # (RGB uint8 HxWx3, resolution, a, b) -> uint8 map; None: needs weights
    resolution: bool = True  # reads processor_res
    slider_a: Slider | None = None
    slider_b: Slider | None = None
    aliases: tuple[str, ...] = ()
    needs: tuple[str, ...] = field(default=())  # annotator weight files (the weighted ones)
    weighted: Callable | None = None  # (the annotator file's path) -> run; None: not built in

    @property
    def model_free(self) -> bool:
        return self.run is not None and not self.needs

    def value(self, which: str, given: float | int | None):
        """The slider's value for a unit's ``threshold_a`` / ``threshold_b`` / ``processor_res``: given, or (-1,
        None) the extension's default; a slider the module does not have reads 0.5 (-1 for the resolution), as the
        extension writes them into the infotext."""
        if which == "processor_res":
            if not self.resolution:
                return -1 if given in (None, -1) else int(given)
            return DEFAULT_RESOLUTION if given in (None, -1) else int(given)
        slider = self.slider_a if which == "threshold_a" else self.slider_b
        if given is None or given == -1:
            return float(slider.default) if slider is not None else 0.5
        return float(given)

    def to_json(self) -> dict:
        """The extension's ``module_detail`` entry."""
        sliders = []
        if self.resolution:
            sliders.append({"name": "Resolution", "value": DEFAULT_RESOLUTION, "min": RESOLUTION_RANGE[0],
                            "max": RESOLUTION_RANGE[1], "step": 8})
        sliders += [s.to_json() for s in (self.slider_a, self.slider_b) if s is not None]
        return {"model_free": self.model_free, "sliders": sliders}


# ---- the built-in ones --------------------------------------------------------------------------------------------


def hwc3(image):
    """An RGB uint8 array of a PIL picture; transparency is laid over white (the extension's HWC3)."""
    import numpy as np
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _pad64(x: int) -> int:
    import math

    return int(math.ceil(float(x) / 64.0) * 64 - x)


def resize_with_pad(img, resolution: int):
    """(the picture scaled so its short side is ``resolution``, padded with its edge pixels to multiples of 64;
    a function that crops that padding off a result): the extension's ``resize_image_with_pad``."""
    import cv2
    import numpy as np

    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    img = cv2.resize(img, (w_target, h_target), interpolation=interpolation)
    padded = np.pad(img, [[0, _pad64(h_target)], [0, _pad64(w_target)], [0, 0]], mode="edge")

    def remove_pad(x):
        return np.ascontiguousarray(x[:h_target, :w_target, ...].copy())

    return np.ascontiguousarray(padded), remove_pad


def _canny(img, res, a, b):
    import cv2

    img, remove_pad = resize_with_pad(img, res)
    return remove_pad(cv2.cvtColor(cv2.Canny(img, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def _invert(img, res, a, b):
    return 255 - img


def _blur(img, res, a, b):
    import cv2

    img, remove_pad = resize_with_pad(img, res)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(a))


def _xdog(img, res, a, b):
    import cv2
    import numpy as np

    img, remove_pad = resize_with_pad(img, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return remove_pad(result)


def _tile_resample(img, res, a, b):
    import cv2

    if a < 1.1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (int(float(w) / float(a)), int(float(h) / float(a))), interpolation=cv2.INTER_AREA)


def _weighted(name: str, label: str, *files: str, aliases: tuple[str, ...] = (), **kw) -> Preprocessor:
    return Preprocessor(name, label, None, aliases=aliases, needs=files, **kw)


# ---- the weighted ones that run when their file is there ---------------------------------------------------------

_MIDAS_TOKEN = "pretrained.model.cls_token"
_models: dict[str, tuple[tuple, object]] = {}  # annotator path -> (size and time, model): the last one loaded
_models_lock = threading.Lock()


def annotator_model(path: Path, build: Callable[[dict], object], what: str):
    """The model ``build`` makes of an annotator file's tensors (fp32, CPU, eval), loaded once: the last one loaded is
    kept (until its file changes). A file whose tensors are not ``what`` is a one-line error naming the file."""
    from ..errors import ModelError
    from ..models.load import load_state_dict

    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    with _models_lock:
        cached = _models.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        sd = load_state_dict(path)
        try:
            model = build(sd)
        except (KeyError, RuntimeError, ValueError, IndexError) as err:  # a missing key, a strict load's mismatch
            short = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelError(f"{path.name} is not {what} ({short}); get {path.name} from {ANNOTATORS_URL}") from err
        model = model.float().eval()
        _models.clear()  # one annotator model kept at a time
        _models[str(path)] = (stamp, model)
        return model


def midas_model(path: Path):
    """The MiDaS DPT-Hybrid of an annotator file (transformers' DPTForDepthEstimation, fp32, CPU), loaded once. The
    extension's file has MiDaS's own names (``pretrained.*``, ``scratch.*``) without a prefix; a prefix before them
    (``model.``, SD 2 depth's ``depth_model.model.``) is read from where the ViT's class token is."""
    from ..errors import ModelError
    from ..models import dpt

    def build(sd):
        prefix = next((k[: -len(_MIDAS_TOKEN)] for k in sd if k.endswith(_MIDAS_TOKEN)), None)
        if prefix is None:
            raise ModelError(f"{path.name} is not a MiDaS DPT-Hybrid ({_MIDAS_TOKEN} not found); get "
                             f"dpt_hybrid-midas-501f0c75.pt from {ANNOTATORS_URL}")
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        return dpt.build(sd, dpt.config_from_shapes(shapes, prefix), prefix)

    return annotator_model(path, build, "a MiDaS DPT-Hybrid")


def _depth_midas(path: Path) -> Callable:
    def run(img, res, a, b):
        import numpy as np
        import torch

        from .tasks.depth2img import predict_depth

        img, remove_pad = resize_with_pad(img, res)
        model = midas_model(path)
        x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 127.5 - 1.0
        with torch.inference_mode():
            depth = predict_depth(model, x)[0].float()
        depth = depth - depth.min()
        top = float(depth.max())
        depth = depth / top if top > 0 else depth  # a flat depth: black, not NaN
        grey = (depth.numpy() * 255.0).clip(0, 255).astype(np.uint8)
        return remove_pad(np.stack([grey] * 3, axis=2))

    return run


def _softedge_hed(safe: bool) -> Callable:
    def weighted(path: Path) -> Callable:
        def run(img, res, a, b):
            import numpy as np

            from . import annotators

            img, remove_pad = resize_with_pad(img, res)
            model = annotator_model(path, annotators.build_hed, "lllyasviel's ControlNetHED")
            return remove_pad(np.stack([annotators.hed_edges(model, img, safe)] * 3, axis=2))

        return run

    return weighted


def _lineart(path: Path) -> Callable:
    def run(img, res, a, b):
        import numpy as np

        from . import annotators

        img, remove_pad = resize_with_pad(img, res)
        model = annotator_model(path, annotators.build_lineart, "an informative-drawings lineart Generator")
        return remove_pad(np.stack([255 - annotators.lineart(model, img)] * 3, axis=2))  # white lines on black

    return run


def _lineart_anime(path: Path) -> Callable:
    def run(img, res, a, b):
        import numpy as np

        from . import annotators

        img, remove_pad = resize_with_pad(img, res)
        model = annotator_model(path, annotators.build_unet, "the lineart_anime UNet generator")
        return remove_pad(np.stack([255 - annotators.lineart_anime(model, img)] * 3, axis=2))

    return run


def _openpose(path: Path) -> Callable:
    def run(img, res, a, b):
        from . import annotators

        img, remove_pad = resize_with_pad(img, res)
        model = annotator_model(path, annotators.build_body_pose, "the OpenPose body pose net")
        people = annotators.body_people(*annotators.body_pose_maps(model, img))
        return remove_pad(annotators.draw_bodies(people, *img.shape[:2]))

    return run


PREPROCESSORS: tuple[Preprocessor, ...] = (
    Preprocessor("none", "none", lambda img, res, a, b: img, resolution=False),
    Preprocessor("canny", "canny", _canny, slider_a=Slider("Canny Low Threshold", 1, 255, 100),
                 slider_b=Slider("Canny High Threshold", 1, 255, 200)),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, resolution=False),
    # the extension's current row says sigma 64-2048, default 512 (its slider copied from the resolution's); its
    # legacy row, which people's settings come from, 0.01-64, default 9
    Preprocessor("blur_gaussian", "blur_gaussian", _blur, slider_a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01),
                 aliases=("blur",)),
    Preprocessor("scribble_xdog", "scribble_xdog", _xdog, slider_a=Slider("XDoG Threshold", 1, 64, 32),
                 aliases=("xdog",)),
    Preprocessor("tile_resample", "tile_resample", _tile_resample, resolution=False,
                 slider_a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01), aliases=("tile",)),
    _weighted("depth_midas", "depth_midas", "dpt_hybrid-midas-501f0c75.pt", aliases=("depth",),
              weighted=_depth_midas),
    _weighted("depth_zoe", "depth_zoe", "ZoeD_M12_N.pt"),
    _weighted("normal_bae", "normal_bae", "scannet.pt"),
    _weighted("openpose", "openpose", "body_pose_model.pth", weighted=_openpose),
    _weighted("openpose_full", "openpose_full", "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    _weighted("dw_openpose_full", "dw_openpose_full", "yolox_l.onnx", "dw-ll_ucoco_384.onnx"),
    _weighted("softedge_hed", "softedge_hed", "ControlNetHED.pth", aliases=("hed",), weighted=_softedge_hed(False)),
    _weighted("softedge_hedsafe", "softedge_hedsafe", "ControlNetHED.pth", aliases=("hed_safe",),
              weighted=_softedge_hed(True)),
    _weighted("softedge_pidinet", "softedge_pidinet", "table5_pidinet.pth", aliases=("pidinet",)),
    _weighted("lineart_realistic", "lineart_realistic", "sk_model.pth", aliases=("lineart",), weighted=_lineart),
    _weighted("lineart_coarse", "lineart_coarse", "sk_model2.pth", weighted=_lineart),
    _weighted("lineart_anime", "lineart_anime", "netG.pth", weighted=_lineart_anime),
    _weighted("mlsd", "mlsd", "mlsd_large_512_fp32.pth"),
)

BY_NAME: dict[str, Preprocessor] = {}
for _p in PREPROCESSORS:
    for _key in (_p.name, _p.label, *_p.aliases):
        BY_NAME.setdefault(_key.lower(), _p)


def find(name, root=None) -> Preprocessor:
    """The module ``name`` names (its API name, UI label or an alias, any case); an unknown one is an error listing
    the choices. ``root``: the model library; a weighted module whose file is in its annotators/ folder comes back
    runnable (``run`` set), else as the table has it (``run`` None: ``missing`` says what to get)."""
    if not isinstance(name, str) or not name.strip():
        name = "none" if name in (None, "") else name
    found = BY_NAME.get(str(name).strip().lower())
    if found is None:
        raise InvalidRequest(f"unknown ControlNet preprocessor (module) {str(name)[:60]!r}; choose one of: "
                             f"{', '.join(p.name for p in PREPROCESSORS)}")
    if found.run is None and found.weighted is not None and (path := annotator_file(found, root)) is not None:
        return dataclasses.replace(found, run=found.weighted(path))
    return found


def annotator_file(p: Preprocessor, root) -> Path | None:
    """The module's (first) annotator file in the library ``root``'s annotators/ folder, sub-folders included."""
    if root is None or not p.needs or not Path(root).is_dir():
        return None
    for folder in sorted(f for f in Path(root).iterdir() if f.is_dir() and f.name.lower() in ANNOTATOR_FOLDERS):
        for path in sorted(folder.rglob(p.needs[0])):
            if path.is_file():
                return path
    return None


def missing(p: Preprocessor, root=None) -> str:
    """One line for a weighted module: which file it needs, from where, and what to do instead."""
    files = ", ".join(p.needs)
    if p.weighted is not None:
        where = Path(root) / "annotators" if root is not None else "the model library's annotators/ folder"
        return (f"the ControlNet preprocessor {p.name} needs model weights ({files}, from {ANNOTATORS_URL}): put "
                f"it in {where}, or make the {p.name.split('_')[0]} map with another tool and send it with module "
                "none")
    return (f"the ControlNet preprocessor {p.name} needs model weights ({files}, from {ANNOTATORS_URL}) and is not "
            f"built into this version; make the {p.name.split('_')[0]} map with another tool (A1111's "
            "/controlnet/detect, ComfyUI's controlnet_aux) and send it with module none, or use one of: "
            f"{', '.join(q.name for q in PREPROCESSORS if q.model_free)}")


def check_value(p: Preprocessor, which: str, value, unit: str) -> None:
    """``threshold_a`` / ``threshold_b`` / ``processor_res`` against the module's slider; -1 is its default."""
    import math

    if value is None or value == -1:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{unit}: {which} must be a number (-1 = the preprocessor's default), got {value!r}")
    if which == "processor_res":
        low, high = RESOLUTION_RANGE
        if int(value) != value or not low <= value <= high:
            raise InvalidRequest(f"{unit}: processor_res must be a whole number from {low} to {high} (-1 = "
                                 f"{DEFAULT_RESOLUTION}), got {value!r}")
        return
    slider = p.slider_a if which == "threshold_a" else p.slider_b
    if slider is not None and not slider.low <= value <= slider.high:
        raise InvalidRequest(f"{unit}: {which} ({slider.label} of {p.name}) must be from {slider.low:g} to "
                             f"{slider.high:g} (-1 = {slider.default:g}), got {value!r}")


# ---- fitting a map to the generation size ---------------------------------------------------------------------


def pixel_perfect_resolution(img, height: int, width: int, resize_mode: str) -> int:
    """The preprocessor resolution whose map needs no resizing for this size (the extension's)."""
    import numpy as np

    raw_h, raw_w = img.shape[:2]
    k0, k1 = float(height) / float(raw_h), float(width) / float(raw_w)
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


def quality_resize(x, size: tuple[int, int]):
    """A map resized to ``size`` (w, h) as the extension's ``high_quality_resize`` picks the filter: nearest for maps
    of few colours (segmentation), area when shrinking, cubic when growing; a black-and-white map (edges,
    scribbles) is made black and white again (Otsu's threshold on its mean). The extension also thins one-pixel
    edges after that (its lvmin_thin); not done here: with pixel perfect no map is resized."""
    import cv2
    import numpy as np

    w, h = size
    if x.shape[0] == h and x.shape[1] == w:
        return x
    smaller = w * h < x.shape[0] * x.shape[1]
    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    # black and white (the extension asks only min < 16 and max > 240; a grey map is asked for too, so that a map of
    # two colours, red and blue, is not made black and white)
    grey = bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())
    binary = colours == 2 and grey and int(x.min()) < 16 and int(x.max()) > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (w, h), interpolation=interpolation)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([grey] * 3, axis=2)
    return y


def fit(detected, width: int, height: int, resize_mode: str):
    """A map at the generation size by the unit's resize mode (the extension's ``detectmap_proc``): "Just Resize"
    stretches it; "Crop and Resize" scales it to cover the size and crops the middle; "Resize and Fill" scales it to
    fit inside and fills the rest with the median colour of its border."""
    import numpy as np

    if resize_mode == "Just Resize":
        return quality_resize(detected, (width, height))
    old_h, old_w = float(detected.shape[0]), float(detected.shape[1])
    k0, k1 = float(height) / old_h, float(width) / old_w
    if resize_mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([detected[0, :, :], detected[-1, :, :], detected[:, 0, :], detected[:, -1, :]])
        colour = np.median(borders, axis=0).astype(detected.dtype)
        out = np.tile(colour[None, None], [height, width, 1])
        small = quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        new_h, new_w = small.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        out[top:top + new_h, left:left + new_w] = small
        return out
    k = max(k0, k1)
    big = quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w = big.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(big[top:top + height, left:left + width])


def detect(p: Preprocessor, image, resolution: int = -1, threshold_a: float = -1, threshold_b: float = -1):
    """The module's map of a PIL picture (uint8 RGB array), at its own size (before ``fit``)."""
    if p.run is None:
        raise InvalidRequest(missing(p))
    img = hwc3(image)
    res = p.value("processor_res", resolution)
    out = p.run(img, res, p.value("threshold_a", threshold_a), p.value("threshold_b", threshold_b))
    if out.ndim == 2:
        import numpy as np

        out = np.stack([out] * 3, axis=2)
    return out


def control_map(unit, image, width: int, height: int, root=None):
    """The PIL map a unit gives the ControlNet at width x height: its module on ``image`` (pixel perfect: at the
    resolution that needs no resizing), fitted by its resize mode. ``root``: the library (its annotator files)."""
    from PIL import Image

    p = find(unit.module, root)
    resolution = unit.processor_res
    if unit.pixel_perfect and p.resolution:
        resolution = pixel_perfect_resolution(hwc3(image), height, width, unit.resize_mode)
    detected = detect(p, image, resolution, unit.threshold_a, unit.threshold_b)
    return Image.fromarray(fit(detected, width, height, unit.resize_mode))

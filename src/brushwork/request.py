"""The one request type every front end builds, and the one result type every front end reads.

The CLI, the Python API, the HTTP APIs and the web UI all translate to ``GenerationRequest``
and from ``GenerationResult``; none of them touches tensors. ``validate()`` is the single place
where user input is checked, so every front end reports the same clear errors.

These types import no torch: images are PIL images, and ``to_dict()``/``from_dict()`` give a
JSON-safe form (images as base64 PNG) for the job store.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image


from .errors import BrushworkError, Cancelled, InvalidRequest, ModelError  # noqa: F401 (re-exported)


class Mode(str, enum.Enum):
    """What a request asks for. Each mode is one pipeline in ``engine.run``."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    DEPTH2IMG = "depth2img"
    UPSCALE = "upscale"


class Precision(str, enum.Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


MAX_SIDE = 4096  # pixels; larger sides are refused before any memory is touched
MAX_BATCH = 64
MAX_STEPS = 1000
DEFAULT_STEPS = 20  # where neither the request nor the model (nor its sampler) says
DEFAULT_SAMPLER = "Euler a"
FALLBACK_FIELDS = ("sampler", "steps", "cfg_scale", "width", "height")  # what GenerationRequest.fallbacks may fill
MAX_IMAGES = 1000  # batch size x batches, per request
MAX_BATCH_PIXELS = 64 * 1024 * 1024  # width x height x batch size: 64 at 1024x1024, 4 at 4096x4096
# Prompts shared online run to a few thousand tokens; 64 KiB is over 10k tokens of such text, and bounds what
# one request can make the text encoder do (a 1 MB prompt took a minute and 5 GB before this limit).
MAX_PROMPT_CHARS = 64 * 1024
MAX_FAST_INTERVAL = 100
MAX_NOISE_LEVEL = 350  # the SD x4 upscaler's max_noise_level (its low-res noise schedule's trained range)
UPSCALE_FACTOR = 4  # the SD x4 upscaler: the output is the input times this


MAX_TOKEN_MERGING_RATIO = 0.9  # beyond this almost every token of the self-attention is merged away
# A1111's "Emphasis" option: Original (weights scale the embeddings, then each chunk's mean is restored), No norm
# (only scaled), Ignore (brackets are read, weights not applied), None (brackets and BREAK are plain text)
EMPHASIS_CHOICES = ("None", "Ignore", "Original", "No norm")
MAX_COMMA_PADDING_BACKTRACK = 74  # A1111's slider: a full 75-token chunk may end at a comma up to 74 tokens back
# A1111's "Masked content" choices for inpainting, in brushwork's spelling (A1111's API numbers them 0 fill,
# 1 original, 2 latent noise, 3 latent nothing)
INPAINTING_FILLS = ("original", "fill", "latent noise", "latent nothing")
# The hires fix's upscalers, as A1111 names them: the latent ones interpolate the latents
# (torch.nn.functional.interpolate: mode, antialias), the others resize the decoded picture (PIL). The upscaler
# models of the library (engine/upscalers.py: ESRGAN, ...) are taken too, checked against it when the run prepares
HIRES_LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_IMAGE_UPSCALERS = ("Lanczos", "Nearest")
HIRES_UPSCALERS = (*HIRES_LATENT_MODES, *HIRES_IMAGE_UPSCALERS)


IMAGE_FIELDS = ("init_image", "mask_image", "depth_map")  # the request's pictures (base64 PNG in its JSON form)
# ControlNet (engine/controlnet.py): A1111's ControlNet extension's control modes and resize modes, in its order (its
# API also takes them as 0, 1, 2), and how many units one request may have (the extension's setting goes to 10)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_MODE_ALIASES = {"prompt": CONTROL_MODES[1], "controlnet": CONTROL_MODES[2]}  # brushwork's short spellings
MAX_CONTROL_UNITS = 10
MAX_CONTROL_WEIGHT = 2.0  # the extension's weight slider (0-2)


def limits(low: float, high: float, label: str, *, whole: bool = False, hint: str = "") -> dict[str, Any]:
    """Field metadata: the range ``validate()`` holds a number to (``whole``: an integer), and how errors name it."""
    return {"range": (low, high), "label": label, "whole": whole, "hint": hint}


@dataclass
class ControlUnit:
    """One ControlNet unit, as A1111's ControlNet extension's: a ControlNet model of the library's controlnet/ folder
    (by name or "name [hash]"), the picture it follows (None: img2img's init image), the preprocessor (``module``:
    engine/preprocessors.py) and how strongly and when it acts. ``-1`` for processor_res / threshold_a / threshold_b
    is the preprocessor's default (canny: 512, 100, 200)."""

    model: str = ""
    image: Image | None = None
    module: str = "none"
    weight: float = field(default=1.0, metadata=limits(0, MAX_CONTROL_WEIGHT, "ControlNet weight"))
    guidance_start: float = field(default=0.0, metadata=limits(0, 1, "ControlNet guidance start"))
    guidance_end: float = field(default=1.0, metadata=limits(0, 1, "ControlNet guidance end"))
    control_mode: str = "Balanced"  # CONTROL_MODES
    resize_mode: str = "Crop and Resize"  # engine.preprocessors.RESIZE_MODES
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    pixel_perfect: bool = False  # processor_res from the picture's and the generation's sizes
    mask: Image | None = None  # the extension's unit mask: read by inpainting preprocessors, which are not built in

    def validate(self, index: int = 0) -> ControlUnit:
        """Check the unit and put its names in the extension's spelling; InvalidRequest names the unit."""
        from .engine import preprocessors

        unit = f"ControlNet unit {index}"
        if not isinstance(self.model, str) or not self.model.strip() or self.model.strip() == "None":
            raise InvalidRequest(f"{unit} names no ControlNet model; give one of the library's controlnet/ folder "
                                 "(GET /controlnet/model_list, brushwork models list)")
        _check_text(f"{unit} model", self.model, 4096)
        self.model = self.model.strip()
        for f in dataclasses.fields(self):
            if "range" in f.metadata:
                _check_number(getattr(self, f.name), f.metadata)
        if self.guidance_start > self.guidance_end:
            raise InvalidRequest(f"{unit}: guidance start {self.guidance_start:g} is after guidance end "
                                 f"{self.guidance_end:g}; the start must be at most the end")
        self.control_mode = _choice(self.control_mode, CONTROL_MODES, CONTROL_MODE_ALIASES, f"{unit} control mode")
        self.resize_mode = _choice(self.resize_mode, preprocessors.RESIZE_MODES, preprocessors.RESIZE_ALIASES,
                                   f"{unit} resize mode", extra_ints={3: "Just Resize"})
        found = preprocessors.find(self.module)
        self.module = found.name
        for name in ("processor_res", "threshold_a", "threshold_b"):
            preprocessors.check_value(found, name, getattr(self, name), unit)
        if isinstance(self.processor_res, float):
            self.processor_res = int(self.processor_res)
        if not isinstance(self.pixel_perfect, bool):
            raise InvalidRequest(f"{unit}: pixel_perfect must be true or false, got {self.pixel_perfect!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, image=None, mask=None))
        out["image"] = image_to_b64(self.image) if self.image is not None else None
        out["mask"] = image_to_b64(self.mask) if self.mask is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlUnit:
        if isinstance(data, ControlUnit):
            return data
        if not isinstance(data, dict):
            raise InvalidRequest(f"a ControlNet unit must be an object of its fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidRequest(f"unknown ControlNet unit field {unknown[0]!r}; the fields are: {', '.join(names)}")
        kwargs = dict(data)
        for key in ("image", "mask"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = image_from_b64(kwargs[key])
        return cls(**kwargs)


def _choice(value: Any, choices: tuple[str, ...], aliases: dict[str, str], label: str,
            extra_ints: dict[int, str] | None = None) -> str:
    """One of ``choices`` from its name (any case, or an alias) or its index, as the ControlNet extension's API."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return choices[value]
        if extra_ints and value in extra_ints:
            return extra_ints[value]
    elif isinstance(value, str):
        wanted = value.strip().lower()
        for name in choices:
            if name.lower() == wanted:
                return name
        for alias, name in aliases.items():
            if alias.lower() == wanted:
                return name
    numbered = ", ".join(f"{i} {name}" for i, name in enumerate(choices))
    raise InvalidRequest(f"unknown {label} {str(value)[:60]!r}; choose one of: {numbered}")


@dataclass
class GenerationRequest:
    """Everything needed to make (and remake) a set of images.

    ``width``/``height`` of ``None`` mean the model's native size (img2img: the init image's
    size rounded to 8). ``seed`` of ``-1`` means random; the seed used is in the result.
    """

    prompt: str = ""
    negative_prompt: str = ""
    mode: Mode = Mode.TXT2IMG
    model: str | None = None
    vae: str | None = None
    # None: the model's recommendation (an LCM model: LCM), else DEFAULT_SAMPLER
    sampler: str | None = None
    scheduler: str = "Automatic"  # A1111's Automatic: the sampler's own, or the model's (a Turbo model: SGM Uniform)
    # None: the model's recommendation (SD-Turbo: 1, LCM: 4), else the sampler's (LCM: 4), else DEFAULT_STEPS
    steps: int | None = field(default=None, metadata=limits(1, MAX_STEPS, "steps", whole=True))
    cfg_scale: float | None = field(default=None, metadata=limits(0, 100, "CFG scale"))  # None: the model's, else 7
    # The fraction of the steps that use CFG; the rest (the last, least noisy ones) follow the prompt alone,
    # as CFG 1 (SD.Next's "CFG end"). None: the model's recommendation, else 1 (every step).
    cfg_end: float | None = None
    seed: int = -1
    # multiples of 8 up to MAX_SIDE; validate() says which multiples are nearest
    width: int | None = field(default=None, metadata={"schema": {"minimum": 8, "maximum": MAX_SIDE, "multipleOf": 8}})
    height: int | None = field(default=None, metadata={"schema": {"minimum": 8, "maximum": MAX_SIDE, "multipleOf": 8}})
    batch_size: int = field(default=1, metadata=limits(1, MAX_BATCH, "batch size", whole=True))
    n_iter: int = field(default=1, metadata=limits(1, MAX_IMAGES, "n_iter (batches)", whole=True))
    eta: float = field(default=0.0, metadata=limits(0, 1, "eta"))
    clip_skip: int = field(default=1, metadata=limits(1, 12, "clip skip", whole=True))
    # A1111's ToMe option: 0 = off; 0.5 merges half the tokens (faster, softer)
    token_merging_ratio: float = field(default=0.0, metadata=limits(0, MAX_TOKEN_MERGING_RATIO, "token merging ratio",
                                                                    hint="; 0 is off, 0.3-0.5 is usual"))
    # A1111's prompt options: how (word:1.5) weights apply (EMPHASIS_CHOICES), and how many tokens back from the
    # end of a full 75-token chunk a comma may be for the words after it to move to the next chunk (0 = off)
    emphasis: str = field(default="Original", metadata={"schema": {"enum": list(EMPHASIS_CHOICES)}})
    comma_padding_backtrack: int = field(default=20, metadata=limits(0, MAX_COMMA_PADDING_BACKTRACK,
                                                                     "comma padding backtrack", whole=True,
                                                                     hint="; 0 is off, 20 is A1111's default"))
    # img2img / inpaint / depth2img / upscale
    init_image: Image | None = None
    strength: float = field(default=0.75, metadata=limits(0, 1, "strength"))
    mask_image: Image | None = None
    mask_blur: int = field(default=4, metadata=limits(0, 64, "mask blur", whole=True))
    # inpaint: what the masked area starts from (A1111's "Masked content", INPAINTING_FILLS): the original
    # pixels, the surrounding colours ("fill"), fresh latent noise, or zero latents
    inpainting_fill: str = field(default="original", metadata={"schema": {"enum": list(INPAINTING_FILLS)}})
    # inpaint: A1111's "Only masked": repaint the mask's bounding box (plus padding, grown to the output's aspect
    # ratio) at the full requested size, then scale it back and paste it into the picture
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = field(default=32, metadata=limits(0, 256, "masked area padding", whole=True))
    # inpaint: repaint what the mask leaves black instead (A1111's "Inpaint not masked")
    inpainting_mask_invert: bool = False
    # depth2img (SD 2 depth): a depth map to use instead of the model's estimate of the init image (grayscale,
    # white = near, any size; a 16-bit or float PIL picture given in Python keeps its precision, files are read as
    # 8-bit), and whether to write the depth map used beside the pictures (<picture>-depth.png, at the latent size)
    depth_map: Image | None = None
    save_depth: bool = False
    # upscale (the SD x4 upscaler): the noise added to the low-res picture before the model sees it (diffusers'
    # noise_level; more invents more detail and keeps less of the input)
    noise_level: int = field(default=20, metadata=limits(0, MAX_NOISE_LEVEL, "noise level", whole=True,
                                                         hint="; 20 is the model's default"))
    # upscale: a larger input runs in overlapping tiles of this many low-res (= latent) pixels, blended, so memory
    # is bounded by the tile; an input no larger than the tile runs whole. A multiple of 8; overlap <= tile / 2
    tile_size: int = field(default=128, metadata=limits(32, MAX_SIDE, "tile size", whole=True,
                                                        hint="; a multiple of 8, 128 is the default"))
    tile_overlap: int = field(default=32, metadata=limits(0, MAX_SIDE // 2, "tile overlap", whole=True,
                                                          hint="; at most half the tile size"))
    # txt2img hires fix (A1111's "Hires. fix"): a first pass at width x height, the result upscaled
    # (HIRES_UPSCALERS: in latent space, or decoded and resized), then an img2img pass at the target size.
    # On when a scale other than 1, or a resize, is given. A1111's hr_scale: the target is width x height
    # times this, rounded down to a multiple of 8
    hires_scale: float | None = field(default=None, metadata=limits(1, 8, "hires scale", hint="; 2 doubles the size"))
    # A1111's hr_resize_x/y: the target size instead of the scale; 0 = from the other side and the first pass's
    # aspect ratio; both: scaled to cover it and centre-cropped, as A1111
    hires_resize_x: int = field(default=0, metadata=limits(0, MAX_SIDE, "hires resize x", whole=True))
    hires_resize_y: int = field(default=0, metadata=limits(0, MAX_SIDE, "hires resize y", whole=True))
    hires_upscaler: str = "Latent"  # HIRES_UPSCALERS, or an upscaler model of the library (engine.upscalers)
    # A1111's hr_second_pass_steps: exactly this many steps run in the second pass; 0 = the same as steps
    hires_steps: int = field(default=0, metadata=limits(0, MAX_STEPS, "hires steps", whole=True,
                                                        hint="; 0 is the same as steps"))
    # A1111's denoising strength for the second pass (0 = the upscaled picture, not denoised again)
    hires_strength: float = field(default=0.7, metadata=limits(0, 1, "hires strength"))
    hires_sampler: str | None = None  # the second pass's sampler; None = the first pass's (A1111's hr_sampler_name)
    hires_scheduler: str | None = None  # the second pass's schedule type; None = the first pass's (hr_scheduler)
    hires_prompt: str = ""  # empty = the first pass's prompt (A1111's hr_prompt)
    hires_negative_prompt: str = ""  # empty = the first pass's negative prompt
    # A1111's hr_checkpoint_name ("Hires checkpoint"): the second pass runs on this model of the library (its UNet,
    # text encoders and VAE), kept loaded beside the model; it must share the model's latent space (SD 1.x/2.x or
    # SDXL). None = the model ("Use same checkpoint")
    hires_checkpoint: str | None = None
    # SDXL's refiner (A1111's refiner_checkpoint / refiner_switch_at): the model runs the first refiner_switch_at
    # of the steps, the refiner the rest on the same schedule; None = no refiner
    refiner: str | None = None
    refiner_switch_at: float = field(default=0.8, metadata=limits(0, 1, "refiner switch at",
                                                                  hint="; 0.8 hands the last fifth to the refiner"))
    # model interpretation and placement
    prediction: str | None = None  # "eps" | "v" | None (detect)
    device: str = "auto"
    precision: Precision = Precision.AUTO
    memory: str = "auto"
    # output
    watermark: bool = True
    # fast mode (DeepCache): the UNet's deep features are computed in full every N-th step and reused between;
    # 0 = off, true = 3 (the CLI's --fast)
    fast: int = field(default=0, metadata=limits(0, MAX_FAST_INTERVAL, "fast mode interval", whole=True,
                                                 hint="; 0 is off, 3 is --fast"))
    # a few-step Turbo model (SD-Turbo, SDXL-Turbo; models/fewstep.py): its defaults (1 step, CFG 1, SGM Uniform,
    # 512) fill what the request leaves open. None: as the model file says (its metadata, a known file's hash)
    turbo: bool | None = None
    config: str | None = None  # the model's original .yaml (--config; tells SD 2.x v from eps); never over HTTP
    # ControlNet units (ControlUnit; txt2img, img2img, inpaint): each one's model guides the UNet with its map of its
    # picture; several add up (engine/controlnet.py, docs/controlnet.md)
    controlnet: list[ControlUnit] = field(default_factory=list)
    # what fills a field left open (None) where the model recommends nothing, instead of the usual defaults
    # (FALLBACK_FIELDS): the A1111 API's own for the fields its client left out (steps 50, CFG 7, Euler, 512x512),
    # so an ordinary model gets what A1111 gives and a few-step one its own (engine.run.model_defaults)
    fallbacks: dict[str, Any] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def hires_enabled(self) -> bool:
        """txt2img with the hires fix: a scale other than 1 (None is off), or a resize size."""
        scaled = self.hires_scale is not None and self.hires_scale != 1
        return self.mode is Mode.TXT2IMG and bool(scaled or self.hires_resize_x or self.hires_resize_y)

    def hires_sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The hires fix's (upscaled size, output size) for a first pass at ``width`` x ``height``, in pixels,
        each rounded down to a multiple of 8 (A1111 sizes the latents target // 8). They differ only when both
        resize sides are given: the picture is scaled to cover that size, then centre-cropped to it, as A1111."""
        rx, ry = self.hires_resize_x, self.hires_resize_y
        if not rx and not ry:
            scale = 1.0 if self.hires_scale is None else float(self.hires_scale)
            up = out = (int(width * scale), int(height * scale))
        elif not ry:
            up = out = (rx, rx * height // width)
        elif not rx:
            up = out = (ry * width // height, ry)
        else:
            up = (rx, rx * height // width) if width / height < rx / ry else (ry * width // height, ry)
            out = (rx, ry)

        def eight(size):
            return tuple(max(8, v - v % 8) for v in size)

        return eight(up), eight(out)

    def validate(self) -> GenerationRequest:
        """Check the request; raise ``InvalidRequest`` with one line naming the problem and the fix."""
        if not isinstance(self.mode, Mode):
            try:
                self.mode = Mode(self.mode)
            except ValueError:
                raise InvalidRequest(
                    f"unknown mode {self.mode!r}; choose one of: {', '.join(m.value for m in Mode)}"
                ) from None
        if not isinstance(self.precision, Precision):
            try:
                self.precision = Precision(str(self.precision).lower())
            except ValueError:
                raise InvalidRequest(
                    f"unknown precision {self.precision!r}; choose one of: {', '.join(p.value for p in Precision)}"
                ) from None
        if isinstance(self.fast, bool):
            self.fast = 3 if self.fast else 0  # --fast, the web UI's checkbox
        for f in dataclasses.fields(self):
            if "range" in f.metadata:
                _check_number(getattr(self, f.name), f.metadata)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequest(f"{name} must be a positive whole number of pixels, got {value!r}")
            if value % 8:
                lower, upper = value - value % 8, value - value % 8 + 8
                raise InvalidRequest(
                    f"{name} {value} is not a multiple of 8; use {max(lower, 8)} or {upper}"
                )
            if value > MAX_SIDE:
                raise InvalidRequest(f"{name} {value} is too large; the limit is {MAX_SIDE} pixels")
        if self.total_images > MAX_IMAGES:
            raise InvalidRequest(f"{self.batch_size} x {self.n_iter} = {self.total_images} images is over the limit "
                                 f"of {MAX_IMAGES} a request; ask for fewer (batch size x n_iter)")
        if self.width and self.height and self.width * self.height * self.batch_size > MAX_BATCH_PIXELS:
            raise InvalidRequest(
                f"a batch of {self.batch_size} at {self.width}x{self.height} is over the limit of "
                f"{MAX_BATCH_PIXELS // 2**20} megapixels a batch; use a smaller batch size and more batches (n_iter)"
            )
        if self.cfg_end is not None and (not _is_number(self.cfg_end) or not 0.0 < self.cfg_end <= 1.0):
            raise InvalidRequest(f"CFG end must be above 0 and at most 1 (the fraction of steps with CFG), "
                                 f"got {self.cfg_end!r}")
        for name in ("prompt", "negative_prompt"):
            _check_text(name.replace("_", " "), getattr(self, name), MAX_PROMPT_CHARS)
        if self.hires_enabled and self.hires_checkpoint is not None and self.refiner is not None \
                and self.refiner_switch_at < 1:
            raise InvalidRequest("a hires checkpoint and a refiner do not go together (the refiner does not run with "
                                 "the hires fix); leave the refiner or the hires checkpoint out")
        if self.refiner is not None and not self.refiner_switch_at > 0:
            raise InvalidRequest("refiner switch at must be above 0 (the fraction of the steps before the refiner "
                                 "takes over; 1 = never)")
        if self.hires_checkpoint is not None and not str(self.hires_checkpoint).strip():
            self.hires_checkpoint = None
        for name in ("model", "vae", "refiner", "hires_checkpoint", "sampler", "scheduler", "prediction", "device",
                     "memory"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name), 4096)
        if self.prediction not in (None, "eps", "v"):
            raise InvalidRequest(f"unknown prediction type {self.prediction!r}; choose 'eps' or 'v'")
        if not (self.turbo is None or isinstance(self.turbo, bool)):
            raise InvalidRequest(f"turbo must be true, false or null (the model's own), got {self.turbo!r}")
        canonical = {c.lower(): c for c in EMPHASIS_CHOICES}
        if not isinstance(self.emphasis, str) or self.emphasis.strip().lower() not in canonical:
            shown = self.emphasis[:40] if isinstance(self.emphasis, str) else self.emphasis
            raise InvalidRequest(f"unknown emphasis {shown!r}; choose one of: {', '.join(EMPHASIS_CHOICES)}")
        self.emphasis = canonical[self.emphasis.strip().lower()]
        if self.comma_padding_backtrack is None:
            self.comma_padding_backtrack = 20
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < -1 or self.seed >= 2**32:
            raise InvalidRequest(f"seed must be -1 (random) or between 0 and {2**32 - 1}, got {self.seed!r}")
        if self.mode in (Mode.IMG2IMG, Mode.INPAINT, Mode.DEPTH2IMG, Mode.UPSCALE) and self.init_image is None:
            raise InvalidRequest(f"{self.mode.value} needs an init image (--init-img)")
        if self.mode is Mode.INPAINT and self.mask_image is None:
            raise InvalidRequest("inpaint needs a mask image (--mask)")
        if self.mode is Mode.UPSCALE:
            self._validate_upscale()
        fill = str(self.inpainting_fill).strip().lower().replace("-", " ").replace("_", " ")
        if fill not in INPAINTING_FILLS:
            raise InvalidRequest(f"unknown inpainting fill {str(self.inpainting_fill)[:40]!r}; choose one of: "
                                 f"{', '.join(INPAINTING_FILLS)}")
        self.inpainting_fill = fill
        # the sampler name is checked against the sampler table (imports nothing heavy)
        from .engine.samplers import parse_sampler

        parse_sampler(self.sampler or DEFAULT_SAMPLER, self.scheduler)
        self._validate_hires(parse_sampler)
        self._validate_controlnet()
        self._validate_fallbacks()
        return self

    def _validate_fallbacks(self) -> None:
        """``fallbacks``: only FALLBACK_FIELDS, each a value the field itself takes (checked as the request with
        them in place: the sizes count towards the batch's pixels too)."""
        if not isinstance(self.fallbacks, dict):
            raise InvalidRequest(f"fallbacks must be an object of field: value, got {type(self.fallbacks).__name__}")
        if unknown := sorted(set(self.fallbacks) - set(FALLBACK_FIELDS)):
            raise InvalidRequest(f"fallbacks can hold {', '.join(FALLBACK_FIELDS)}; not {', '.join(unknown)}")
        if self.fallbacks:
            dataclasses.replace(self, **self.fallbacks, fallbacks={}).validate()

    def _validate_controlnet(self) -> None:
        """The ControlNet units: each checked (``ControlUnit.validate``), only for the modes that take them, and
        a picture for each (img2img and inpaint: the init image where a unit has none, as the extension)."""
        if self.controlnet is None:
            self.controlnet = []
        if not isinstance(self.controlnet, list | tuple):
            raise InvalidRequest(f"controlnet must be a list of units, got {type(self.controlnet).__name__}")
        if len(self.controlnet) > MAX_CONTROL_UNITS:
            raise InvalidRequest(f"{len(self.controlnet)} ControlNet units is over the limit of {MAX_CONTROL_UNITS}")
        self.controlnet = [ControlUnit.from_dict(u).validate(i) for i, u in enumerate(self.controlnet)]
        if self.controlnet and self.mode not in (Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT):
            raise InvalidRequest(f"ControlNet works with txt2img, img2img and inpaint; {self.mode.value} runs without "
                                 "it: leave the ControlNet units out")
        for i, unit in enumerate(self.controlnet):
            if unit.image is None and self.init_image is None:
                raise InvalidRequest(f"ControlNet unit {i} has no picture (--control IMAGE, or the unit's image); "
                                     "only img2img and inpaint use the init image for a unit without one")

    def _validate_hires(self, parse_sampler) -> None:
        """The hires fix's own fields (their numbers are checked with the others): upscaler, sampler, prompts,
        and the target size against the limits."""
        canonical = {name.lower(): name for name in HIRES_UPSCALERS}
        key = self.hires_upscaler.strip().lower() if isinstance(self.hires_upscaler, str) else None
        if not key:
            raise InvalidRequest(f"hires upscaler must be a name ({', '.join(HIRES_UPSCALERS)}, or an upscaler model "
                                 f"of the library), got {self.hires_upscaler!r}")
        _check_text("hires upscaler", self.hires_upscaler, 255)
        # another name is an upscaler model of the library: known only there (engine.upscalers.hires_upscaler,
        # called by the server before it accepts a job and by the hires task before it runs)
        self.hires_upscaler = canonical.get(key, self.hires_upscaler.strip())
        for name in ("hires_sampler", "hires_scheduler"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                setattr(self, name, None)
            elif value is not None:
                _check_text(name.replace("_", " "), value, 4096)
        if self.hires_sampler is not None or self.hires_scheduler is not None:
            parse_sampler(*self.hires_sampler_and_schedule)
        for name in ("hires_prompt", "hires_negative_prompt"):
            _check_text(name.replace("_", " "), getattr(self, name), MAX_PROMPT_CHARS)
        if self.hires_enabled and self.width and self.height:
            self.check_hires_size(self.width, self.height)

    def _validate_upscale(self) -> None:
        """The tiles, and the x4 output against the size limits (before any work is queued)."""
        if self.tile_size % 8:
            lower = max(32, self.tile_size - self.tile_size % 8)
            raise InvalidRequest(f"tile size {self.tile_size} is not a multiple of 8; use {lower} or {lower + 8}")
        if 2 * self.tile_overlap > self.tile_size:
            raise InvalidRequest(f"tile overlap {self.tile_overlap} must be at most half the tile size "
                                 f"({self.tile_size}); use at most {self.tile_size // 2}")
        w, h = (UPSCALE_FACTOR * side for side in self.init_image.size)
        if max(w, h) > MAX_SIDE:
            raise InvalidRequest(f"upscaling {self.init_image.width}x{self.init_image.height} x{UPSCALE_FACTOR} would "
                                 f"make {w}x{h}, over the limit of {MAX_SIDE} pixels a side; use a picture of at most "
                                 f"{MAX_SIDE // UPSCALE_FACTOR} pixels a side")
        if w * h * self.batch_size > MAX_BATCH_PIXELS:
            raise InvalidRequest(f"a batch of {self.batch_size} at {w}x{h} is over the limit of "
                                 f"{MAX_BATCH_PIXELS // 2**20} megapixels a batch; use a smaller batch size and "
                                 "more batches (n_iter)")

    @property
    def hires_sampler_and_schedule(self) -> tuple[str, str]:
        """The second pass's sampler and schedule type: its own, else the first pass's."""
        return self.hires_sampler or self.sampler or DEFAULT_SAMPLER, self.hires_scheduler or self.scheduler

    def check_hires_size(self, width: int, height: int) -> None:
        (uw, uh), (ow, oh) = self.hires_sizes(width, height)
        if max(uw, uh) > MAX_SIDE:
            raise InvalidRequest(f"the hires fix would make {width}x{height} into {uw}x{uh}, over the limit of "
                                 f"{MAX_SIDE} pixels a side; use a smaller hires scale or resize")
        if uw * uh * self.batch_size > MAX_BATCH_PIXELS:
            raise InvalidRequest(f"a batch of {self.batch_size} at the hires size {uw}x{uh} is over the limit of "
                                 f"{MAX_BATCH_PIXELS // 2**20} megapixels a batch; use a smaller batch size and "
                                 "more batches (n_iter)")

    # ---- JSON-safe form, for the job store and the HTTP APIs ---------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif f.name in IMAGE_FIELDS and value is not None:
                value = image_to_b64(value)
            elif f.name == "controlnet":
                value = [ControlUnit.from_dict(u).to_dict() for u in value or []]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in IMAGE_FIELDS:
            if isinstance(kwargs.get(key), str):
                kwargs[key] = image_from_b64(kwargs[key], high_depth=key == "depth_map")
        if isinstance(kwargs.get("controlnet"), list):
            kwargs["controlnet"] = [ControlUnit.from_dict(u) for u in kwargs["controlnet"]]
        if "mode" in kwargs:
            kwargs["mode"] = Mode(kwargs["mode"])
        if "precision" in kwargs:
            kwargs["precision"] = Precision(kwargs["precision"])
        if isinstance(data.get("extra"), dict) and "fast" not in kwargs:  # a job stored by an older version
            kwargs["fast"] = data["extra"].get("fast") or 0
        return cls(**kwargs)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(value: Any, spec: dict[str, Any]) -> None:
    """``value`` against a field's ``limits(...)``; None passes (it means "the default")."""
    if value is None:
        return
    low, high = spec["range"]
    label, whole = spec["label"], spec["whole"]
    kind = "a whole number" if whole else "a number"
    if not _is_number(value) or (whole and not isinstance(value, int)):
        raise InvalidRequest(f"{label} must be {kind} from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"{label} must be between {low:g} and {high:g}, got {value!r}{spec['hint']}")


def _check_text(label: str, value: Any, limit: int) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{label} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidRequest(f"the {label} is {len(value)} characters long, over the limit of {limit}; shorten it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(f"the {label} holds a character that is not valid text (a lone surrogate at position "
                             f"{err.start}); send it as UTF-8") from err


@dataclass
class ProgressInfo:
    """One progress report: ``step`` of ``total`` steps of image batch ``batch`` of ``batches``."""

    step: int
    total: int
    batch: int = 0
    batches: int = 1
    preview: Image | None = None  # a cheap preview of the current latents, when asked for

    @property
    def fraction(self) -> float:
        done = self.batch * self.total + self.step
        return min(1.0, done / max(1, self.total * self.batches))


@dataclass
class GenerationResult:
    """Images plus every parameter needed to reproduce them."""

    images: list[Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    model_name: str
    model_hash: str | None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the user should know (fallbacks taken)
    interrupted: bool = False  # stopped early on request: the last pictures are unfinished (as A1111's interrupt)
    extras: dict[str, Any] = field(default_factory=dict)  # what a task made beside them (depth2img: "depth_map")

    @property
    def seed(self) -> int:
        return self.seeds[0]


def image_to_b64(image: Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(data: str, *, high_depth: bool = False) -> Image:
    """Decode base64 (optionally a ``data:image/...;base64,`` URL) into a PIL image, or raise InvalidRequest."""
    from .output.images import open_image_bytes

    if data.startswith("data:"):
        data = data.split(",", 1)[1] if "," in data else ""
    try:
        raw = base64.b64decode(data, validate=False)
    except (ValueError, TypeError):
        raise InvalidRequest("the image is not valid base64") from None
    return open_image_bytes(raw, high_depth=high_depth)

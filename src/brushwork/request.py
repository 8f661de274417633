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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image


class BrushworkError(Exception):
    """A problem the user can fix. ``str(err)`` is one line that names the problem and the fix."""


class InvalidRequest(BrushworkError):
    """The request itself is wrong (bad size, unknown sampler, strength out of range, ...)."""


class ModelError(BrushworkError):
    """The model cannot be found, read, trusted or recognised."""


class Cancelled(BrushworkError):
    """The run was cancelled (interrupt) before it finished."""


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


MAX_TOKEN_MERGING_RATIO = 0.9  # beyond this almost every token of the self-attention is merged away


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
    sampler: str = "Euler a"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float | None = None  # None: the model's recommended scale, else 7
    # The fraction of the steps that use CFG; the rest (the last, least noisy ones) follow the prompt alone,
    # as CFG 1 (SD.Next's "CFG end"). None: the model's recommendation, else 1 (every step).
    cfg_end: float | None = None
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float = 0.0
    clip_skip: int = 1
    token_merging_ratio: float = 0.0  # A1111's ToMe option (at most MAX_TOKEN_MERGING_RATIO): 0 = off; 0.5 merges half the tokens (faster, softer)
    # img2img / inpaint / depth2img / upscale
    init_image: Image | None = None
    strength: float = 0.75
    mask_image: Image | None = None
    mask_blur: int = 4
    # model interpretation and placement
    prediction: str | None = None  # "eps" | "v" | None (detect)
    device: str = "auto"
    precision: Precision = Precision.AUTO
    memory: str = "auto"
    # output
    watermark: bool = True
    loras: list[tuple[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

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
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise InvalidRequest(f"{name} must be a positive whole number of pixels, got {value!r}")
            if value % 8:
                lower, upper = value - value % 8, value - value % 8 + 8
                raise InvalidRequest(
                    f"{name} {value} is not a multiple of 8; use {max(lower, 8)} or {upper}"
                )
            if value > MAX_SIDE:
                raise InvalidRequest(f"{name} {value} is too large; the limit is {MAX_SIDE} pixels")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS}, got {self.steps!r}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidRequest(f"batch size must be between 1 and {MAX_BATCH}, got {self.batch_size!r}")
        if not 1 <= self.n_iter <= 10_000:
            raise InvalidRequest(f"n_iter must be between 1 and 10000, got {self.n_iter!r}")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise InvalidRequest(f"strength must be between 0.0 and 1.0, got {self.strength!r}")
        if self.cfg_scale is not None and not 0 <= float(self.cfg_scale) <= 100:
            raise InvalidRequest(f"CFG scale must be between 0 and 100, got {self.cfg_scale!r}")
        if self.cfg_end is not None and not 0.0 < float(self.cfg_end) <= 1.0:
            raise InvalidRequest(f"CFG end must be above 0 and at most 1 (the fraction of steps with CFG), "
                                 f"got {self.cfg_end!r}")
        if not 0.0 <= float(self.token_merging_ratio) <= MAX_TOKEN_MERGING_RATIO:
            raise InvalidRequest(
                f"token merging ratio must be between 0 (off) and {MAX_TOKEN_MERGING_RATIO}, got "
                f"{self.token_merging_ratio!r}; 0.3-0.5 is usual"
            )
        if not 1 <= self.clip_skip <= 12:
            raise InvalidRequest(f"clip skip must be between 1 and 12, got {self.clip_skip!r}")
        if self.prediction not in (None, "eps", "v"):
            raise InvalidRequest(f"unknown prediction type {self.prediction!r}; choose 'eps' or 'v'")
        if not isinstance(self.seed, int) or self.seed < -1 or self.seed >= 2**32:
            raise InvalidRequest(f"seed must be -1 (random) or between 0 and {2**32 - 1}, got {self.seed!r}")
        if self.mode in (Mode.IMG2IMG, Mode.INPAINT, Mode.DEPTH2IMG, Mode.UPSCALE) and self.init_image is None:
            raise InvalidRequest(f"{self.mode.value} needs an init image (--init-img)")
        if self.mode is Mode.INPAINT and self.mask_image is None:
            raise InvalidRequest("inpaint needs a mask image (--mask)")
        # the sampler name is checked against the sampler table (imports nothing heavy)
        from .engine.samplers import parse_sampler

        parse_sampler(self.sampler, self.scheduler)
        return self

    # ---- JSON-safe form, for the job store and the HTTP APIs ---------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif f.name in ("init_image", "mask_image") and value is not None:
                value = image_to_b64(value)
            elif f.name == "loras":
                value = [list(x) for x in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("init_image", "mask_image"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = image_from_b64(kwargs[key])
        if "mode" in kwargs:
            kwargs["mode"] = Mode(kwargs["mode"])
        if "precision" in kwargs:
            kwargs["precision"] = Precision(kwargs["precision"])
        if "loras" in kwargs:
            kwargs["loras"] = [tuple(x) for x in kwargs["loras"]]
        return cls(**kwargs)


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

    @property
    def seed(self) -> int:
        return self.seeds[0]


def image_to_b64(image: Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(data: str) -> Image:
    """Decode base64 (optionally a ``data:image/...;base64,`` URL) into a PIL image, or raise InvalidRequest."""
    from .output.images import open_image_bytes

    if data.startswith("data:"):
        data = data.split(",", 1)[1] if "," in data else ""
    try:
        raw = base64.b64decode(data, validate=False)
    except (ValueError, TypeError):
        raise InvalidRequest("the image is not valid base64") from None
    return open_image_bytes(raw)

"""What the routes share: ``ServerState`` (engine, settings, job store, worker, options), ``HTTPError``, and
``state_of(request)``. The route modules (api.py, sdapi.py) import this, never app.py, so app.py can import them."""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..request import BrushworkError, GenerationRequest, InvalidRequest
from ..settings import Settings
from .store import FINISHED, Job, Store
from .worker import Worker


class HTTPError(Exception):
    """An error with an HTTP status, rendered as JSON ``{error, detail, body, errors}``."""

    def __init__(self, status: int, detail: str, *, error: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or _STATUS_NAMES.get(status, "Error")


_STATUS_NAMES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                 413: "Payload Too Large", 422: "Unprocessable Entity", 503: "Service Unavailable"}


@dataclass
class ServerState:
    """Everything the routes share. One per app; nothing global."""

    engine: Any
    settings: Settings
    store: Store
    worker: Worker
    outputs_dir: Path
    selected_model: str | None = None  # set by POST /sdapi/v1/options sd_model_checkpoint
    bucket: Any = None  # output.bucket.Bucket: pictures another machine made are read from there
    options: dict[str, Any] = field(default_factory=dict)

    # ---- models: only by name from the library, never a path from HTTP -------------------------

    def models(self) -> list[Any]:
        try:
            return list(self.engine.list_models())
        except BrushworkError:
            return []

    def resolve_model(self, name: str | None) -> str | None:
        """A library model name for ``name`` (a name, "name [hash]" title, file name or hash: ``ModelStore.find``,
        the CLI's resolver, without paths); None = the default."""
        if name is None or (isinstance(name, str) and not name.strip()):
            return self.selected_model
        if not isinstance(name, str):
            raise InvalidRequest(f"model must be a model name, got {name!r}")
        store = getattr(self.engine, "store", None)
        try:
            entry = store.find(name, paths=False)
        except ModelError:
            names = ", ".join(e.name for e in self.models()) or "(the model library is empty)"
            raise InvalidRequest(f"unknown model {name.strip()!r}; choose one of: {names}") from None
        # the engine reads a name that exists as a path (relative to where the server runs) as that path; hand
        # it this entry's own file then, so a name always means the library entry
        return str(entry.path) if Path(entry.name).exists() else entry.name

    def vaes(self) -> list[Any]:
        """The library's VAEs, then its tiny decoders (vae-approx/: "taesd", "taesdxl"; format "taesd")."""
        store = getattr(self.engine, "store", None)
        if store is None or not hasattr(store, "vaes"):
            return []
        from ..models import taesd
        from ..models.store import ModelEntry

        tiny = [ModelEntry(f.name, f.path, "taesd") for f in taesd.library_files(store).values()]
        return list(store.vaes()) + tiny

    def resolve_vae(self, name: str | None) -> str | None:
        """The file of a library VAE named ``name`` (file name or stem); None, "Automatic" and "None": the model's
        own. A path is refused: over HTTP files are chosen by name only."""
        if name is None or (isinstance(name, str) and name.strip() in ("", "Automatic", "None")):
            return None
        if not isinstance(name, str):
            raise InvalidRequest(f"vae must be a VAE's name, got {name!r}")
        if "/" in name or "\\" in name:
            raise InvalidRequest(f"vae must be a name from the library, not a path: {name!r}")
        entries = self.vaes()
        for entry in entries:
            if name.strip() in (entry.name, Path(entry.name).stem, Path(entry.name).stem.removesuffix(".vae")):
                return entry.name if entry.format == "taesd" else str(entry.path)  # the engine knows "taesd"
        from ..models import taesd

        store = getattr(self.engine, "store", None)
        if name.strip().lower() in taesd.TINY_VAES and store is not None:
            raise InvalidRequest(taesd.missing(name.strip().lower(), store))
        names = ", ".join(e.name for e in entries) or "(no VAE in the library's vae/ folder)"
        raise InvalidRequest(f"unknown VAE {name!r}; choose one of: Automatic, None, {names}")

    def current_model_entry(self) -> Any:
        """The model a request without ``model`` would use, as a ModelEntry (or None)."""
        entries = self.models()
        if self.selected_model:
            for e in entries:
                if self.selected_model in (e.name, str(e.path)):
                    return e
        current = getattr(self.engine, "current_model", None)
        if current is not None:
            return current
        default = self.settings.default_model
        for e in entries:
            if default and default in (e.name, Path(str(e.path)).name):
                return e
        return entries[0] if entries else None

    # ---- submitting and waiting ---------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> GenerationRequest:
        """Everything a caller can get wrong, checked before the job is accepted."""
        request.model = self.resolve_model(request.model)
        if request.refiner is not None:
            request.refiner = self.resolve_model(request.refiner)
        if request.hires_checkpoint is not None and str(request.hires_checkpoint).strip():  # blank: none (validate)
            request.hires_checkpoint = self.resolve_model(request.hires_checkpoint)
        request.vae = self.resolve_vae(request.vae)
        request.config = None  # a file path: HTTP callers choose models by name only
        # the device and memory policy belong to whoever runs the server, not to HTTP callers
        request.device = self.settings.device
        request.memory = self.settings.memory
        for image in (request.init_image, request.mask_image, request.depth_map):
            if image is not None and image.width * image.height > self.settings.max_image_pixels:
                raise InvalidRequest(
                    f"the image is {image.width}x{image.height} pixels, over the limit of "
                    f"{self.settings.max_image_pixels} pixels; make it smaller"
                )
        request.validate()
        if getattr(self.engine, "loras", None) is not None:  # <lora:name> tags: a name not in the library, now
            from ..engine.networks import check_loras

            check_loras(request, self.engine.loras)
        if request.controlnet:  # the units' models by library name, their preprocessors: refused now
            from ..engine.controlnet import check_units

            check_units(request, getattr(self.engine, "controlnets", None), self.settings.max_image_pixels)
        if request.hires_enabled:  # a library upscaler model's name: refused now, not when the job runs
            from ..engine.upscalers import hires_upscaler

            request.hires_upscaler = hires_upscaler(request.hires_upscaler, self.settings)
        limits = self.settings
        # an open side with a fallback (/sdapi's A1111 512) gets that, or a few-step model's own (512 too)
        width, height = (request.fallbacks.get(side) if getattr(request, side) is None else getattr(request, side)
                         for side in ("width", "height"))
        for value, limit, what, name in (
                (request.steps, limits.max_steps, "steps", "max_steps"),
                (width, limits.max_side, "width", "max_side"),
                (height, limits.max_side, "height", "max_side"),
                (request.total_images, limits.max_images, "images (batch size x n_iter)", "max_images")):
            if isinstance(value, int) and value > limit:
                raise InvalidRequest(f"{value} {what} is over this server's limit of {limit} (its owner can change "
                                     f"BRUSHWORK_{name.upper()})")
        if (width is None or height is None) and (native := self._native_side(request)):
            if native > limits.max_side:  # the size left to the model (or its init image) must fit the limit too
                raise InvalidRequest(f"the picture would be {native} pixels a side (the model's native size), over "
                                     f"this server's limit of {limits.max_side}; give a smaller width and height")
        if request.mode.value == "upscale":  # the x4 upscaler's output, which width / height do not give
            from ..request import UPSCALE_FACTOR

            side = UPSCALE_FACTOR * max(request.init_image.size)
            if side > limits.max_side:
                raise InvalidRequest(f"upscaling makes a picture {side} pixels a side, over this server's limit of "
                                     f"{limits.max_side} (its owner can change BRUSHWORK_MAX_SIDE)")
        return request

    def _native_side(self, request: GenerationRequest) -> int | None:
        """The larger side a request without width / height gets: its init image's (img2img, inpaint, ...), else
        the model's native size as its family says (read from the file's header); None where it cannot be told."""
        if request.mode.value == "upscale":
            return None  # checked with the x4 factor below
        if request.init_image is not None and request.mode.value != "txt2img":
            return max(request.init_image.size)
        store, resolve = getattr(self.engine, "store", None), getattr(self.engine, "resolve", None)
        if store is None or resolve is None:
            return None
        from ..models.families import FAMILY_BY_NAME

        try:
            family = FAMILY_BY_NAME.get(store.with_family(resolve(request.model)[0]).family or "")
        except (BrushworkError, OSError):
            return None
        return family.default_size if family is not None else None

    def submit(self, request: GenerationRequest, *, source: str = "api") -> Job:
        request = self.check_request(request)
        job = self.store.create(request.to_dict(), source=source)
        self.worker.notify(job.id)
        return job

    async def wait(self, job_id: str, *, poll: float = 0.1) -> Job:
        """Wait (without holding a thread) until the job has finished."""
        while True:
            status = self.store.status(job_id)
            if status is None or status in FINISHED:
                job = self.store.get(job_id)
                if job is None:
                    raise HTTPError(404, f"job {job_id} not found")
                return job
            await asyncio.sleep(poll)

    def decode_image(self, data: Any, what: str = "image", *, high_depth: bool = False):
        """A base64 (or data: URL) image from a caller, with the upload limits applied."""
        from ..output.images import open_image_bytes

        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"{what} must be a base64-encoded image")
        if data.startswith("data:"):
            data = data.split(",", 1)[1] if "," in data else ""
        if len(data) * 3 // 4 > self.settings.max_upload_bytes:
            raise HTTPError(413, f"{what} is larger than the upload limit of {self.settings.max_upload_bytes} bytes")
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what} is not valid base64") from None
        return open_image_bytes(raw, self.settings.max_image_pixels, high_depth=high_depth)

    def image_path(self, rel: str) -> Path:
        """A file inside the outputs folder (or, with a bucket, one another machine made, read into this one's
        cache: it blocks while it downloads), or a 404: no path from the database or a caller escapes it."""
        root = self.outputs_dir.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise HTTPError(404, "image not found")
        if not path.is_file() and self.bucket is not None:
            path = self.bucket.fetch(str(path.relative_to(root))) or path
        if not path.is_file():
            raise HTTPError(404, "image not found")
        return path


def state_of(request) -> ServerState:
    """The server state of the app a request came to (for the route modules)."""
    return request.app.state.brushwork

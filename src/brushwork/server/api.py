"""``/api/v1``: the native API. Jobs in, progress as Server-Sent Events, images and history out.

A job body is the ``GenerationRequest`` fields as JSON (the same names as the CLI options),
with images as base64. Unknown fields are an error here (a typo must not be silently ignored).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.samplers import SAMPLERS, SCHEDULE_TYPES
from ..request import ControlUnit, GenerationRequest, Mode, Precision
from .edge import StrictJSONRoute
from .state import HTTPError, ServerState
from .state import state_of as _state
from .store import CANCELLED, DONE, FAILED, FINISHED, QUEUED, RUNNING, STATUSES, Job

router = APIRouter(prefix="/api/v1", tags=["brushwork"], route_class=StrictJSONRoute)

MAX_SEARCH_WORDS = 32
MAX_ROW = 2**63 - 1  # SQLite's largest integer: larger offsets and ids are a 422, not an overflow
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=MAX_ROW)]
ImageId = Annotated[int, Path(ge=0, le=MAX_ROW)]
SearchText = Annotated[str, Query(max_length=1000, description="words the prompt must all contain (at most "
                                                                 "32 words)")]


_DECLARED = {f.name: f.metadata for f in dataclasses.fields(GenerationRequest)}


def declared(name: str, default: Any, description: str | None = None) -> Any:
    """A field of ``JobRequest`` documented with the range ``GenerationRequest`` declares for it (OpenAPI
    ``minimum``/``maximum``); ``GenerationRequest.validate()`` enforces it, with its own messages."""
    meta = _DECLARED[name]
    schema: dict[str, Any] = dict(meta.get("schema", {}))
    if "range" in meta:
        schema["minimum"], schema["maximum"] = meta["range"]
    return Field(default, description=description, json_schema_extra=schema or None)


class ControlUnitBody(BaseModel):
    """A ControlNet unit (``request.ControlUnit``): the A1111 ControlNet extension's unit fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="a ControlNet of the library's controlnet/ folder (GET /controlnet/model_list)")
    image: str | None = Field(None, description="base64 picture it follows; null = the init image (img2img, inpaint)")
    module: str = Field("none", description="the preprocessor (GET /controlnet/module_list)")
    weight: float = Field(1.0, json_schema_extra={"minimum": 0, "maximum": 2})
    guidance_start: float = Field(0.0, json_schema_extra={"minimum": 0, "maximum": 1})
    guidance_end: float = Field(1.0, json_schema_extra={"minimum": 0, "maximum": 1})
    control_mode: str | int = Field("Balanced", description="Balanced, My prompt is more important, ControlNet is "
                                                            "more important (or 0, 1, 2)")
    resize_mode: str | int = Field("Crop and Resize", description="Just Resize, Crop and Resize, Resize and Fill "
                                                                  "(or 0, 1, 2)")
    processor_res: int = Field(-1, description="the preprocessor's resolution (-1 = its default, 512)")
    threshold_a: float = Field(-1, description="the preprocessor's first setting (-1 = its default)")
    threshold_b: float = Field(-1, description="the preprocessor's second setting (-1 = its default)")
    pixel_perfect: bool = False
    mask: str | None = None


class JobRequest(BaseModel):
    """A generation request: the ``GenerationRequest`` fields (see ``brushwork txt2img --help``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    mode: Mode = Mode.TXT2IMG
    model: str | None = Field(None, description="a model name from the library (GET /api/v1/models); null = default")
    sampler: str | None = Field(None, json_schema_extra={"enum": [*(x.name for x in SAMPLERS), None]},
                                description="a sampler name (GET /api/v1/samplers; A1111's aliases work too); null "
                                            "= the model's recommendation (an LCM model: LCM), else Euler a")
    scheduler: str = Field("Automatic", json_schema_extra={"enum": list(SCHEDULE_TYPES)})
    vae: str | None = Field(None, description="a VAE of the library by name (GET /sdapi/v1/sd-vae; \"taesd\", "
                                              "\"taesdxl\": the tiny decoder, when in vae-approx/); null, "
                                              "\"Automatic\" or \"None\" = the model's own")
    steps: int | None = declared("steps", None, "null = the model's recommendation (SD-Turbo: 1, LCM: 4), else 20")
    cfg_scale: float | None = declared("cfg_scale", None, "null = the model's recommended scale, else 7")
    cfg_end: float | None = Field(None, description="fraction of the steps with CFG; the last ones follow the "
                                                    "prompt alone (null = the model's recommendation, else 1)")
    seed: int = Field(-1, description="-1 = random; the seed used is in the result")
    width: int | None = declared("width", None, "null = the model's native size")
    height: int | None = declared("height", None)
    batch_size: int = declared("batch_size", 1)
    n_iter: int = declared("n_iter", 1)
    eta: float = declared("eta", 0.0)
    clip_skip: int = declared("clip_skip", 1)
    token_merging_ratio: float = declared("token_merging_ratio", 0.0, "token merging (ToMe): 0 = off, 0.3-0.5 "
                                                                      "faster and a little softer")
    emphasis: str = declared("emphasis", "Original", "how (word:1.5) weights apply, as A1111's option: Original "
                                                     "(then each chunk's mean is restored), No norm, Ignore, None")
    comma_padding_backtrack: int = declared("comma_padding_backtrack", 20, "a full 75-token chunk ends at a comma at "
                                                                           "most this many tokens back (0 = off)")
    init_image: str | None = Field(None, description="base64 PNG/JPEG/WEBP or a data: URL (img2img, inpaint, ...)")
    strength: float = declared("strength", 0.75)
    mask_image: str | None = None
    mask_blur: int = declared("mask_blur", 4)
    inpainting_fill: str = declared("inpainting_fill", "original", "inpaint: what the masked area starts from "
                                                                   "(A1111's Masked content)")
    inpaint_full_res: bool = Field(False, description="inpaint: repaint only the mask's box (plus padding) at the "
                                                      "full size, then paste it back (A1111's Only masked)")
    inpaint_full_res_padding: int = declared("inpaint_full_res_padding", 32, "pixels around the mask, Only masked")
    inpainting_mask_invert: bool = Field(False, description="inpaint: repaint what the mask leaves black")
    depth_map: str | None = Field(None, description="depth2img: a depth map (base64 grayscale picture, white = near) "
                                                    "instead of the model's estimate of the init image")
    noise_level: int = declared("noise_level", 20, "upscale (the SD x4 upscaler): noise added to the init image "
                                                   "first; more invents more detail")
    tile_size: int = declared("tile_size", 128, "upscale: a larger init image runs in overlapping tiles of this "
                                                "many pixels (a multiple of 8)")
    tile_overlap: int = declared("tile_overlap", 32, "upscale: pixels the tiles share, blended")
    hires_scale: float | None = declared("hires_scale", None, "txt2img hires fix (A1111's hr_scale): upscale the "
                                                              "picture this much and denoise it again; null or 1 = off")
    hires_resize_x: int = declared("hires_resize_x", 0, "hires fix: the target width instead of a scale (0 = from "
                                                        "the height)")
    hires_resize_y: int = declared("hires_resize_y", 0, "hires fix: the target height (both: cover, then crop)")
    hires_upscaler: str = declared("hires_upscaler", "Latent", "hires fix: a latent mode, Lanczos / Nearest, or an "
                                                     "upscaler model of the library (GET /sdapi/v1/upscalers)")
    hires_steps: int = declared("hires_steps", 0, "hires fix: the second pass's steps (0 = steps)")
    hires_strength: float = declared("hires_strength", 0.7, "hires fix: the second pass's denoising strength")
    hires_sampler: str | None = Field(None, description="hires fix: the second pass's sampler (null = sampler)")
    hires_scheduler: str | None = Field(None, json_schema_extra={"enum": [*SCHEDULE_TYPES, None]},
                                        description="hires fix: the second pass's schedule type (null = scheduler)")
    hires_prompt: str = Field("", description="hires fix: the second pass's prompt (empty = prompt)")
    hires_negative_prompt: str = Field("", description="hires fix: the second pass's negative prompt")
    hires_checkpoint: str | None = Field(None, description="hires fix: the second pass runs on this model (GET "
                                                           "/api/v1/models) of the model's kind; null = the model")
    refiner: str | None = Field(None, description="SDXL: a refiner model (GET /api/v1/models) for the last steps")
    refiner_switch_at: float = declared("refiner_switch_at", 0.8, "with a refiner: the fraction of the steps the "
                                                                  "model runs before the refiner takes over")
    prediction: str | None = Field(None, json_schema_extra={"enum": ["eps", "v", None]},
                                   description="null = read from the model")
    precision: Precision = Precision.AUTO
    watermark: bool | None = None
    fast: bool | int = Field(False, description="fast mode: reuse the UNet's deep features between full steps "
                                                "(true = every 3rd step in full, or that interval); a little less detail")
    turbo: bool | None = Field(None, description="a Turbo model (SD-Turbo, SDXL-Turbo): 1 step, CFG 1, SGM Uniform, "
                                                 "512x512 where not given; null = as the model file says")
    controlnet: list[ControlUnitBody] = Field(default_factory=list, description="ControlNet units (txt2img, img2img, "
                                                                                "inpaint); see docs/controlnet.md")


def _job_view(state: ServerState, job: Job) -> dict[str, Any]:
    view = job.public()
    view["position"] = state.store.queue_position(job.id) if job.status == QUEUED else None
    live = state.worker.live_of(job.id)
    if job.status == RUNNING and live is not None:
        view["progress"] = live.fraction
        view["step"], view["total"] = live.step, live.total
        view["eta"] = round(live.eta_relative, 2)
    if job.result and job.result.get("images"):
        for img in view["result"]["images"]:
            img["url"] = f"/api/v1/images/{img['id']}"
            img["thumb_url"] = f"/api/v1/images/{img['id']}/thumb"
    return view


def _get_job(state: ServerState, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPError(404, f"job {job_id} not found")
    return job


def job_request(body: JobRequest, decode_image, *, watermark: bool) -> GenerationRequest:
    """The ``GenerationRequest`` a job body asks for (checked by ``validate()`` after this): its pictures decoded
    by ``decode_image(data, what, high_depth=...)``, ``watermark`` where the body leaves it open. The one
    translation of the native job schema: ``POST /api/v1/jobs`` and each line of ``brushwork batch``."""
    data = body.model_dump()
    data["watermark"] = watermark if body.watermark is None else body.watermark
    init_b64, mask_b64, depth_b64 = data.pop("init_image"), data.pop("mask_image"), data.pop("depth_map")
    units = data.pop("controlnet") or []
    if isinstance(data["fast"], bool):
        data["fast"] = 3 if data["fast"] else 0
    gen = GenerationRequest.from_dict(data)
    if init_b64:
        gen.init_image = decode_image(init_b64, "init image")
    if mask_b64:
        gen.mask_image = decode_image(mask_b64, "mask image")
    if depth_b64:
        gen.depth_map = decode_image(depth_b64, "depth map", high_depth=True)
    gen.controlnet = [ControlUnit(**{**unit, **{key: decode_image(unit[key], f"ControlNet unit {i} {key}")
                                                for key in ("image", "mask") if unit.get(key)}})
                      for i, unit in enumerate(units)]
    return gen


@router.post("/jobs", status_code=202, summary="Queue a generation job")
async def create_job(body: JobRequest, request: Request):
    state = _state(request)

    def accept() -> Job:  # decoding images and hashing a new model file take a while: not on the event loop
        gen = job_request(body, state.decode_image, watermark=state.settings.watermark)
        return state.submit(gen, source="api")

    job = await anyio.to_thread.run_sync(accept)
    return _job_view(state, job)


@router.get("/jobs", summary="List jobs, newest first")
async def list_jobs(request: Request, status: str | None = None, limit: Limit = 50, offset: Offset = 0):
    state = _state(request)
    if status is not None and status not in STATUSES:
        raise HTTPError(400, f"unknown status {status!r}; choose one of: {', '.join(STATUSES)}")
    jobs = state.store.list(status=status, limit=limit, offset=offset)
    return {"jobs": [_job_view(state, j) for j in jobs], "counts": state.store.counts()}


@router.get("/jobs/{job_id}", summary="One job: status, progress, result")
async def get_job(job_id: str, request: Request):
    state = _state(request)
    return _job_view(state, _get_job(state, job_id))


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel_job(job_id: str, request: Request):
    state = _state(request)
    job = _get_job(state, job_id)
    if job.status in FINISHED:
        raise HTTPError(409, f"job {job_id} has already finished ({job.status})")
    state.worker.cancel(job_id)
    # a running job stops within a step; wait briefly so the answer usually says "cancelled"
    for _ in range(50):
        if state.store.status(job_id) in FINISHED:
            break
        await asyncio.sleep(0.1)
    return _job_view(state, _get_job(state, job_id))


@router.delete("/jobs/{job_id}", summary="Cancel a queued or running job")
async def delete_job(job_id: str, request: Request):
    return await cancel_job(job_id, request)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/jobs/{job_id}/events", summary="Progress as Server-Sent Events",
            description="Events: queued {position}, progress {step, total, fraction, eta, preview}, "
                        "done {job}, error {error, job}, cancelled {job}.")
async def job_events(job_id: str, request: Request, previews: bool = True):
    from .sdapi import preview_b64

    state = _state(request)
    _get_job(state, job_id)

    async def stream():
        last_position, last_progress, last_preview, last_sent = None, None, None, time.monotonic()
        yield "retry: 1000\n\n"
        while True:
            if await request.is_disconnected():
                return
            status = state.store.status(job_id)  # cheap; the whole job is read once, at the end
            if status is None:
                yield _sse("error", {"error": "job not found"})
                return
            if status in FINISHED:
                job = state.store.get(job_id)
                event = {DONE: "done", FAILED: "error", CANCELLED: "cancelled"}[job.status]
                payload = {"job": _job_view(state, job)}
                if job.status == FAILED:
                    payload["error"] = job.error
                yield _sse(event, payload)
                return
            if status == QUEUED:
                position = state.store.queue_position(job_id)
                if position != last_position:
                    last_position = position
                    last_sent = time.monotonic()
                    yield _sse("queued", {"position": position})
            else:
                live = state.worker.live_of(job_id)
                if live is not None:
                    key = (live.step, live.batch, live.total)
                    new_preview = previews and live.preview_version != last_preview and live.preview is not None
                    if key != last_progress or new_preview:
                        last_progress = key
                        data = {"step": live.step, "total": live.total, "batch": live.batch,
                                "batches": live.batches, "fraction": round(live.fraction, 4),
                                "eta": round(live.eta_relative, 2), "preview": None}
                        if new_preview:
                            last_preview = live.preview_version
                            b64 = preview_b64(state, live)
                            data["preview"] = f"data:image/png;base64,{b64}" if b64 else None
                        last_sent = time.monotonic()
                        yield _sse("progress", data)
            if time.monotonic() - last_sent > 15:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- images and history --------------------------------------------------------------------------


def _image_view(row: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in row.items() if k != "path"}
    view["file"] = row["path"]
    view["url"] = f"/api/v1/images/{row['id']}"
    view["thumb_url"] = f"/api/v1/images/{row['id']}/thumb"
    return view


@router.get("/images", summary="Image history, newest first; q searches the prompts")
async def list_images(request: Request, q: SearchText = "", limit: Limit = 50, offset: Offset = 0):
    state = _state(request)
    if len(q.split()) > MAX_SEARCH_WORDS:
        raise HTTPError(422, f"search for at most {MAX_SEARCH_WORDS} words at once, got {len(q.split())}")
    return {"images": [_image_view(r) for r in state.store.search_images(q, limit=limit, offset=offset)]}


@router.get("/history", summary="Same as GET /api/v1/images")
async def history(request: Request, q: SearchText = "", limit: Limit = 50, offset: Offset = 0):
    return await list_images(request, q, limit, offset)


def _image_row(state: ServerState, image_id: int) -> dict[str, Any]:
    row = state.store.get_image(image_id)
    if row is None:
        raise HTTPError(404, f"image {image_id} not found")
    return row


@router.get("/images/{image_id}", summary="The PNG file (with its parameters chunk)")
def get_image(image_id: ImageId, request: Request, download: bool = False):  # a thread: it may read a bucket
    state = _state(request)
    row = _image_row(state, image_id)
    path = state.image_path(row["path"])
    return FileResponse(path, media_type="image/png", filename=path.name if download else None,
                        content_disposition_type="attachment" if download else "inline")


THUMB_SIDE = 256


def _thumbnail(state: ServerState, image_id: int, path) -> Any:
    """A small WEBP of an image for the gallery, made once and kept in the data folder."""
    import os
    import tempfile

    from PIL import Image

    folder = state.settings.data_dir / "thumbs"
    thumb = folder / f"{image_id}.webp"
    if thumb.is_file() and thumb.stat().st_mtime >= path.stat().st_mtime:
        return thumb
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(path) as image:
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".webp")
        with os.fdopen(fd, "wb") as f:
            image.convert("RGB").save(f, format="WEBP", quality=85)
    os.replace(tmp, thumb)
    return thumb


@router.get("/images/{image_id}/thumb", summary="A small preview (WEBP, at most 256 pixels a side)")
def get_thumbnail(image_id: ImageId, request: Request):
    state = _state(request)
    row = _image_row(state, image_id)
    thumb = _thumbnail(state, image_id, state.image_path(row["path"]))
    return FileResponse(thumb, media_type="image/webp", headers={"Cache-Control": "max-age=86400"})


@router.get("/images/{image_id}/meta", summary="An image's parameters")
async def get_image_meta(image_id: ImageId, request: Request):
    state = _state(request)
    row = _image_row(state, image_id)
    view = _image_view(row)
    try:
        from ..output.infotext import parse_infotext

        view["parameters"] = parse_infotext(row["infotext"]) if row["infotext"] else {}
    except ImportError:
        view["parameters"] = {}
    job = state.store.get(row["job_id"])
    if job is not None:
        view["request"] = job.public()["request"]
    return view


# ---- models, samplers, status --------------------------------------------------------------------


@router.get("/models", summary="The model library")
def models(request: Request):
    state = _state(request)
    current = state.current_model_entry()
    from ..models.load import native_size, recommended_defaults

    out = []
    for e in state.models():
        path, family, short_hash = getattr(e, "path", None), getattr(e, "family", None), getattr(e, "short_hash", None)
        size = native_size(path, family, short_hash) if path else None
        out.append({"name": e.name, "title": getattr(e, "title", e.name), "family": family,
                    "hash": short_hash, "sha256": getattr(e, "sha256", None),
                    "current": current is not None and e.name == current.name,
                    "defaults": recommended_defaults(path, short_hash) if path else {},
                    # the size a request without width / height gets (txt2img): SDXL 1024, SD 2.x 768-v 768, ...
                    "native_size": list(size) if size else None})
    return {"models": out}


@router.get("/samplers", summary="Sampler names and the schedule types each supports")
async def samplers(request: Request):
    from ..engine.samplers import SAMPLERS, SCHEDULE_TYPES

    return {"samplers": [{"name": s.name, "schedules": list(s.schedules), "aliases": list(s.aliases)}
                         for s in SAMPLERS],
            "schedule_types": list(SCHEDULE_TYPES)}


@router.get("/status", summary="Queue counts, the running job, the worker")
async def status(request: Request):
    state = _state(request)
    live = state.worker.live
    return {"counts": state.store.counts(), "worker_alive": state.worker.alive,
            "running": None if live is None else {"job_id": live.job_id, "step": live.step, "total": live.total,
                                                  "fraction": live.fraction},
            "limits": {"max_upload_bytes": state.settings.max_upload_bytes,
                       "max_image_pixels": state.settings.max_image_pixels}}

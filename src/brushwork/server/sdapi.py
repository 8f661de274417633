"""``/sdapi/v1``: the AUTOMATIC1111 web UI API, close enough that existing clients work.

Field names, defaults and response shapes follow A1111 (see docs/reference a1111-compat.md).
Generation goes through the same persistent job queue as the native API, so it is saved,
serialised with other work, and survives a restart; these routes wait for the job and answer
the way A1111 does (``images`` as base64 PNG with the infotext inside, ``info`` a JSON string).
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..engine.samplers import display_name, lenient_sampler
from ..request import (
    EMPHASIS_CHOICES,
    HIRES_LATENT_MODES,
    MAX_COMMA_PADDING_BACKTRACK,
    MAX_TOKEN_MERGING_RATIO,
    GenerationRequest,
    InvalidRequest,
    Mode,
)
from .edge import StrictJSONRoute
from .state import HTTPError, ServerState
from .state import state_of as _state
from .store import CANCELLED, DONE, INPUT_IMAGES

MAX_OPTIONS_BYTES = 256 * 1024

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi (A1111-compatible)"], route_class=StrictJSONRoute)


# ---- request models (A1111 names and defaults; unknown fields are ignored) -------------------------


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    cfg_end: float | None = None  # SD.Next's field; A1111 has none (null: the model's recommendation, else 1)
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(_Common):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Common):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = ""


class _Extras(BaseModel):
    """A1111's ExtrasBaseRequest: resize_mode 0 = scale by upscaling_resize, 1 = to upscaling_resize_w x _h (cover,
    then centre-crop when upscaling_crop); upscaler_2 blended over upscaler_1 by extras_upscaler_2_visibility."""

    model_config = ConfigDict(extra="ignore")
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False  # before or after face restoration, which this server does not have


class ExtrasSingleImageRequest(_Extras):
    image: str = ""


class ExtrasFileData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str = ""
    name: str = ""


class ExtrasBatchImagesRequest(_Extras):
    imageList: list[ExtrasFileData] = Field(default_factory=list)  # A1111's name


# ---- translation ---------------------------------------------------------------------------------

# A1111's defaults that give way to the model's recommendation where the client leaves the field out (a few-step
# model's: SD-Turbo 1 step, CFG 1, Euler a, 512; a file's brushwork.defaults): A1111 field -> request field. The
# request leaves these open with A1111's value as its fallback, so an ordinary model gets exactly A1111's.
_MODEL_LED = {"steps": "steps", "cfg_scale": "cfg_scale", "width": "width", "height": "height",
              "sampler_index": "sampler"}


def _left_to_model(body: _Common) -> dict[str, Any]:
    """The request fields the client left out (pydantic's ``model_fields_set``), each with A1111's default."""
    sent = set(body.model_fields_set)
    # either name says which sampler (known clients send both); a schedule type named without a sampler was chosen
    # for A1111's default one (Euler: it takes Karras, a Turbo model's Euler a does not), so that one runs
    if "sampler_name" in sent or (body.scheduler or "Automatic").strip().lower() != "automatic":
        sent.add("sampler_index")
    return {field: getattr(body, name) for name, field in _MODEL_LED.items() if name not in sent}


def _to_request(state: ServerState, body: _Common, mode: Mode) -> tuple[GenerationRequest, list[str]]:
    """The request, and notes for ``info`` about what was read leniently, as A1111 does."""
    overrides = dict(body.override_settings or {})
    # features that would change the picture are refused, never silently dropped (A1111 answers 422 for
    # scripts it does not have, too)
    if body.script_name:
        raise HTTPError(422, f"Script '{body.script_name}' not found; this server has no scripts")
    # A1111's ControlNet extension's units (server/controlnet.py); any other always-on script is refused there
    from .controlnet import units_from_scripts

    control_units, control_notes = units_from_scripts(state, body.alwayson_scripts or {})
    if body.restore_faces:
        raise InvalidRequest("face restoration is not supported; send restore_faces: false")
    if body.tiling:
        raise InvalidRequest("tiling is not supported; send tiling: false")
    def option(name, default=None):
        """This request's override_settings, else the server's option (as set by POST /options)."""
        return overrides.get(name, state.options.get(name, default))

    clip_skip = option("CLIP_stop_at_last_layers", 1)
    try:
        clip_skip = int(clip_skip)
    except (TypeError, ValueError):
        raise InvalidRequest(f"CLIP_stop_at_last_layers must be a whole number, got {clip_skip!r}") from None
    tome = option("token_merging_ratio")
    if mode is Mode.IMG2IMG and option("token_merging_ratio_img2img"):
        tome = option("token_merging_ratio_img2img")  # as A1111: img2img's own ratio when one is set
    try:
        tome = float(tome or 0.0)
    except (TypeError, ValueError):
        raise InvalidRequest(f"token_merging_ratio must be a number, got {tome!r}") from None
    backtrack = option("comma_padding_backtrack", 20)
    if isinstance(backtrack, float) and backtrack.is_integer():
        backtrack = int(backtrack)  # a slider's 20.0; validate() refuses anything else that is not a whole number
    # as A1111: a schedule type it does not know (SillyTavern sends "normal"), or one the sampler cannot take
    # (Open WebUI suggests "Euler a" + "Karras"), falls back to Automatic; the info says so
    sampler, scheduler, note = lenient_sampler(body.sampler_name or body.sampler_index or "Euler",
                                               body.scheduler or "Automatic")
    request = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        mode=mode,
        model=overrides.get("sd_model_checkpoint"),
        vae=option("sd_vae"),
        sampler=sampler,
        scheduler=scheduler,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        cfg_end=body.cfg_end,
        seed=-1 if body.seed < 0 else body.seed,
        width=body.width,
        height=body.height,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        eta=body.eta or 0.0,
        clip_skip=clip_skip,
        token_merging_ratio=tome,
        emphasis=option("emphasis", "Original"),
        comma_padding_backtrack=backtrack,
        watermark=state.settings.watermark,
        refiner=body.refiner_checkpoint if body.refiner_checkpoint not in (None, "", "None") else None,
        refiner_switch_at=0.8 if body.refiner_switch_at is None else body.refiner_switch_at,
        controlnet=control_units,
    )
    request.fallbacks = _left_to_model(body)  # the model's recommendation, else A1111's default (engine.run)
    for field in request.fallbacks:
        setattr(request, field, None)
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        _hires(body, request)
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise HTTPError(404, "Init image not found")
        request.init_image = state.decode_image(body.init_images[0], "init image")
        request.strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        if body.mask:
            request.mode = Mode.INPAINT
            request.mask_image = state.decode_image(body.mask, "mask")
            request.mask_blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
            fills = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's numbering
            if body.inpainting_fill not in fills:
                raise InvalidRequest(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or "
                                     f"3 (latent nothing), got {body.inpainting_fill!r}")
            request.inpainting_fill = fills[body.inpainting_fill]
            request.inpaint_full_res = bool(body.inpaint_full_res)
            request.inpaint_full_res_padding = body.inpaint_full_res_padding
            request.inpainting_mask_invert = bool(body.inpainting_mask_invert)
    return request, ([note] if note else []) + control_notes


def _hires(body: Txt2ImgRequest, request: GenerationRequest) -> None:
    """A1111's hires fix fields onto the request (its defaults: hr_upscaler null is "Latent", denoising_strength
    null is 0.75 as its txt2img API, hr_second_pass_steps 0 is the same as steps)."""
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):  # a library model: checked before queueing
        request.hires_checkpoint = body.hr_checkpoint_name
    upscaler = body.hr_upscaler or "Latent"  # a latent mode, or one of /upscalers: checked by state.check_request
    request.hires_scale = body.hr_scale
    request.hires_resize_x, request.hires_resize_y = body.hr_resize_x, body.hr_resize_y
    request.hires_upscaler = upscaler
    request.hires_steps = body.hr_second_pass_steps
    request.hires_strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if body.hr_sampler_name not in (None, "", "Use same sampler"):
        request.hires_sampler = body.hr_sampler_name
    if body.hr_scheduler not in (None, "", "Use same scheduler"):
        request.hires_scheduler = body.hr_scheduler
    request.hires_prompt, request.hires_negative_prompt = body.hr_prompt or "", body.hr_negative_prompt or ""


def _echo(body: _Common, request: GenerationRequest) -> dict[str, Any]:
    """The request as A1111 echoes it; the fields the client left out as they ran (``request``, filled)."""
    params = body.model_dump()
    left = _left_to_model(body)
    for name, field in _MODEL_LED.items():
        if field in left and getattr(request, field) is not None:
            params[name] = getattr(request, field)
    if "sampler" in left and request.sampler is not None:  # A1111's name, under both of its keys
        params["sampler_name"] = params["sampler_index"] = display_name(request.sampler, request.scheduler)[0]
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        params["init_images"] = None
        params["mask"] = None
    return params


def _info(state: ServerState, request: GenerationRequest, job_result: dict[str, Any], body: _Common,
          job_started: float | None) -> dict[str, Any]:
    seeds = job_result.get("seeds") or [request.seed]
    infotexts = job_result.get("infotexts") or []
    images = job_result.get("images") or []
    width = images[0]["width"] if images else request.width
    height = images[0]["height"] if images else request.height
    n = len(seeds)
    sampler_name, schedule = display_name(request.sampler, request.scheduler)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": body.subseed if body.subseed >= 0 else seeds[0],
        "all_subseeds": [body.subseed + i if body.subseed >= 0 else s for i, s in enumerate(seeds)],
        "subseed_strength": body.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": sampler_name,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job_result.get("model_name"),
        "sd_model_hash": job_result.get("model_hash"),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.mode is not Mode.TXT2IMG else body.denoising_strength,
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": body.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job_started or time.time())),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": request.mode is Mode.INPAINT,
        "version": "brushwork",
        "notes": job_result.get("notes", []),
    }


async def _generate(state: ServerState, body: _Common, mode: Mode) -> dict[str, Any]:
    notes: list[str] = []

    def accept():  # decoding images and hashing a new model file take a while: not on the event loop
        request, read_notes = _to_request(state, body, mode)
        notes.extend(read_notes)
        return state.submit(request, source="sdapi")

    job = await anyio.to_thread.run_sync(accept)
    job = await state.wait(job.id)
    result = job.result or {}
    # what ran: what the request left open as the model's defaults filled it (not run: A1111's fallbacks)
    asked = {k: v for k, v in job.request.items() if k not in INPUT_IMAGES}
    ran = {k: v for k, v in (result.get("ran") or {}).items() if v is not None}
    request = GenerationRequest.from_dict({**asked, **(asked.get("fallbacks") or {}), **ran})
    if job.status == DONE:
        images = []
        if body.send_images:
            for img in result.get("images", []):
                images.append(base64.b64encode(state.image_path(img["path"]).read_bytes()).decode("ascii"))
        info = _info(state, request, result, body, job.started)
        info["notes"] = notes + info["notes"]
        if result.get("interrupted"):  # /interrupt: what was there when it stopped, the last picture unfinished
            info["interrupted"] = True
        return {"images": images, "parameters": _echo(body, request), "info": json.dumps(info)}
    if job.status == CANCELLED:  # cancelled through the native API before it gave anything
        return {"images": [], "parameters": _echo(body, request),
                "info": json.dumps({**_info(state, request, {}, body, job.started), "interrupted": True})}
    status = 400 if result.get("user_error") else 500
    raise HTTPError(status, job.error or "generation failed", error=result.get("error_type") or "GenerationError")


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request):
    return await _generate(_state(request), body, Mode.TXT2IMG)


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, request: Request):
    return await _generate(_state(request), body, Mode.IMG2IMG)


# ---- progress and control ------------------------------------------------------------------------


def preview_b64(state: ServerState, live: Any = None) -> str | None:
    """The running job's (or ``live``'s job's) latest preview as base64 PNG (encoded once per new preview)."""
    live = live or state.worker.live
    if live is None or live.preview is None:
        return None
    key = (live.job_id, live.preview_version)
    cached = state.options.get("_preview_cache")
    if cached and cached[0] == key:
        return cached[1]
    buf = io.BytesIO()
    live.preview.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    state.options["_preview_cache"] = (key, data)
    return data


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False):
    state = _state(request)
    live = state.worker.live
    counts = state.store.counts()
    job_count = counts["queued"] + counts["running"]
    if live is None:
        return {"progress": 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": job_count,
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
    return {
        "progress": round(live.fraction, 4),
        "eta_relative": round(live.eta_relative, 3),
        "state": {
            "skipped": live.skipped, "interrupted": live.interrupted, "job": live.job_id, "job_count": job_count,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(live.started)),
            "job_no": live.batch, "sampling_step": live.step, "sampling_steps": live.total,
        },
        "current_image": None if skip_current_image else preview_b64(state, live),
        "textinfo": f"step {live.step}/{live.total}",
    }


@router.post("/interrupt")
async def interrupt(request: Request):
    _state(request).worker.interrupt_current()
    return {}


@router.post("/skip")
async def skip(request: Request):
    # one job runs as a unit here, so skipping the current image stops the running job
    _state(request).worker.interrupt_current(skipped=True)
    return {}


# ---- options and models --------------------------------------------------------------------------


def _model_info(entry: Any) -> dict[str, Any]:
    return {"title": getattr(entry, "title", entry.name), "model_name": Path(entry.name).stem,
            "hash": getattr(entry, "short_hash", None), "sha256": getattr(entry, "sha256", None),
            "filename": str(entry.path), "config": None}


@router.get("/options")
def get_options(request: Request):
    state = _state(request)
    entry = state.current_model_entry()
    options = {k: v for k, v in state.options.items() if not k.startswith("_")}
    return {
        "sd_model_checkpoint": getattr(entry, "title", None) if entry else None,
        "sd_checkpoint_hash": getattr(entry, "sha256", None) if entry else None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "token_merging_ratio": 0.0,
        "emphasis": "Original",
        "comma_padding_backtrack": 20,
        "samples_format": "png",
        "outdir_samples": str(state.outputs_dir),
        "eta_noise_seed_delta": 0,
        "live_previews_enable": True,
        "show_progress_every_n_steps": 1,
        "enable_pnginfo": True,
        **options,
    }


@router.post("/options")
def set_options(body: dict[str, Any], request: Request):
    state = _state(request)
    if "CLIP_stop_at_last_layers" in body:
        value = body["CLIP_stop_at_last_layers"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
            raise InvalidRequest(f"CLIP_stop_at_last_layers must be between 1 and 12, got {value!r}")
    for name in ("token_merging_ratio", "token_merging_ratio_img2img"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= MAX_TOKEN_MERGING_RATIO):
            raise InvalidRequest(f"{name} must be between 0 and {MAX_TOKEN_MERGING_RATIO}, got {value!r}")
    if "emphasis" in body and body["emphasis"] not in EMPHASIS_CHOICES:
        raise InvalidRequest(f"unknown emphasis {str(body['emphasis'])[:40]!r}; choose one of: "
                             f"{', '.join(EMPHASIS_CHOICES)}")
    if "comma_padding_backtrack" in body:
        value = body["comma_padding_backtrack"]
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not 0 <= value <= MAX_COMMA_PADDING_BACKTRACK:
            raise InvalidRequest(f"comma_padding_backtrack must be a whole number from 0 (off) to "
                                 f"{MAX_COMMA_PADDING_BACKTRACK}, got {value!r}")
    if "sd_vae" in body:
        state.resolve_vae(body["sd_vae"])  # an unknown VAE is refused now, not at the next picture
    kept = {**{k: v for k, v in state.options.items() if not k.startswith("_")},
            **{k: v for k, v in body.items() if not k.startswith("_") and k != "sd_model_checkpoint"}}
    size = len(json.dumps(kept))
    if size > MAX_OPTIONS_BYTES:  # A1111's whole config is about 20 kB; options are not a file store
        raise HTTPError(413, f"the options would take {size} bytes, over the limit of {MAX_OPTIONS_BYTES}; "
                             "send only the options you change")
    if "sd_model_checkpoint" in body:
        state.selected_model = state.resolve_model(body.pop("sd_model_checkpoint"))
        state.store.set_option("sd_model_checkpoint", state.selected_model)
    state.options.update({k: v for k, v in body.items() if not k.startswith("_")})
    state.store.set_option("sdapi_options", kept)
    return None


@router.get("/sd-models")
def sd_models(request: Request):
    return [_model_info(e) for e in _state(request).models() if "upscal" not in str(getattr(e, "family", ""))]


@router.post("/refresh-checkpoints")
def refresh_checkpoints(request: Request):
    engine = _state(request).engine
    if hasattr(engine, "refresh_models"):
        engine.refresh_models()
    return None


@router.post("/unload-checkpoint")
async def unload_checkpoint(request: Request):
    state = _state(request)

    def _unload() -> None:
        with state.worker.engine_lock:  # never pull a model out from under a running job
            state.engine.unload()

    await anyio.to_thread.run_sync(_unload)
    if (everywhere := getattr(state.worker, "unload_everywhere", None)) is not None:  # Ray: every replica's model
        await anyio.to_thread.run_sync(everywhere)
    return None


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request):
    return None  # the next job loads the selected model


@router.get("/sd-vae")
def sd_vae(request: Request):
    """The library's VAEs (its vae/ folder), as A1111 lists them; choose one with the sd_vae option."""
    return [{"model_name": e.name, "filename": str(e.path)} for e in _state(request).vaes()]


@router.get("/samplers")
async def samplers(request: Request):
    from ..engine.samplers import SAMPLERS

    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]


@router.get("/schedulers")
async def schedulers(request: Request):
    from ..engine.samplers import SCHEDULE_TYPES

    out = []
    for label in SCHEDULE_TYPES:
        out.append({"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
                    "default_rho": {"Karras": 7.0, "Polyexponential": 1.0}.get(label, -1),
                    "need_inner_model": False})
    return out


def _upscalers(state: ServerState) -> list[Any]:
    """The library's diffusion upscaler checkpoints (the SD x4 upscaler: a generation job, Mode.UPSCALE)."""
    return [e for e in state.models() if "upscal" in str(getattr(e, "family", ""))]


@router.get("/upscalers")
def upscalers(request: Request):
    """As A1111: "None", Lanczos, Nearest, then the upscaler models (engine.upscalers: ESRGAN family, by file stem;
    scale: remembered from a load, else read from the name, else 4 as A1111 says of ESRGAN), then the diffusion
    upscaler checkpoints."""
    from ..engine import upscalers as table

    state = _state(request)
    out = []
    for u in table.upscalers(state.settings):
        out.append({"name": u.name, "model_name": u.name if u.is_model else None,
                    "model_path": str(u.path) if u.is_model else None, "model_url": None,
                    "scale": (table.model_scale(u, state.settings) or 4) if u.is_model else 4})
    for e in _upscalers(state):
        out.append({"name": e.name, "model_name": e.name, "model_path": str(e.path), "model_url": None, "scale": 4})
    return out


@router.get("/latent-upscale-modes")
async def latent_upscale_modes(request: Request):
    return [{"name": name} for name in HIRES_LATENT_MODES]


@router.get("/embeddings")
def embeddings(request: Request):
    """As A1111: the library's embeddings/ by name, {step, sd_checkpoint, sd_checkpoint_name, shape, vectors};
    "loaded" fit the current model's text encoders, "skipped" do not."""
    engine = _state(request).engine
    if not hasattr(engine, "embedding_database"):
        return {"loaded": {}, "skipped": {}}
    db = engine.embedding_database()
    return {"loaded": {name: e.to_json() for name, e in db.loaded.items()},
            "skipped": {name: e.to_json() for name, e in db.skipped.items()}}


@router.get("/loras")
def loras(request: Request):
    """A1111's Lora extension's route: the library's lora/ files, [{name, alias, path, metadata}]."""
    library = getattr(_state(request).engine, "loras", None)
    return [f.to_json() for f in library.files()] if library is not None else []


@router.post("/refresh-loras")
def refresh_loras(request: Request):
    """As A1111's: the list is read again (here every listing reads the folder; changed files are read again)."""
    library = getattr(_state(request).engine, "loras", None)
    if library is not None:
        library.files()
    return None


@router.get("/scripts")
async def scripts(request: Request):
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
async def script_info(request: Request):
    return []


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    state = _state(request)
    return {"api": True, "nowebui": False, "ckpt_dir": str(state.settings.models_dir),
            "data_dir": str(state.settings.data_dir), "outdir_samples": str(state.outputs_dir),
            "device": state.settings.device, "memory": state.settings.memory}


def _read_meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


@router.get("/memory")
async def memory(request: Request):
    import resource

    info = _read_meminfo()
    total, free = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    ram = {"free": free, "used": total - free, "total": total,
           "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    cuda: dict[str, Any] = {"error": "CUDA is not available"}
    torch = sys.modules.get("torch")  # only report what is already loaded; never import torch for this
    if torch is not None and torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free_b, "used": total_b - free_b, "total": total_b},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
                "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    return {"ram": ram, "cuda": cuda}


# ---- images ------------------------------------------------------------------------------------


@router.post("/png-info")
def png_info(body: PNGInfoRequest, request: Request):
    state = _state(request)
    if not body.image.strip():
        return {"info": "", "items": {}, "parameters": {}}
    image = state.decode_image(body.image)
    items = {k: v for k, v in (image.info or {}).items() if isinstance(v, str | int | float)}
    text = items.pop("parameters", "") or ""
    parameters: dict[str, Any] = {}
    if text:
        from ..output.infotext import parse_infotext

        parameters = parse_infotext(text)
    return {"info": text, "items": items, "parameters": parameters}


def _postprocess(state: ServerState, body: _Extras, image) -> tuple[Any, dict[str, Any]]:
    """A1111's extras upscale (scripts/postprocessing_upscale.py) on one picture: (picture, its info)."""
    from PIL import Image

    from ..engine import upscalers as table

    if body.gfpgan_visibility or body.codeformer_visibility:
        raise InvalidRequest("face restoration (GFPGAN, CodeFormer) is not supported; send gfpgan_visibility and "
                             "codeformer_visibility 0")
    if body.resize_mode not in (0, 1):
        raise InvalidRequest(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x "
                             f"upscaling_resize_h), got {body.resize_mode!r}")

    def chosen(name: str | None, field: str):
        if name is None or name.strip() in ("", "None"):
            return None
        try:
            return table.find(name, state.settings)
        except InvalidRequest as err:
            raise InvalidRequest(f"{field}: {err}") from err

    first, second = chosen(body.upscaler_1, "upscaler_1"), chosen(body.upscaler_2, "upscaler_2")
    info: dict[str, Any] = {}
    if first is None:  # as A1111: no first upscaler, no upscale
        return image, info
    if body.resize_mode == 1:
        tw, th = body.upscaling_resize_w, body.upscaling_resize_h
        if not 1 <= tw <= state.settings.max_side or not 1 <= th <= state.settings.max_side:
            raise InvalidRequest(f"upscaling_resize_w and upscaling_resize_h must be from 1 to "
                                 f"{state.settings.max_side}, got {tw}x{th}")
        scale = max(tw / image.width, th / image.height)
        info["Postprocess upscale to"] = f"{tw}x{th}"
    else:
        scale = body.upscaling_resize
        if not 0 < scale <= table.MAX_SCALE:
            raise InvalidRequest(f"upscaling_resize must be above 0 and at most {table.MAX_SCALE}, got {scale!r}")
        info["Postprocess upscale by"] = scale
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size[0] * size[1] > state.settings.max_image_pixels:
        raise InvalidRequest(f"the upscaled picture would be {size[0]}x{size[1]} pixels, over this server's limit "
                             f"of {state.settings.max_image_pixels}; ask for a smaller factor")
    out = table.upscale_to(first, image, *size, state.settings)
    info["Postprocess upscaler"] = first.name
    visibility = body.extras_upscaler_2_visibility
    if second is not None and visibility > 0:
        other = table.upscale_to(second, image, *size, state.settings)
        out = Image.blend(out, other.convert(out.mode), min(1.0, float(visibility)))
        info["Postprocess upscaler 2"] = second.name
    if body.resize_mode == 1 and body.upscaling_crop:
        cropped = Image.new(out.mode, (tw, th))
        cropped.paste(out, box=(tw // 2 - out.width // 2, th // 2 - out.height // 2))
        out = cropped
        info["Postprocess crop to"] = f"{tw}x{th}"
    return out, info


def _extras_png(image, source, info: dict[str, Any]) -> str:
    """Base64 PNG keeping the source's infotext ("parameters"), with the postprocessing one beside it."""
    from PIL.PngImagePlugin import PngInfo

    png = PngInfo()
    if isinstance((source.info or {}).get("parameters"), str):
        png.add_text("parameters", source.info["parameters"])
    if info:
        png.add_text("postprocessing", _extras_text(info))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _extras_text(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def _extras_html(info: dict[str, Any]) -> str:
    from html import escape

    return f"<p>{escape(_extras_text(info))}</p>" if info else ""


def _diffusion_upscaler(state: ServerState, name: str | None) -> Any:
    """The library's diffusion upscaler checkpoint called ``name`` (not an entry of the upscaler table), or None."""
    from ..engine import upscalers as table

    if not name or name.strip().lower() in {n.lower() for n in table.available(state.settings)}:
        return None
    for e in _upscalers(state):
        if name in (e.name, getattr(e, "title", None)):
            return e
    return None


async def _diffusion_extras(state: ServerState, chosen: Any, image_b64: str) -> dict[str, Any]:
    """The SD x4 upscaler (a diffusion model) as an extras upscaler: a generation job."""
    def accept():
        gen = GenerationRequest(mode=Mode.UPSCALE, model=chosen.name, init_image=state.decode_image(image_b64),
                                steps=20, sampler="Euler", watermark=state.settings.watermark)
        return state.submit(gen, source="sdapi")

    job = await anyio.to_thread.run_sync(accept)
    job = await state.wait(job.id)
    if job.status != DONE:
        result = job.result or {}
        raise HTTPError(400 if result.get("user_error") else 500, job.error or "upscale failed")
    img = job.result["images"][0]
    data = base64.b64encode(state.image_path(img["path"]).read_bytes()).decode("ascii")
    return {"image": data, "html_info": img.get("infotext", "")}


def _run_extras(state: ServerState, body: _Extras, images_b64: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Decode, upscale and encode each picture, one upscale at a time with the generation jobs (the engine lock)."""
    out, info = [], {}
    for data in images_b64:
        source = state.decode_image(data)
        with state.worker.engine_lock:
            image, info = _postprocess(state, body, source)
        out.append(_extras_png(image, source, info))
    return out, info


@router.post("/extra-single-image")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request):
    """A1111's extras on one picture: the upscalers of /upscalers (engine.upscalers), scale by or to a size."""
    state = _state(request)
    if not body.image:
        raise HTTPError(404, "Image not found")
    diffusion = await anyio.to_thread.run_sync(_diffusion_upscaler, state, body.upscaler_1)
    if diffusion is not None:
        return await _diffusion_extras(state, diffusion, body.image)
    images, info = await anyio.to_thread.run_sync(_run_extras, state, body, [body.image])
    return {"html_info": _extras_html(info), "image": images[0]}


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request):
    """A1111's extras on several pictures (``imageList``: [{data, name}]); ``images`` in the same order."""
    state = _state(request)
    if not body.imageList:
        raise InvalidRequest("imageList is empty; send at least one {\"data\": base64 image, \"name\": ...}")
    if len(body.imageList) > state.settings.max_images:
        raise InvalidRequest(f"{len(body.imageList)} pictures is over this server's limit of "
                             f"{state.settings.max_images} a request")
    images, info = await anyio.to_thread.run_sync(_run_extras, state, body, [f.data for f in body.imageList])
    return {"html_info": _extras_html(info), "images": images}

"""A1111's ControlNet extension's API: its units in ``alwayson_scripts`` and its ``/controlnet/*`` routes.

Clients (SillyTavern, Krita's old plugin, bots) send ``"alwayson_scripts": {"controlnet": {"args": [unit, ...]}}``
to ``/sdapi/v1/txt2img`` and ``img2img``; ``units_from_scripts`` reads those units as the extension does
(``ControlNetUnit.from_dict``: its legacy aliases ``input_image``, ``guidance``, ``lowvram``, ``mask_image``,
``guessmode``; ``image`` as base64, ``{"image": ..., "mask": ...}`` or ``[image, mask]``; resize and control modes
by name or number) into ``request.ControlUnit``. A unit with ``enabled: false`` is left out, and so is a unit that
says nothing (no ``enabled``, model "None", no picture: the placeholders clients send for empty slots); a unit
without ``enabled`` is on (the extension's API units were, before it changed the default). A ``processor_res`` or
threshold outside the preprocessor's range is its default, as the extension resets it (the info's notes say so).
Fields that would change the picture and are not supported here are refused with a 422, never dropped.

Routes: ``GET /controlnet/version``, ``/controlnet/model_list`` (the library's controlnet/ titles,
"name [hash]"), ``/controlnet/module_list`` (the preprocessors, with their sliders), ``/controlnet/settings``,
``POST /controlnet/detect`` (a preprocessor on pictures: the maps, base64).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..engine import preprocessors
from ..request import MAX_CONTROL_UNITS, ControlUnit, InvalidRequest
from .edge import StrictJSONRoute
from .state import HTTPError, ServerState
from .state import state_of as _state

API_VERSION = 2  # the extension's external_code.get_api_version()

router = APIRouter(prefix="/controlnet", tags=["controlnet (A1111's ControlNet extension)"],
                   route_class=StrictJSONRoute)

# the extension's unit fields that change the picture, which this server does not do: refused when set
UNSUPPORTED = {"advanced_weighting": "per-layer weights", "effective_region_mask": "an effective region mask",
               "ipadapter_input": "IP-Adapter inputs", "batch_images": "batch folders",
               "batch_image_files": "batch folders"}
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}


def units_from_scripts(state: ServerState, scripts: dict[str, Any]) -> tuple[list[ControlUnit], list[str]]:
    """(the ControlNet units of ``alwayson_scripts``, notes on what was read leniently); the other scripts are
    refused as before (``sdapi._to_request``)."""
    units: list[ControlUnit] = []
    notes: list[str] = []
    for name, value in (scripts or {}).items():
        if name.strip().lower() != "controlnet":
            raise HTTPError(422, f"always on script {name} not found; this server has ControlNet only")
        args = value.get("args") if isinstance(value, dict) else value
        if args is None:
            args = []
        if not isinstance(args, list):
            raise HTTPError(422, "alwayson_scripts.controlnet.args must be a list of ControlNet units")
        for i, unit in enumerate(args):
            parsed = _unit(state, unit, i, notes)
            if parsed is not None:
                units.append(parsed)
    if len(units) > MAX_CONTROL_UNITS:
        raise HTTPError(422, f"{len(units)} ControlNet units is over the limit of {MAX_CONTROL_UNITS}")
    return units, notes


def _unit(state: ServerState, raw: Any, index: int, notes: list[str]) -> ControlUnit | None:
    where = f"ControlNet unit {index}"
    if not isinstance(raw, dict):
        raise HTTPError(422, f"{where} must be an object of the extension's unit fields, got {type(raw).__name__}")
    unit = dict(raw)
    for alias, field in ALIASES.items():
        if alias in unit:
            if unit.get(field) is not None and field != "low_vram":
                raise HTTPError(422, f"{where}: both {alias!r} and {field!r} are given; send {field!r} alone")
            unit[field] = unit.pop(alias)
    if "guessmode" in unit:  # the extension's first API: guess mode, what became "ControlNet is more important"
        guess = unit.pop("guessmode")
        if guess and "control_mode" not in unit:
            unit["control_mode"] = 2
    enabled = unit.get("enabled", None)
    if enabled is False or enabled in (0, "false", "False"):
        return None
    model = unit.get("model")
    if enabled is None and model in (None, "", "None") and unit.get("image") is None:
        return None  # an empty slot
    if not isinstance(model, str) or model.strip() in ("", "None"):
        raise HTTPError(422, f"{where} is enabled but names no model; choose one of GET /controlnet/model_list")
    for field, what in UNSUPPORTED.items():
        if unit.get(field) not in (None, [], "", {}):
            raise HTTPError(422, f"{where}: {field} ({what}) is not supported by this server; leave it out")
    if unit.get("input_mode") not in (None, "simple", "Simple", 0):
        raise HTTPError(422, f"{where}: input_mode {unit['input_mode']!r} is not supported; send single pictures")
    module = unit.get("module", "none")
    try:
        found = preprocessors.find(module if module is not None else "none")
    except InvalidRequest as err:
        raise HTTPError(422, f"{where}: {err}") from err
    image, mask = _pictures(state, unit.get("image"), unit.get("mask"), where)
    values = {}
    for field in ("processor_res", "threshold_a", "threshold_b"):
        value = unit.get(field, -1)
        try:
            preprocessors.check_value(found, field, value, where)
        except InvalidRequest:
            if value not in (None, -1):  # the extension resets what is outside the slider to its default
                notes.append(f"{where}: {field} {value!r} is outside {found.name}'s range; its default was used")
            value = -1
        values[field] = value
    return ControlUnit(
        model=model, image=image, mask=mask, module=found.name,
        weight=unit.get("weight", 1.0), guidance_start=unit.get("guidance_start", 0.0),
        guidance_end=unit.get("guidance_end", 1.0), control_mode=unit.get("control_mode", "Balanced"),
        resize_mode=unit.get("resize_mode", "Crop and Resize"), pixel_perfect=bool(unit.get("pixel_perfect", False)),
        **values,
    )


def _pictures(state: ServerState, image: Any, mask: Any, where: str):
    """(image, mask) of a unit's ``image`` (base64, {"image", "mask"}, [image, mask], or a list of one such)."""
    if isinstance(image, list) and image and isinstance(image[0], dict):
        if len(image) > 1:
            raise HTTPError(422, f"{where}: several pictures in one unit (batch / IP-Adapter) are not supported")
        image = image[0]
    if isinstance(image, list | tuple):
        if len(image) != 2:
            raise HTTPError(422, f"{where}: image as a list is [image, mask]")
        image, mask = image
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    if image is not None and not isinstance(image, str):
        raise HTTPError(422, f"{where}: image must be a base64-encoded picture")
    if mask is not None and not isinstance(mask, str):
        raise HTTPError(422, f"{where}: mask must be a base64-encoded picture")
    decoded = state.decode_image(image, f"{where} image") if image else None
    decoded_mask = state.decode_image(mask, f"{where} mask") if mask else None
    return decoded, decoded_mask


# ---- routes ---------------------------------------------------------------------------------------------------


def _library(request: Request):
    return getattr(_state(request).engine, "controlnets", None)


@router.get("/version")
async def version():
    return {"version": API_VERSION}


@router.get("/model_list")
def model_list(request: Request, update: bool = True):
    """The library's ControlNets as the extension names them ("name [hash]"), sorted by name."""
    library = _library(request)
    return {"model_list": [f.title for f in library.files()] if library is not None else []}


@router.get("/module_list")
async def module_list(alias_names: bool = False):
    """The preprocessors (the extension's names, or with ``alias_names`` its UI labels) and their sliders; the
    weighted ones are listed too (``model_free: false``): they need annotator weights this version does not run."""
    names = [p.label if alias_names else p.name for p in preprocessors.PREPROCESSORS]
    detail = {p.label if alias_names else p.name: p.to_json() for p in preprocessors.PREPROCESSORS}
    return {"module_list": names, "module_detail": detail}


@router.get("/settings")
async def settings():
    return {"control_net_unit_count": MAX_CONTROL_UNITS}


class DetectRequest(BaseModel):
    """The extension's /controlnet/detect body."""

    model_config = ConfigDict(extra="ignore")
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


@router.post("/detect")
async def detect(body: DetectRequest, request: Request):
    """The extension's preprocessor preview: each picture's map, as base64 PNG, at the preprocessor's own size."""
    state = _state(request)
    from ..engine.controlnet import library_root

    root = library_root(_library(request))
    try:
        found = preprocessors.find(body.controlnet_module, root)
    except InvalidRequest as err:
        raise HTTPError(422, f"Module not available: {err}") from err
    if found.run is None:
        raise HTTPError(422, preprocessors.missing(found, root))
    if not body.controlnet_input_images:
        raise HTTPError(422, "No image selected")
    if len(body.controlnet_input_images) > state.settings.max_images:
        raise HTTPError(422, f"{len(body.controlnet_input_images)} pictures is over this server's limit of "
                             f"{state.settings.max_images} a request")
    values = {}
    for field, value in (("processor_res", body.controlnet_processor_res), ("threshold_a", body.controlnet_threshold_a),
                         ("threshold_b", body.controlnet_threshold_b)):
        try:
            preprocessors.check_value(found, field, value, "detect")
        except InvalidRequest:
            value = -1  # as the extension: its default
        values[field] = value

    def run() -> list[str]:
        from PIL import Image

        out = []
        for i, data in enumerate(body.controlnet_input_images):
            image = state.decode_image(data, f"controlnet_input_images[{i}]")
            detected = preprocessors.detect(found, image, values["processor_res"], values["threshold_a"],
                                            values["threshold_b"])
            buf = io.BytesIO()
            Image.fromarray(detected).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out

    return {"images": await anyio.to_thread.run_sync(run), "info": "Success"}

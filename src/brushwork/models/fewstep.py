"""Few-step models: SD-Turbo, SDXL-Turbo and LCM, and what each needs where a request leaves it open.

A Turbo model's weights look like any other of its family (SD-Turbo's keys are SD 2.1's, SDXL-Turbo's SDXL's),
so what makes one is read, first found wins, from: the request (``--turbo`` / ``--no-turbo``), the file's
``brushwork.defaults`` (``{"turbo": true}``), its ``modelspec`` metadata (an architecture, title or usage hint
that says "turbo"), and a table of the official files by hash. An LCM model's UNet says so itself: it embeds the
guidance scale (diffusers' ``time_cond_proj_dim``; ``time_embedding.cond_proj`` in a single file).

A kind's recommendation (``PROFILES``: steps, CFG, sampler, schedule type, size) fills only what the request
leaves open, under the file's own ``brushwork.defaults``. Torch-free: the model list reads it for every file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# What each kind needs. Turbo (adversarial diffusion distillation): 1-4 steps on trailing timesteps (A1111's
# SGM Uniform), no CFG (CFG 1: one UNet pass a step), 512x512 for SD-Turbo and SDXL-Turbo alike, Euler a as
# Stability's model cards. LCM: diffusers' LatentConsistencyModelPipeline defaults, 4 steps and guidance 8.5, which
# an LCM UNet takes as its w-embedding (guidance - 1), not as CFG: one UNet pass a step, no batch doubling.
PROFILES: dict[str, dict[str, Any]] = {
    "turbo": {"steps": 1, "cfg_scale": 1.0, "sampler": "Euler a", "scheduler": "SGM Uniform", "width": 512,
              "height": 512},
    "lcm": {"steps": 4, "cfg_scale": 8.5, "sampler": "LCM"},
}
LABELS = {"turbo": "a Turbo model", "lcm": "an LCM model"}
# An LCM-LoRA (latent-consistency/lcm-lora-sdv1-5, -sdxl, -ssd-1b) on an ordinary model: the LCM sampler, 4 steps
# and no CFG, as its model cards run it (2-8 steps; "disable guidance_scale or use values between 1.0 and 2.0")
LCM_LORA_PROFILE: dict[str, Any] = {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}

# Official few-step files, by A1111's short hash (the first 10 hex digits of the file's sha256), as Hugging Face
# lists them ("Git LFS Details"). Fine-tunes are not listed: they say so with --turbo or in their metadata.
KNOWN_FEWSTEP_BY_HASH: dict[str, tuple[str, str]] = {
    "3f067a1b94": ("turbo", "sd_turbo.safetensors"),  # stabilityai/sd-turbo
    "e869ac7d69": ("turbo", "sd_xl_turbo_1.0_fp16.safetensors"),  # stabilityai/sdxl-turbo (main)
    "5234ee2a6b": ("turbo", "sd_xl_turbo_1.0_fp16.safetensors"),  # stabilityai/sdxl-turbo, upload e6286c6
    # stabilityai/sdxl-turbo's fp32 file, as its hub duplicates list it (its own page was not at hand)
    "2e58e3704b": ("turbo", "sd_xl_turbo_1.0.safetensors"),
}
# The official diffusers folders, by hub id: a hub download's cache folder, or a folder named as the repository
KNOWN_FEWSTEP_BY_HUB_ID: dict[str, str] = {"stabilityai/sd-turbo": "turbo", "stabilityai/sdxl-turbo": "turbo"}

DEFAULTS_KEY = "brushwork.defaults"  # safetensors metadata: JSON, e.g. {"cfg_scale": 2.0, "cfg_end": 0.85}
_MODELSPEC_HINTS = ("modelspec.architecture", "modelspec.title", "modelspec.usage_hint")
_TURBO_WORD = re.compile(r"(?<![a-z])turbo(?![a-z])", re.IGNORECASE)
_LCM_WORD = re.compile(r"(?<![a-z0-9])lcm", re.IGNORECASE)  # lcm-lora-sdv1-5, LCM_LoRA_SDXL, lcmlora
_LCM_LORA_METADATA = ("ss_output_name", "modelspec.title", "modelspec.architecture")


def known_file(short_hash: str | None) -> tuple[str, str] | None:
    """(kind, official file name) of a known few-step file, by its short hash (any case); None if not listed."""
    return KNOWN_FEWSTEP_BY_HASH.get((short_hash or "").strip().lower())


def kind_of_file(metadata: dict[str, str], short_hash=lambda: None) -> tuple[str | None, str]:
    """(kind or None, why) of a single file, from its metadata, else its hash (``short_hash()`` is only called
    when the metadata say nothing). An LCM UNet is read from the weights instead (``kind_for``)."""
    raw = _raw_defaults(metadata)
    if isinstance(raw.get("turbo"), bool):
        return ("turbo" if raw["turbo"] else None), f"its {DEFAULTS_KEY}"
    for key in _MODELSPEC_HINTS:
        if _TURBO_WORD.search(str(metadata.get(key, ""))[:1000]):
            return "turbo", f"its {key}"
    known = known_file(short_hash())
    if known:
        return known[0], f"known file {known[1]}"
    return None, ""


def kind_of_folder(path) -> tuple[str | None, str]:
    """(kind or None, why) of a diffusers folder: an official one by hub id (its cache folder's name, or the folder
    named as the repository)."""
    parts = {part.lower() for part in Path(path).parts}
    for hub_id, kind in KNOWN_FEWSTEP_BY_HUB_ID.items():
        if "models--" + hub_id.lower().replace("/", "--") in parts or Path(path).name.lower() == hub_id.split("/")[1]:
            return kind, f"known model {hub_id}"
    return None, ""


def kind_for(parts, turbo: bool | None) -> tuple[str | None, str]:
    """(kind, why) a run on these loaded parts uses: the request's ``turbo`` first, then an LCM UNet (its guidance
    embedding), then what the loader found (``parts.fewstep``)."""
    if turbo is True:
        return "turbo", "--turbo"
    if getattr(getattr(parts.unet, "config", None), "time_cond_proj_dim", None):
        return "lcm", "its UNet embeds the guidance scale"
    if turbo is False:
        return None, ""
    return getattr(parts, "fewstep", None), getattr(parts, "fewstep_why", "")


# ---- brushwork.defaults: a model's own recommendation -------------------------------------------------------


def _raw_defaults(metadata: dict[str, str]) -> dict:
    try:
        raw = json.loads(metadata.get(DEFAULTS_KEY, "{}"))
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) else {}


def file_defaults(metadata: dict[str, str]) -> dict[str, Any]:
    """The settings a file recommends (``brushwork.defaults``), each checked as the request checks that field;
    anything unknown or out of range is left out (never fatal: the request's usual default applies)."""
    raw = _raw_defaults(metadata)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        checked = _check(key, value)
        if checked is not None:
            out[key] = checked
    return out


def _check(key: str, value: Any) -> Any:
    """``value`` as the request field ``key`` takes it, or None when the request would refuse it."""
    import dataclasses

    from ..errors import InvalidRequest
    from ..request import MAX_SIDE, GenerationRequest, _check_number

    if isinstance(value, bool) or value is None:
        return None
    if key in ("steps", "cfg_scale", "cfg_end"):
        if key == "steps" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key == "cfg_end":
            ok = isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1
            return float(value) if ok else None
        spec = {f.name: f.metadata for f in dataclasses.fields(GenerationRequest)}[key]
        try:
            _check_number(value, spec)
        except InvalidRequest:
            return None
        return value if key == "steps" else float(value)
    if key in ("width", "height"):
        ok = isinstance(value, int) and 8 <= value <= MAX_SIDE and value % 8 == 0
        return value if ok else None
    if key in ("sampler", "scheduler"):
        from ..engine.samplers import parse_sampler

        if not isinstance(value, str) or len(value) > 100:
            return None
        try:
            _, schedule = parse_sampler(value) if key == "sampler" else parse_sampler("Euler", value)
        except InvalidRequest:
            return None
        return value.strip() if key == "sampler" else schedule  # a sampler as named ("DPM++ 2M Karras")
    return None


def recommended(metadata: dict[str, str], shapes: dict | None = None, short_hash: str | None = None) -> dict[str, Any]:
    """What a file recommends without loading it: its few-step kind's profile (from its metadata, its short hash
    when one is known already, or an LCM UNet from ``shapes``) under its own ``brushwork.defaults``."""
    kind, _ = kind_of_file(metadata, lambda: short_hash)
    if kind is None and shapes and any(k.endswith("time_embedding.cond_proj.weight") for k in shapes):
        kind = "lcm"
    return {**PROFILES.get(kind, {}), **file_defaults(metadata)}


def lcm_lora_why(name: str, folders, metadata: dict) -> str | None:
    """Why a LoRA file is an LCM-LoRA (its file name, a folder it is in, or its metadata says "lcm"), or None.
    The official files are ``pytorch_lora_weights.safetensors`` in the hub repositories
    ``latent-consistency/lcm-lora-*``: saved under that name, the folder (or the hub cache's
    ``models--latent-consistency--lcm-lora-*``) says it; renamed, as A1111 users do (``lcm-lora-sdv1-5``), the name."""
    if _LCM_WORD.search(name or ""):
        return f"its name {name}"
    for part in folders:  # the folders it is in, under the library's lora/ folder
        if _LCM_WORD.search(part):
            return f"its folder {part}"
    for key in _LCM_LORA_METADATA:
        value = metadata.get(key)
        if isinstance(value, str) and _LCM_WORD.search(value[:1000]):
            return f"its {key}"
    return None

"""Each ``GenerationRequest`` field is reachable from the CLI, both HTTP APIs and the infotext, or says here why
not: the next field added without its front ends fails this test, by name."""

from __future__ import annotations

import dataclasses

import pytest

from brushwork.request import GenerationRequest

FIELDS = [f.name for f in dataclasses.fields(GenerationRequest)]

# field -> the CLI option's parameter name where it differs from the field's
CLI_NAMES = {"prompt": "prompt_arg", "scheduler": "schedule", "init_image": "init_img", "mask_image": "mask",
             "inpainting_fill": "fill", "inpaint_full_res": "only_masked", "inpaint_full_res_padding": "padding",
             "inpainting_mask_invert": "invert_mask", "watermark": "no_watermark", "config": "config_yaml",
             "controlnet": "control"}
# field -> A1111's request field (txt2img or img2img) or option (override_settings / POST /options)
SDAPI_NAMES = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "model": "sd_model_checkpoint", "vae": "sd_vae",
    "sampler": "sampler_name", "scheduler": "scheduler", "steps": "steps", "cfg_scale": "cfg_scale",
    "cfg_end": "cfg_end", "seed": "seed", "width": "width", "height": "height", "batch_size": "batch_size",
    "n_iter": "n_iter", "eta": "eta", "clip_skip": "CLIP_stop_at_last_layers",
    "token_merging_ratio": "token_merging_ratio", "emphasis": "emphasis",
    "comma_padding_backtrack": "comma_padding_backtrack", "init_image": "init_images",
    "strength": "denoising_strength", "mask_image": "mask", "mask_blur": "mask_blur",
    "inpainting_fill": "inpainting_fill", "inpaint_full_res": "inpaint_full_res",
    "inpaint_full_res_padding": "inpaint_full_res_padding", "inpainting_mask_invert": "inpainting_mask_invert",
    "hires_scale": "hr_scale", "hires_resize_x": "hr_resize_x", "hires_resize_y": "hr_resize_y",
    "hires_upscaler": "hr_upscaler", "hires_steps": "hr_second_pass_steps", "hires_strength": "denoising_strength",
    "hires_sampler": "hr_sampler_name", "hires_scheduler": "hr_scheduler", "hires_prompt": "hr_prompt", "hires_negative_prompt": "hr_negative_prompt",
    "refiner": "refiner_checkpoint", "refiner_switch_at": "refiner_switch_at", "hires_checkpoint": "hr_checkpoint_name",
    "controlnet": "alwayson_scripts",  # A1111's ControlNet extension: {"controlnet": {"args": [unit, ...]}}
}
# field -> (infotext key, a value as written)
INFOTEXT = {
    "steps": ("Steps", "20"), "sampler": ("Sampler", "Euler"), "scheduler": ("Schedule type", "Karras"),
    "cfg_scale": ("CFG scale", "7"), "cfg_end": ("CFG end", "0.8"), "seed": ("Seed", "3"),
    "width": ("Size", "64x48"), "height": ("Size", "64x48"), "model": ("Model", "tiny"), "eta": ("Eta", "0.5"),
    "clip_skip": ("Clip skip", "2"), "token_merging_ratio": ("Token merging ratio", "0.5"),
    "emphasis": ("Emphasis", "No norm"), "strength": ("Denoising strength", "0.6"),
    "mask_blur": ("Mask blur", "8"), "inpainting_fill": ("Masked content", "fill"),
    "inpaint_full_res": ("Inpaint area", "Only masked"), "inpaint_full_res_padding": ("Masked area padding", "40"),
    "inpainting_mask_invert": ("Mask mode", "Inpaint not masked"), "hires_scale": ("Hires upscale", "2"),
    "hires_resize_x": ("Hires resize", "96x64"), "hires_resize_y": ("Hires resize", "96x64"),
    "hires_upscaler": ("Hires upscaler", "Lanczos"), "hires_steps": ("Hires steps", "5"),
    "hires_sampler": ("Hires sampler", "Euler"), "hires_scheduler": ("Hires schedule type", "Karras"), "hires_prompt": ("Hires prompt", "more detail"),
    "hires_negative_prompt": ("Hires negative prompt", "blur"), "prompt": (None, None),
    "hires_strength": ("Hires upscale", "2, Denoising strength: 0.5"),  # the second pass's, beside a Hires key
    "negative_prompt": (None, None), "fast": ("Fast mode", "3"),
    "noise_level": ("Noise level", "40"), "tile_size": ("Tile size", "96"), "tile_overlap": ("Tile overlap", "16"),
    "refiner": ("Refiner", "tiny-xl-refiner [0123456789]"), "refiner_switch_at": ("Refiner switch at", "0.5"),
    "hires_checkpoint": ("Hires checkpoint", "tiny-b [0123456789]"),
}
WHY_NOT = {
    "cli": {"mode": "the command's name (txt2img, img2img, inpaint)",
            "fallbacks": "/sdapi's: A1111's defaults for what its client leaves out (the CLI has its own)"},
    "native": {"device": "the server owner's (settings)",
               "memory": "the server owner's (settings)", "config": "a file path: models by name only",
               "save_depth": "a file beside the pictures: the command line's and Python's",
               "fallbacks": "/sdapi's: A1111's defaults for what its client leaves out (null is the model's here)"},
    "sdapi": {"mode": "the route (txt2img / img2img)", "prediction": "read from the model", "device": "the owner's",
              "memory": "the owner's", "precision": "the owner's", "watermark": "the owner's setting",
              "config": "a file path", "fast": "not in A1111; the native API and the web UI have it",
              "turbo": "not in A1111 (read from the model there); the native API and the CLI have it",
              "depth_map": "A1111's img2img on a depth model estimates it (the native API takes one)",
              "save_depth": "not in A1111",
              "noise_level": "A1111 has no SD x4 upscaler: the native API and the CLI run it",
              "tile_size": "the SD x4 upscaler's (native API, CLI)", "tile_overlap": "the SD x4 upscaler's",
              "fallbacks": "set by the route: A1111's defaults for what the client left out"},
    "infotext": {"mode": "what the picture is", "vae": "written as VAE, chosen by the reader", "mask_image": "an image",
                 "depth_map": "an image", "save_depth": "not the picture's",
                 "init_image": "an image", "prediction": "read from the model", "device": "not the picture's",
                 "memory": "not the picture's", "precision": "not the picture's", "watermark": "not the picture's",
                 "config": "not the picture's",
                 "turbo": "what it fills is written (Steps, CFG scale, Schedule type, Size): they remake the picture",
                 "comma_padding_backtrack": "A1111 does not write it", "batch_size": "one picture each",
                 "n_iter": "one picture each",
                 "controlnet": "each unit is written (ControlNet N, as the extension) but its picture is not",
                 "fallbacks": "what they fill is written (Steps, CFG scale, Sampler, Size)"},
}


def _cli_params() -> set[str]:
    from brushwork import cli

    names: set[str] = set()
    for command in ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "depth2img"):
        names |= {p.name for p in cli.main.commands[command].params}
    return names


@pytest.mark.parametrize("name", FIELDS)
def test_each_field_is_reachable_from_every_front_end_or_says_why_not(name):
    from brushwork.output.infotext import request_from_infotext
    from brushwork.server.api import JobRequest
    from brushwork.server.sdapi import Img2ImgRequest, Txt2ImgRequest

    missing = []
    if name not in WHY_NOT["cli"] and CLI_NAMES.get(name, name) not in _cli_params():
        missing.append("the CLI")
    if name not in WHY_NOT["native"] and name not in JobRequest.model_fields:
        missing.append("the native API (api.JobRequest)")
    if name not in WHY_NOT["sdapi"]:
        a1111 = SDAPI_NAMES.get(name)
        known = set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields)
        if a1111 is None or (a1111 not in known and not _sdapi_reads_option(a1111)):
            missing.append("/sdapi/v1 (sdapi.py)")
    if name not in WHY_NOT["infotext"]:
        key, value = INFOTEXT.get(name, (None, None)) if name in INFOTEXT else ("?", "?")
        text = "a cat\nNegative prompt: a dog\nSteps: 20, Sampler: Euler, Seed: 1"
        if key is not None:
            text += f", {key}: {value}"
        if name not in request_from_infotext(text):
            missing.append("the infotext (output/infotext.py request_from_infotext)")
    assert not missing, f"GenerationRequest.{name} cannot be set from {', '.join(missing)}; add it there, or say " \
                        "why not in tests/test_fields.py"


def _sdapi_reads_option(option: str) -> bool:
    """An A1111 option that ``/sdapi`` takes from override_settings or POST /options (sdapi.py reads it)."""
    import inspect

    from brushwork.server import sdapi

    return f'"{option}"' in inspect.getsource(sdapi._to_request)


def test_fast_mode_is_reachable_everywhere():
    from brushwork.output.infotext import request_from_infotext
    from brushwork.server.api import JobRequest

    assert "fast" in _cli_params() and "fast" in JobRequest.model_fields
    assert request_from_infotext("x\nSteps: 2, Sampler: Euler, Seed: 1, Fast mode: 3")["fast"] == 3

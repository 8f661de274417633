"""The ``brushwork`` command: a thin shell over ``Engine`` (imports no torch until a command runs).

The research scripts' spellings keep working: ``txt2img --prompt "..." --plms --ckpt sd-v1-4.ckpt
--skip_grid --n_samples 1 --ddim_steps 50 --scale 7.5 --H 512 --W 512 --n_iter 1 --outdir DIR``.
User mistakes print one ``error:`` line naming the problem and the fix, and exit non-zero.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from .engine.samplers import SCHEDULE_TYPES  # a torch-free table
from .request import BrushworkError

EXIT_USER_ERROR = 1


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


def friendly_errors(fn):
    """Turn library errors into one line and a non-zero exit; tracebacks only with BRUSHWORK_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrushworkError as err:
            if os.environ.get("BRUSHWORK_DEBUG"):  # the whole chain: what went wrong underneath, and where
                import traceback

                traceback.print_exc(file=sys.stderr)
            _fail(str(err))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as err:
            if os.environ.get("BRUSHWORK_DEBUG"):
                raise
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            _fail(f"unexpected {type(err).__name__}: {first} (run with BRUSHWORK_DEBUG=1 to see the traceback)")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="brushwork", prog_name="brushwork")
def main() -> None:
    """brushwork: Stable Diffusion on your own machine (CPU or GPU, offline).

    \b
      brushwork txt2img "a hamster painting with a brush" --model sd-v1-4.ckpt
      brushwork img2img "a bird on a branch" --init-img bird.png --strength 0.8
      brushwork serve                        # web UI + HTTP API on 127.0.0.1:7860
    """


def generation_options(fn):
    opts = [
        click.argument("prompt_arg", metavar="PROMPT", required=False),
        click.option("--prompt", "prompt_opt", help="The prompt (same as the PROMPT argument)."),
        click.option("--negative-prompt", "--negative_prompt", "-N", default="", help="What to keep out."),
        click.option("--model", "--ckpt", "model", help="Checkpoint file, diffusers folder, library name or hub id."),
        click.option("--vae", help="A VAE file or folder to use instead of the model's own; taesd / taesdxl: the "
                                   "tiny decoder from the library's vae-approx/ (much faster, less detail)."),
        click.option("--refiner", default=None, help="SDXL: a refiner model (file, folder or library name) for the "
                                                     "last steps (A1111's Refiner)."),
        click.option("--refiner-switch-at", "refiner_switch_at", type=float, default=0.8, show_default=True,
                     help="With --refiner: the fraction of the steps the model runs before the refiner takes over."),
        click.option("--config", "config_yaml", type=click.Path(dir_okay=False),
                     help="The model's original .yaml config (tells SD 2.x v-prediction from eps)."),
        click.option("--prediction", type=click.Choice(["eps", "v"]), help="Prediction type (SD 2.x 768 = v)."),
        click.option("--sampler", default=None, help='Sampler, e.g. "Euler a", "DPM++ 2M Karras", ddim, plms, LCM '
                                                     "[the model's recommendation (an LCM model: LCM), else Euler a]."),
        click.option("--scheduler", "--schedule", "schedule", default="Automatic",
                     help=f"Schedule type: {', '.join(SCHEDULE_TYPES)}."),
        click.option("--plms", is_flag=True, help="Use the PLMS sampler (research scripts' flag)."),
        click.option("--dpm", is_flag=True, help="Use DPM++ 2M (Stability v2 scripts' flag)."),
        click.option("--steps", "--ddim_steps", "--ddim-steps", "steps", type=int, default=None,
                     help="Sampling steps [the model's recommendation (SD-Turbo: 1, LCM: 4), else 20]."),
        click.option("--cfg-scale", "--cfg_scale", "--scale", "cfg_scale", type=float, default=None,
                     help="Classifier-free guidance scale [the model's recommendation, else 7]."),
        click.option("--turbo/--no-turbo", "turbo", default=None,
                     help="A Turbo model (SD-Turbo, SDXL-Turbo): 1 step, CFG 1, SGM Uniform, 512x512 where not given "
                          "[read from the file: its metadata, or the official files' hashes]."),
        click.option("--cfg-end", "cfg_end", type=float, default=None,
                     help="Fraction of the steps that use CFG; the last ones follow the prompt alone "
                          "[the model's recommendation, else 1]."),
        click.option("--seed", type=int, default=-1, help="Seed; -1 = random (the seed used is printed)."),
        click.option("--width", "--W", "-W", "width", type=int, help="Width in pixels (multiple of 8)."),
        click.option("--height", "--H", "-H", "height", type=int, help="Height in pixels (multiple of 8)."),
        click.option("--n-samples", "--n_samples", "--batch-size", "-n", "batch_size", type=int, default=1,
                     show_default=True, help="Images per batch."),
        click.option("--n-iter", "--n_iter", "n_iter", type=int, default=1, show_default=True,
                     help="Batches to run."),
        click.option("--ddim-eta", "--ddim_eta", "--eta", "eta", type=float, default=0.0,
                     help="Eta for DDIM/ancestral noise."),
        click.option("--clip-skip", "--clip_skip", "clip_skip", type=int, default=1, help="A1111 CLIP skip."),
        click.option("--grid/--skip-grid", "grid", default=True, help="Also save a grid of the batch."),
        click.option("--n-rows", "--n_rows", "n_rows", type=int, default=0, help="Rows in the grid [about square]."),
        click.option("--from-file", "--from_file", "from_file", type=click.Path(dir_okay=False),
                     help="Read prompts from a file, one a line (each one is a run)."),
        click.option("--skip_grid", "skip_grid_legacy", is_flag=True, hidden=True),
        click.option("--outdir", type=click.Path(file_okay=False), help="Output folder [outputs]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--precision", default="auto", show_default=True,
                     type=click.Choice(["auto", "fp32", "fp16", "bf16", "full", "autocast"]),
                     help="Number format; 'full' = fp32, 'autocast' = auto (research scripts)."),
        click.option("--bf16", is_flag=True, hidden=True),
        click.option("--memory", default="auto", show_default=True,
                     type=click.Choice(["auto", "high", "medium", "low", "minimal"]), help="GPU memory mode."),
        click.option("--fast", is_flag=True,
                     help="Fast mode: reuse the UNet's deep features between steps (DeepCache; ~1.4x, a little "
                          "less faithful)."),
        click.option("--token-merging-ratio", "--tome", "token_merging_ratio", type=float, default=0.0,
                     help="Token merging (ToMe, as A1111's option): 0.3-0.5 is faster and a little softer [0 = off]."),
        click.option("--emphasis", default="Original", show_default=True,
                     help="How (word:1.5) weights apply, as A1111's option: Original (then each 75-token chunk's "
                          "mean is restored), 'No norm', Ignore (weights read, not applied), None (brackets are text)."),
        click.option("--comma-padding-backtrack", "comma_padding_backtrack", type=int, default=20, show_default=True,
                     help="A full 75-token chunk ends at a comma at most this many tokens back, as A1111 [0 = off]."),
        click.option("--compile", "compile_unet", is_flag=True,
                     help="torch.compile the UNet (slow first image, faster after; for long sessions)."),
        click.option("--backend", type=click.Choice(["auto", "torch", "openvino"]), default=None,
                     help="Where a CPU runs the UNet, VAE decoder and text encoders: auto (OpenVINO for full-size models where "
                          "installed), torch, openvino (pip install 'brushwork[openvino]'; converted once, cached)."),
        click.option("--threads", type=int, help="CPU threads [one per physical core]."),
        click.option("--no-watermark", "no_watermark", is_flag=True, help="Do not embed the invisible watermark."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the file paths."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _quiet_libraries() -> None:
    """transformers/diffusers chatter (e.g. about torchvision) is not for our users; BRUSHWORK_DEBUG shows it."""
    if not os.environ.get("BRUSHWORK_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _request(mode: str, o: dict, **extra):
    from .request import GenerationRequest, InvalidRequest, Mode, Precision
    from .settings import Settings

    _quiet_libraries()
    prompt = o["prompt_opt"] if o["prompt_opt"] is not None else o["prompt_arg"]
    if prompt is None and o.get("from_file"):
        prompt = ""  # replaced by each line of the file
    if prompt is None:
        raise InvalidRequest('give a prompt: brushwork txt2img "a red circle on a white background"')
    sampler = o["sampler"] or ("PLMS" if o["plms"] else "DPM++ 2M" if o["dpm"] else None)  # None: the model's
    precision = {"full": "fp32", "autocast": "auto"}.get(o["precision"], o["precision"])
    if o["bf16"]:
        precision = "bf16"
    if o["threads"] is not None and o["threads"] < 1:
        raise InvalidRequest(f"--threads must be 1 or more, got {o['threads']}")
    settings = Settings.load(compile=o["compile_unet"] or None, threads=o["threads"], backend=o["backend"])
    if "control" in o:  # the commands with ControlNet units (txt2img, img2img, inpaint, outpaint)
        extra.setdefault("controlnet", _control_units(o))
    req = GenerationRequest(
        prompt=prompt, negative_prompt=o["negative_prompt"], mode=Mode(mode), model=o["model"], vae=o["vae"],
        sampler=sampler, scheduler=o["schedule"], steps=o["steps"], cfg_scale=o["cfg_scale"],
        cfg_end=o["cfg_end"], seed=o["seed"], width=o["width"], height=o["height"], batch_size=o["batch_size"], n_iter=o["n_iter"],
        eta=o["eta"], clip_skip=o["clip_skip"], token_merging_ratio=o["token_merging_ratio"], prediction=o["prediction"], device=o["device"],
        emphasis=o["emphasis"], comma_padding_backtrack=o["comma_padding_backtrack"],
        refiner=o["refiner"], refiner_switch_at=o["refiner_switch_at"], turbo=o["turbo"],
        precision=Precision(precision), memory=o["memory"],
        watermark=settings.watermark and not o["no_watermark"], **extra,
    )
    if o["config_yaml"]:
        if not Path(o["config_yaml"]).is_file():
            raise InvalidRequest(f"config file not found: {o['config_yaml']} (--config takes the model's .yaml)")
        req.config = o["config_yaml"]
    if o["fast"]:
        req.fast = 3
    return settings, req.validate()


def _prompts_from_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BrushworkError(f"cannot read prompts from {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise BrushworkError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BrushworkError(f"{path} holds no prompts (one prompt a line)")
    return prompts


def _run(settings, req, o: dict) -> None:
    """Run the request (once per prompt with --from-file) and print the files written."""
    import dataclasses

    from .engine.core import Engine

    engine = Engine(settings)
    prompts = _prompts_from_file(o["from_file"]) if o.get("from_file") else [req.prompt]
    for prompt in prompts:
        _run_one(engine, settings, dataclasses.replace(req, prompt=prompt), o)


def _run_one(engine, settings, req, o: dict) -> None:
    from .output.files import save_result

    bar = None
    quiet = o["quiet"]

    def progress(info):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=info.total * info.batches, unit="step", file=sys.stderr, dynamic_ncols=True,
                       desc="sampling")
        bar.n = info.batch * info.total + info.step
        bar.refresh()

    try:
        result = engine.generate(req, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    outdir = Path(o["outdir"]) if o["outdir"] else settings.outputs_dir
    paths = save_result(result, outdir, grid=o["grid"] and not o["skip_grid_legacy"], grid_rows=o["n_rows"] or None)
    if not quiet:
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        seeds = result.seeds
        seed_text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}"
        click.echo(f"model {result.model_name} [{result.model_hash}], seed {seed_text}, "
                   f"{result.timings.get('total_s', 0):.1f}s", err=True)
    for path in paths:
        click.echo(str(path))


def _hires_options(fn):
    from .request import HIRES_UPSCALERS

    opts = [
        click.option("--hires-scale", type=float, default=None,
                     help="Hires fix: make the picture at --width x --height, upscale it this much (rounded down to "
                          "a multiple of 8) and denoise it again at that size (A1111's hr_scale; 1 = off)."),
        click.option("--hires-resize-x", type=int, default=0, help="Hires fix: this target width instead of a scale "
                     "(0 = from the height and the aspect ratio)."),
        click.option("--hires-resize-y", type=int, default=0, help="Hires fix: this target height (both: scaled to "
                     "cover, then centre-cropped)."),
        click.option("--hires-upscaler", default="Latent", show_default=True,
                     help=f"Hires fix upscaler: {', '.join(HIRES_UPSCALERS)}, or an upscaler model "
                          "(.pth / .safetensors: ESRGAN, ...) in the library's upscalers/ folder, by file name."),
        click.option("--hires-steps", type=int, default=0, help="Hires fix: steps of the second pass (0 = --steps)."),
        click.option("--hires-strength", type=float, default=0.7, show_default=True,
                     help="Hires fix: denoising strength of the second pass."),
        click.option("--hires-sampler", default=None, help="Hires fix: the second pass's sampler (default: --sampler)."),
        click.option("--hires-schedule", "hires_scheduler", default=None,
                     help="Hires fix: the second pass's schedule type (default: --schedule)."),
        click.option("--hires-prompt", default="", help="Hires fix: the second pass's prompt (default: the prompt)."),
        click.option("--hires-negative-prompt", default="", help="Hires fix: the second pass's negative prompt."),
        click.option("--hires-checkpoint", default=None,
                     help="Hires fix: run the second pass on this model (file, folder or library name) of the same "
                          "kind as --model (SD 1.x/2.x or SDXL) instead (A1111's Hires checkpoint)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _control_options(fn):
    from .engine.preprocessors import PREPROCESSORS

    modules = ", ".join(p.name for p in PREPROCESSORS if p.model_free)
    opts = [
        click.option("--control", "control", multiple=True, type=click.Path(dir_okay=False),
                     help="ControlNet: a picture a unit follows. Repeat it (with --control-model) for several "
                          "units; each --control-* option is given once for every unit or once per unit, in order. "
                          "img2img / inpaint: a unit without one follows the init image."),
        click.option("--control-model", "control_model", multiple=True,
                     help="ControlNet: a model of the library's controlnet/ folder (name or 'name [hash]'), or a "
                          "file / diffusers folder."),
        click.option("--control-preprocessor", "--control-module", "control_preprocessor", multiple=True,
                     help=f"ControlNet: what is made of the picture first: {modules} [none]."),
        click.option("--control-weight", "control_weight", multiple=True, type=float, help="ControlNet weight, 0-2 [1]."),
        click.option("--control-start", "control_start", multiple=True, type=float,
                     help="ControlNet: the fraction of the steps after which it starts [0]."),
        click.option("--control-end", "control_end", multiple=True, type=float,
                     help="ControlNet: the fraction of the steps after which it stops [1]."),
        click.option("--control-mode", "control_mode", multiple=True,
                     help="ControlNet control mode: Balanced, prompt (My prompt is more important), controlnet "
                          "(ControlNet is more important) [Balanced]."),
        click.option("--control-resize", "control_resize", multiple=True,
                     help="ControlNet: how the map fits the size: crop (Crop and Resize), resize (Just Resize), "
                          "fill (Resize and Fill) [crop]."),
        click.option("--control-res", "control_res", multiple=True, type=int,
                     help="ControlNet: the preprocessor's resolution [512]."),
        click.option("--control-threshold-a", "control_threshold_a", multiple=True, type=float,
                     help="ControlNet: the preprocessor's first setting (canny: low threshold 100)."),
        click.option("--control-threshold-b", "control_threshold_b", multiple=True, type=float,
                     help="ControlNet: the preprocessor's second setting (canny: high threshold 200)."),
        click.option("--control-pixel-perfect", "control_pixel_perfect", is_flag=True,
                     help="ControlNet: run the preprocessors at the resolution that fits the output exactly."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


_CONTROL_OPTIONS = {"control_model": "model", "control_preprocessor": "module", "control_weight": "weight",
                    "control_start": "guidance_start", "control_end": "guidance_end", "control_mode": "control_mode",
                    "control_resize": "resize_mode", "control_res": "processor_res",
                    "control_threshold_a": "threshold_a", "control_threshold_b": "threshold_b"}


def _control_units(o: dict) -> list:
    """The ControlNet units of the --control* options, paired by position (an option given once is every unit's)."""
    from .output.images import open_image_file
    from .request import ControlUnit, InvalidRequest

    images = list(o.pop("control", ()) or ())
    values = {field: list(o.pop(option, ()) or ()) for option, field in _CONTROL_OPTIONS.items()}
    pixel_perfect = bool(o.pop("control_pixel_perfect", False))
    n = max(len(images), len(values["model"]))
    if not n:
        if any(values.values()):
            raise InvalidRequest("the --control-* options need a unit: give --control IMAGE --control-model NAME")
        return []
    if len(values["model"]) not in (1, n):
        raise InvalidRequest(f"{n} ControlNet units and {len(values['model'])} --control-model; give one model for "
                             "every unit, or one per --control")
    if images and len(images) != n:
        raise InvalidRequest(f"{n} --control-model and {len(images)} --control; give a picture per unit (img2img "
                             "and inpaint: no --control at all follows the init image)")
    units = []
    for i in range(n):
        kwargs = {}
        for field, given in values.items():
            if len(given) not in (0, 1, n):
                option = next(k for k, v in _CONTROL_OPTIONS.items() if v == field).replace("_", "-")
                raise InvalidRequest(f"--{option} is given {len(given)} times for {n} ControlNet units; give it once "
                                     "(for every unit) or once per unit")
            if given:
                kwargs[field] = given[i] if len(given) == n else given[0]
        image = open_image_file(images[i]) if images else None
        units.append(ControlUnit(image=image, pixel_perfect=pixel_perfect, **kwargs))
    return units


_HIRES_FIELDS = ("hires_scale", "hires_resize_x", "hires_resize_y", "hires_upscaler", "hires_steps", "hires_strength",
                 "hires_sampler", "hires_scheduler", "hires_prompt", "hires_negative_prompt", "hires_checkpoint")


@main.command()
@generation_options
@_hires_options
@_control_options
@friendly_errors
def txt2img(**o):
    """Make images from a text prompt (with --hires-scale: A1111's hires fix)."""
    hires = {name: o.pop(name) for name in _HIRES_FIELDS}
    settings, req = _request("txt2img", o, **hires)
    _run(settings, req, o)


@main.command()
@generation_options
@click.option("--init-img", "--init_img", "init_img", required=True, type=click.Path(dir_okay=False),
              help="The image to start from.")
@click.option("--strength", "--denoising-strength", type=float, default=0.75, show_default=True,
              help="How much to change it: 0 = keep, 1 = ignore it.")
@_control_options
@friendly_errors
def img2img(init_img, strength, **o):
    """Change an image guided by a prompt (the output size defaults to the input's, rounded to 8)."""
    from .output.images import open_image_file

    image = open_image_file(init_img)
    settings, req = _request("img2img", o, init_image=image, strength=strength)
    _run(settings, req, o)


def _inpaint_options(fn):
    opts = [
        click.option("--init-img", "--init_img", "init_img", type=click.Path(dir_okay=False),
                     help="The image to paint into."),
        click.option("--strength", "--denoising-strength", type=float, default=0.75, show_default=True,
                     help="How much to change the masked area: 0 = keep, 1 = ignore what was there."),
        click.option("--fill", "fill", type=click.Choice(["original", "fill", "latent-noise", "latent-nothing"]),
                     default="original", show_default=True,
                     help="What the masked area starts from (A1111's Masked content)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@generation_options
@_inpaint_options
@click.option("--mask", "mask", type=click.Path(dir_okay=False), help="White = repaint (an RGBA mask: its alpha).")
@click.option("--mask-blur", "mask_blur", type=int, default=4, show_default=True, help="Blur of the mask's edge, px.")
@click.option("--invert-mask", "invert_mask", is_flag=True, help="Repaint what the mask leaves black instead.")
@click.option("--only-masked", "only_masked", is_flag=True,
              help="Repaint only the mask's box (plus --padding) at the full size, then paste it back.")
@click.option("--padding", type=int, default=32, show_default=True, help="Pixels around the mask with --only-masked.")
@_control_options
@friendly_errors
def inpaint(init_img, strength, fill, mask, mask_blur, invert_mask, only_masked, padding, **o):
    """Repaint the white part of a mask (the output size defaults to the input's, rounded to 8)."""
    from .output.images import open_image_file
    from .request import InvalidRequest

    if init_img is None:
        raise InvalidRequest("inpaint needs an init image (--init-img)")
    if mask is None:
        raise InvalidRequest("inpaint needs a mask image (--mask): white = repaint, black = keep")
    settings, req = _request("inpaint", o, init_image=open_image_file(init_img), mask_image=open_image_file(mask),
                             strength=strength, mask_blur=mask_blur, inpainting_fill=fill.replace("-", " "),
                             inpaint_full_res=only_masked, inpaint_full_res_padding=padding,
                             inpainting_mask_invert=invert_mask)
    _run(settings, req, o)


@main.command()
@generation_options
@_inpaint_options
@click.option("--left", type=int, default=0, help="Pixels to add on the left.")
@click.option("--right", type=int, default=0, help="Pixels to add on the right.")
@click.option("--top", type=int, default=0, help="Pixels to add at the top.")
@click.option("--bottom", type=int, default=0, help="Pixels to add at the bottom.")
@_control_options
@friendly_errors
def outpaint(init_img, strength, fill, left, right, top, bottom, **o):
    """Grow the picture by borders and paint them (the canvas is rounded up to a multiple of 8)."""
    import dataclasses

    from .engine.tasks.outpaint import outpaint_request
    from .output.images import open_image_file
    from .request import InvalidRequest

    if init_img is None:
        raise InvalidRequest("outpaint needs an init image (--init-img)")
    o = {**o, "width": None, "height": None}
    settings, base = _request("img2img", o, init_image=open_image_file(init_img), strength=strength)
    req = outpaint_request(base, left=left, right=right, top=top, bottom=bottom)
    if fill != "original":  # outpainting starts from "fill" unless another start is asked for
        req = dataclasses.replace(req, inpainting_fill=fill.replace("-", " "))
    _run(settings, req.validate(), o)


@main.command()
@generation_options
@click.option("--init-img", "--init_img", "init_img", type=click.Path(dir_okay=False),
              help="The image to start from (its depth is kept).")
@click.option("--depth-map", "depth_map", type=click.Path(dir_okay=False),
              help="A depth map to use instead of the model's estimate (grayscale, white = near).")
@click.option("--strength", "--denoising-strength", type=float, default=0.75, show_default=True,
              help="How much to change it: 0 = keep, 1 = only the depth is kept.")
@click.option("--save-depth", "save_depth", is_flag=True,
              help="Also write the depth map used, beside the pictures (<picture>-depth.png).")
@friendly_errors
def depth2img(init_img, depth_map, strength, save_depth, **o):
    """Repaint an image keeping its depth, with an SD 2 depth model (512-depth-ema).

    \b
      brushwork depth2img "a marble statue" --init-img me.png --model 512-depth-ema.safetensors
      brushwork depth2img "a castle" --init-img photo.png --depth-map depth.png --save-depth
    """
    from .output.images import open_image_file
    from .request import InvalidRequest

    if init_img is None:
        raise InvalidRequest("depth2img needs an init image (--init-img)")
    depth = open_image_file(depth_map, high_depth=True) if depth_map else None
    settings, req = _request("depth2img", o, init_image=open_image_file(init_img), depth_map=depth,
                             strength=strength, save_depth=save_depth)
    _run(settings, req, o)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--model", "--ckpt", "model", help="The SD x4 upscaler: a file, diffusers folder or library name.")
@click.option("--prompt", default="", help="What the picture shows (optional; without one there is no CFG: half "
                                           "the work, the same picture).")
@click.option("--negative-prompt", "--negative_prompt", "-N", default="", help="What to keep out.")
@click.option("--noise-level", "noise_level", type=int, default=20, show_default=True,
              help="Noise added to the input first (0-350): more invents more detail, keeps less of the input.")
@click.option("--steps", type=int, default=None, help="Sampling steps [20; --plain-defaults: 75].")
@click.option("--sampler", default=None, help="Sampler [DPM++ 2M Karras; --plain-defaults: DDIM].")
@click.option("--scheduler", "--schedule", "schedule", default=None,
              help=f"Schedule type: {', '.join(SCHEDULE_TYPES)}.")
@click.option("--cfg-scale", "--cfg_scale", "cfg_scale", type=float, default=None,
              help="Classifier-free guidance scale, with a prompt [9].")
@click.option("--plain-defaults", is_flag=True,
              help="diffusers' StableDiffusionUpscalePipeline defaults instead: 75 DDIM steps, CFG 9 (slower).")
@click.option("--seed", type=int, default=-1, help="Seed; -1 = random (the seed used is printed).")
@click.option("--n-samples", "--n_samples", "--batch-size", "-n", "batch_size", type=int, default=1,
              show_default=True, help="Pictures per batch.")
@click.option("--n-iter", "--n_iter", "n_iter", type=int, default=1, show_default=True, help="Batches to run.")
@click.option("--eta", type=float, default=0.0, help="Eta for DDIM/ancestral noise.")
@click.option("--tile", "--tile-size", "tile_size", type=int, default=128, show_default=True,
              help="A larger input runs in overlapping tiles of this many input pixels (memory bounded by the tile).")
@click.option("--overlap", "--tile-overlap", "tile_overlap", type=int, default=32, show_default=True,
              help="Input pixels the tiles share, blended.")
@click.option("--upscaler", default=None,
              help="Instead of the diffusion model: an upscaler by name (Lanczos, Nearest, or a model in the "
                   "library's upscalers/ folder).")
@click.option("--scale", type=float, default=4.0, show_default=True, help="With --upscaler: how much larger.")
@click.option("--outdir", type=click.Path(file_okay=False), help="Output folder [outputs].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Number format.")
@click.option("--memory", default="auto", show_default=True,
              type=click.Choice(["auto", "high", "medium", "low", "minimal"]), help="GPU memory mode.")
@click.option("--threads", type=int, help="CPU threads [one per physical core].")
@click.option("--no-watermark", "no_watermark", is_flag=True, help="Do not embed the invisible watermark.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the file paths.")
@friendly_errors
def upscale(image, upscaler, scale, plain_defaults, **o):
    """Make a picture four times larger with the SD x4 upscaler (or --upscaler NAME: another upscaler).

    \b
      brushwork upscale small.png --model x4-upscaler-ema.safetensors
      brushwork upscale small.png --prompt "a white cat" --noise-level 40
      brushwork upscale small.png --upscaler Lanczos --scale 2
    """
    from .engine.tasks.upscale import DEFAULTS, PLAIN_DEFAULTS
    from .output.images import open_image_file
    from .request import GenerationRequest, InvalidRequest, Mode, Precision
    from .settings import Settings

    _quiet_libraries()
    if o["threads"] is not None and o["threads"] < 1:
        raise InvalidRequest(f"--threads must be 1 or more, got {o['threads']}")
    picture = open_image_file(image)
    settings = Settings.load(threads=o["threads"])
    if upscaler is not None:
        if o["model"]:
            raise InvalidRequest("--upscaler and --model name two different upscalers; give one of them")
        _upscale_with(picture, upscaler, scale, settings, o)
        return
    defaults = PLAIN_DEFAULTS if plain_defaults else DEFAULTS
    req = GenerationRequest(
        prompt=o["prompt"], negative_prompt=o["negative_prompt"], mode=Mode.UPSCALE, init_image=picture,
        model=o["model"], sampler=o["sampler"] or defaults["sampler"],
        scheduler=o["schedule"] or ("Automatic" if o["sampler"] else defaults["scheduler"]),
        steps=o["steps"] if o["steps"] is not None else defaults["steps"],
        cfg_scale=o["cfg_scale"] if o["cfg_scale"] is not None else defaults["cfg_scale"], seed=o["seed"],
        batch_size=o["batch_size"], n_iter=o["n_iter"], eta=o["eta"], noise_level=o["noise_level"],
        tile_size=o["tile_size"], tile_overlap=o["tile_overlap"], device=o["device"],
        precision=Precision(o["precision"]), memory=o["memory"],
        watermark=settings.watermark and not o["no_watermark"],
    ).validate()
    from .engine.core import Engine

    _run_one(Engine(settings), settings, req, {**o, "grid": True, "skip_grid_legacy": False, "n_rows": 0})


def _upscale_with(picture, name: str, scale: float, settings, o: dict) -> None:
    """``brushwork upscale --upscaler NAME``: a plain or model upscaler (``engine.upscalers``), no diffusion."""
    from .engine.upscalers import upscale_with
    from .output.files import encode_png, write_atomic

    device = None if o["device"] == "auto" else o["device"]
    out = upscale_with(name, picture, scale, settings, device=device)
    text = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {name}"  # A1111's extras keys
    outdir = Path(o["outdir"]) if o["outdir"] else settings.outputs_dir
    path = write_atomic(encode_png(out, text), outdir / "upscale", lambda n: f"{n:05d}.png")
    if not o["quiet"]:
        click.echo(f"{name} x{scale:g}: {picture.width}x{picture.height} -> {out.width}x{out.height}", err=True)
    click.echo(str(path))


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the parameters as JSON.")
@friendly_errors
def info(image, as_json):
    """Print the generation parameters stored in an image (A1111 'parameters' text)."""
    from .output.files import read_infotext
    from .output.images import open_image_file
    from .output.infotext import parse_infotext

    text = read_infotext(open_image_file(image))
    if not text:
        raise BrushworkError(f"{image} carries no generation parameters")
    click.echo(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if as_json else text)


@main.group()
def watermark():
    """Find the invisible watermark in images."""


@watermark.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@friendly_errors
def watermark_detect(images):
    """Say for each image whether it carries brushwork's (or Stable Diffusion's) watermark."""
    from .output.watermark import detect_files

    for name in images:
        try:
            (_, found), = detect_files([name])
        except BrushworkError as err:
            click.echo(f"{name}: error: {err}")
            continue
        click.echo(f"{name}: {found.summary()}")


@main.group()
def models():
    """List, hash and convert models."""


@models.command("list")
@friendly_errors
def models_list():
    """The models in your library (and the bundled one)."""
    from .models.store import ModelStore
    from .settings import Settings

    settings = Settings.load()
    store = ModelStore(settings)
    entries = store.scan()
    click.echo(f"library: {settings.models_dir}")
    for e in entries:
        store.with_family(store.with_hash(e))
        click.echo(f"  {e.name:30} {e.family or '?':16} {e.format:12} {e.short_hash or '-':10}  {e.path}")


@models.command("hash")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@friendly_errors
def models_hash(file):
    """Print A1111's model hash (first 10 hex digits of sha256) and the full sha256."""
    from .models.store import HashCache
    from .settings import Settings

    digest = HashCache(Settings.load().cache_dir / "hashes.json").sha256(Path(file))
    click.echo(f"{digest[:10]}  {digest}  {file}")


@models.command("convert")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Output .safetensors [FILE with .safetensors].")
@friendly_errors
def models_convert(file, out):
    """Convert a pickled .ckpt you trust into .safetensors (runs the pickle: only for files you trust)."""
    import torch
    from safetensors.torch import save_file

    src = Path(file)
    dst = Path(out) if out else src.with_suffix(".safetensors")
    if dst.exists():
        raise BrushworkError(f"{dst} already exists; pass --out to choose another name")
    click.echo(f"loading {src.name} with full unpickling (you said you trust it)...", err=True)
    data = torch.load(str(src), map_location="cpu", weights_only=False)
    for key in ("state_dict", "params_ema", "params"):  # a checkpoint's, Real-ESRGAN's (upscaler models)
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    tensors = {k: v.contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        raise BrushworkError(f"{src.name} holds no tensors to convert")
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(dst)
    click.echo(str(dst))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--auth", "--api-auth", "auth",
              help="user:password, or several as user1:pass1,user2:pass2 (required when listening beyond this "
                   "machine).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray Serve, generation in replicas (one per GPU or per ray_cpus_per_replica cores): on the "
                   "cluster at ADDRESS (auto, host:6379, ray://host:10001), else RAY_ADDRESS's or a local one. "
                   "pip install 'brushwork[ray]'; see docs/scale.md.")
@friendly_errors
def serve(host, port, auth, ray_address):
    """Start the web UI and the HTTP APIs (A1111-compatible /sdapi/v1 and /api/v1)."""
    from .settings import Settings

    if ray_address is not None:
        from .server.rayserve import serve_ray

        serve_ray(Settings.load(), address=ray_address or None, host=host, port=port, auth=auth)
        return
    from .server.app import serve as run_server

    run_server(Settings.load(), host=host, port=port, auth=auth)


@main.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder: the pictures and manifest.jsonl [outputs/batch/<FILE's name>].")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data: a local Ray, or the cluster at ADDRESS (auto, host:6379, ray://host:10001).")
@click.option("--actors", type=int, help="With --ray: engines running at once [one per GPU, else one per machine].")
@click.option("--num-gpus", "num_gpus", type=float, help="With --ray: GPUs each actor holds [1 where there are GPUs].")
@click.option("--num-cpus", "num_cpus", type=float, help="With --ray: CPUs each actor holds [1 with a GPU, else "
                                                         "the machine's share].")
@click.option("--threads", type=int, help="CPU threads, without --ray [one per physical core].")
@click.option("--quiet", "-q", is_flag=True, help="Print only the file paths (and errors).")
@friendly_errors
def batch(file, out, ray_address, actors, num_gpus, num_cpus, threads, quiet):
    """Run the requests of a JSON Lines file, one native /api/v1 job body a line; a rerun skips what is done.

    \b
      brushwork batch prompts.jsonl                 # {"prompt": "a red circle", "seed": 1} a line
      brushwork batch prompts.jsonl --ray --out runs/cats
    """
    from .batch import run
    from .settings import Settings

    if file is None and ray_address and Path(ray_address).is_file():  # `batch --ray prompts.jsonl`
        file, ray_address = ray_address, ""
    if file is None:
        raise BrushworkError("give the batch file: brushwork batch prompts.jsonl (one JSON request a line)")
    if threads is not None and threads < 1:
        raise BrushworkError(f"--threads must be 1 or more, got {threads}")
    _quiet_libraries()
    settings = Settings.load(threads=threads)
    folder = Path(out) if out else settings.outputs_dir / "batch" / Path(file).stem
    summary = run(file, folder, settings, ray_address=ray_address,
                  ray_options={"actors": actors, "num_cpus": num_cpus, "num_gpus": num_gpus, "quiet": quiet},
                  echo=lambda text, kind: (quiet and kind == "info") or click.echo(text, err=kind != "file"))
    if not quiet:
        click.echo(f"batch: {summary.done} done, {summary.skipped} skipped, {len(summary.failed)} failed; "
                   f"{folder / 'manifest.jsonl'}", err=True)
    if summary.failed:
        lines = ", ".join(str(line) for line, _ in summary.failed[:10]) + (", ..." if len(summary.failed) > 10 else "")
        raise BrushworkError(f"{len(summary.failed)} request(s) failed (line {lines}); the others ran, see "
                             f"{folder / 'manifest.jsonl'}")


if __name__ == "__main__":  # pragma: no cover
    main()

"""ControlNet in a run: the request's units (``request.ControlUnit``) on diffusers' ControlNet pipelines.

A task names its SD pipeline (``StableDiffusionPipeline``, ``...Img2ImgPipeline``, ``...InpaintPipeline``); with
ControlNet units ``RunContext.pipe`` builds the ControlNet pipeline of that kind instead (``CONTROL_PIPELINES``; on
SDXL ``XL_CONTROL_PIPELINES``) with the units' models (one ``ControlNetModel``, or diffusers'
``MultiControlNetModel`` for several, whose residuals add up), and ``RunContext.run_pipe`` hands each loop its
inputs (``Controls.inputs``): each unit's map at that loop's size, its weight (``controlnet_conditioning_scale``) and
its guidance start / end (diffusers' ``control_guidance_start`` / ``control_guidance_end``: a unit acts on the steps
``i`` with ``start <= i / N`` and ``(i + 1) / N <= end``). The hires fix's second pass gets the maps at its size.

Control modes, as A1111's ControlNet extension sets them (``soft_injection = mode != Balanced``, ``cfg_injection =
mode == ControlNet``, its hook.py):

- Balanced: the residuals times the weight, for the prompt and the negative prompt alike.
- My prompt is more important ("soft injection"): the 13 residuals (12 of the encoder, the middle block's) scaled
  ``weight * 0.825 ** (12 - i)``, deepest strongest. diffusers' ControlNetModel does exactly this with its
  ``guess_mode`` argument (``torch.logspace(-1, 0, 13)``: ``10 ** (1/12) = 1 / 0.8254``), which the unit's forward
  is given here while the pipeline runs as usual.
- ControlNet is more important (soft injection and "CFG injection"): the same scales, and the negative prompt's
  half of the batch gets no control, so CFG pushes toward the control. When every unit is in this mode the
  pipeline runs diffusers' ``guess_mode`` (the ControlNet on the prompt's half only, zeros for the other: the same
  numbers at half the ControlNet's cost); mixed with other modes, the unit's forward zeroes the negative half.

Weight 0 adds zeros (the same picture as without the unit). Inputs that do not go together are refused before the
run (``prepare``): fast mode (DeepCache reuses UNet features the residuals would change), the refiner after img2img
(diffusers' ControlNet img2img pipeline has no ``denoising_end``), inpainting's latent fills (its ControlNet
inpainting pipeline takes no ``masked_image_latents``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

from ..errors import InvalidRequest
from ..request import Mode
from . import preprocessors

CONTROL_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
}
XL_CONTROL_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
}
PROMPT_MODE, CONTROL_MODE = "My prompt is more important", "ControlNet is more important"


def pipeline_name(class_name: str, xl: bool) -> str:
    table = XL_CONTROL_PIPELINES if xl else CONTROL_PIPELINES
    if class_name not in table:
        raise InvalidRequest(f"ControlNet does not run with {class_name}; it works with txt2img, img2img and inpaint")
    return table[class_name]


class Controls:
    """The ControlNet units of one request on a loaded model. ``prepare`` before the run (models found and loaded,
    preprocessors checked: every error is raised there), then ``model`` / ``inputs`` / ``applied`` for each
    denoising loop, ``infotext`` and ``notes`` at the end."""

    def __init__(self, parts, policy, request, library, *, paths: bool = True):
        self.parts, self.policy, self.request, self.library, self.paths = parts, policy, request, library, paths
        self.units = list(request.controlnet)
        self.files: list = []
        self.models: list = []
        self._maps: dict[tuple, object] = {}
        self._model = None
        self.notes: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.units)

    def prepare(self) -> None:
        from .deepcache import interval_for
        from .tasks.inpaint import LATENT_FILLS

        r = self.request
        if interval_for(r.fast) > 1:
            raise InvalidRequest("fast mode (DeepCache) reuses UNet features between steps that ControlNet changes "
                                 "every step; leave --fast out with ControlNet")
        if r.refiner is not None and r.refiner_switch_at < 1 and r.mode is not Mode.TXT2IMG:
            raise InvalidRequest("the refiner takes over from ControlNet in txt2img only (diffusers' ControlNet "
                                 "img2img pipeline cannot stop early); leave the refiner or the ControlNet units out")
        if r.mode is Mode.INPAINT and r.inpainting_fill in LATENT_FILLS:
            raise InvalidRequest(f"inpainting with ControlNet starts from the original or fill (the ControlNet "
                                 f"inpainting pipeline takes no latents), not {r.inpainting_fill!r}")
        keys = []
        root = library_root(self.library)
        for i, unit in enumerate(self.units):
            found = preprocessors.find(unit.module, root)
            if found.run is None:
                raise InvalidRequest(f"ControlNet unit {i}: {preprocessors.missing(found, root)}")
            file = self.library.find(unit.model, paths=self.paths)
            model, key = self.library.load(file, self.parts, self.policy)
            self.files.append(file)
            self.models.append(model)
            keys.append(key)
            if unit.mask is not None:
                self.notes.append(f"ControlNet unit {i}: its mask is read by inpainting preprocessors only, which are "
                                  "not built in; it was not used")
        self.library.keep(keys)

    @property
    def model(self):
        """One ControlNetModel, or diffusers' MultiControlNetModel of them all (made once)."""
        if self._model is None:
            if len(self.models) == 1:
                self._model = self.models[0]
            else:
                from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

                self._model = MultiControlNetModel(self.models)
        return self._model

    @property
    def guess_mode(self) -> bool:
        """diffusers' guess mode (the ControlNet on the prompt's half only) when every unit is "ControlNet is more
        important"."""
        return all(u.control_mode == CONTROL_MODE for u in self.units)

    def source(self, index: int, ctx):
        """The picture a unit follows: its own, else the init image (img2img, inpaint); with inpainting's "only
        masked" the part that is repainted, when the picture is the init image's size (as the extension crops it)."""
        unit = self.units[index]
        image = unit.image if unit.image is not None else self.request.init_image
        crop = ctx.data.get("crop") if ctx is not None else None
        init = self.request.init_image
        if crop is not None and init is not None and image.size == init.size:
            image = image.crop(crop)
        return image

    def control_map(self, index: int, width: int, height: int, ctx=None):
        """Unit ``index``'s map at width x height (made once per size)."""
        key = (index, width, height, None if ctx is None else ctx.data.get("crop"))
        if key not in self._maps:
            self._maps[key] = preprocessors.control_map(self.units[index], self.source(index, ctx), width, height,
                                                        library_root(self.library))
        return self._maps[key]

    def inputs(self, pipe, ctx, kwargs: dict) -> dict:
        """What a ControlNet pipeline's call takes beside the task's own inputs."""
        import torch

        width, height = kwargs.get("width"), kwargs.get("height")
        if not width or not height:
            image = kwargs.get("image")
            if isinstance(image, torch.Tensor):  # latents (the hires fix's second pass, the refiner)
                height, width = (side * ctx.vae_factor for side in image.shape[-2:])
            elif isinstance(image, list | tuple) and image:
                width, height = image[0].size
            elif image is not None:
                width, height = image.size
            else:
                width, height = ctx.width, ctx.height
        maps = [self.control_map(i, width, height, ctx) for i in range(len(self.units))]
        if ctx is not None:
            ctx.extras["controlnet_maps"] = maps
        name = "control_image" if "control_image" in inspect.signature(pipe.__call__).parameters else "image"
        single = len(maps) == 1
        return {
            name: maps[0] if single else maps,
            "controlnet_conditioning_scale": float(self.units[0].weight) if single else
            [float(u.weight) for u in self.units],
            "control_guidance_start": [float(u.guidance_start) for u in self.units],
            "control_guidance_end": [float(u.guidance_end) for u in self.units],
            "guess_mode": self.guess_mode,
        }

    @contextmanager
    def applied(self, pipe):
        """The control modes for one denoising loop: a unit in "My prompt is more important" or (among other modes)
        "ControlNet is more important" runs its forward with diffusers' soft scales; the latter also gives the
        negative prompt's half of the batch no control. Undone on exit."""
        patched = []
        if not self.guess_mode:
            for unit, model in zip(self.units, self.models, strict=True):
                if unit.control_mode != "Balanced":
                    model.forward = _soft_forward(model, unit.control_mode == CONTROL_MODE, pipe)
                    patched.append(model)
        try:
            yield
        finally:
            for model in patched:
                del model.forward

    def infotext(self) -> dict:
        """``ControlNet N``: the unit as the extension writes it (its ControlNetUnit.serialize: these eleven fields,
        Python's spelling of each value)."""
        out = {}
        for i, (unit, file) in enumerate(zip(self.units, self.files, strict=True)):
            out[f"ControlNet {i}"] = unit_text(unit, file.title)
        return out


def unit_text(unit, model_title: str) -> str:
    p = preprocessors.find(unit.module)
    resolution = p.value("processor_res", unit.processor_res)
    fields = {
        "Module": p.name, "Model": model_title, "Weight": float(unit.weight), "Resize Mode": unit.resize_mode,
        "Processor Res": resolution if resolution != -1 else preprocessors.DEFAULT_RESOLUTION,
        "Threshold A": p.value("threshold_a", unit.threshold_a), "Threshold B": p.value("threshold_b", unit.threshold_b),
        "Guidance Start": float(unit.guidance_start), "Guidance End": float(unit.guidance_end),
        "Pixel Perfect": bool(unit.pixel_perfect), "Control Mode": unit.control_mode,
    }
    # the extension's own rule: no value may hold a comma or a colon (they separate its fields)
    return ", ".join(f"{k}: {str(v).replace(',', ' ').replace(':', ' ')}" for k, v in fields.items())


def _soft_forward(model, cond_only: bool, pipe):
    """``model``'s forward with diffusers' soft scales (``guess_mode=True`` to the ControlNet alone); ``cond_only``:
    and zeros for the negative prompt's half while the pipeline runs CFG ([negative, prompt] batches)."""
    import torch

    original = type(model).forward.__get__(model)

    def forward(*args, **kwargs):
        kwargs["guess_mode"] = True
        out = original(*args, **kwargs)
        if not (cond_only and pipe.do_classifier_free_guidance):
            return out
        down, mid = (out[0], out[1]) if isinstance(out, tuple) else (out.down_block_res_samples,
                                                                     out.mid_block_res_sample)

        def prompt_half(x):
            negative, positive = x.chunk(2)
            return torch.cat([torch.zeros_like(negative), positive])

        down, mid = tuple(prompt_half(d) for d in down), prompt_half(mid)
        if isinstance(out, tuple):
            return (down, mid)
        out.down_block_res_samples, out.mid_block_res_sample = down, mid
        return out

    return forward


def cond_half(value, batch: int):
    """A control image tensor (or a list of them) doubled for CFG, as the prompt's half; others as they are."""
    if isinstance(value, list | tuple):
        return [cond_half(v, batch) for v in value]
    if hasattr(value, "shape") and value.shape[0] == 2 * batch:
        return value.chunk(2)[1]
    return value


def library_root(library):
    """The model library's folder of a ControlNet library (where the preprocessors' annotator files are), or None."""
    return getattr(getattr(library, "store", None), "root", None)


def check_units(request, library, max_pixels: int) -> None:
    """What an HTTP caller can get wrong in the units, before the job is queued: a model not in the library (by name
    only: no paths over HTTP), a preprocessor that is not built in, a picture over the size limit."""
    from ..errors import ModelError

    for i, unit in enumerate(request.controlnet):
        for what, image in (("image", unit.image), ("mask", unit.mask)):
            if image is not None and image.width * image.height > max_pixels:
                raise InvalidRequest(f"ControlNet unit {i}'s {what} is {image.width}x{image.height} pixels, over the "
                                     f"limit of {max_pixels} pixels; make it smaller")
        found = preprocessors.find(unit.module, library_root(library))
        if found.run is None:
            raise InvalidRequest(f"ControlNet unit {i}: {preprocessors.missing(found, library_root(library))}")
        if library is not None:
            try:
                file = library.find(unit.model, paths=False)
            except ModelError as err:
                raise InvalidRequest(f"ControlNet unit {i}: {err}") from err
            from pathlib import Path

            # the engine reads a name that exists as a path as that path: hand it the entry's own file then
            unit.model = str(file.path) if Path(unit.model).exists() else unit.model


def parse_unit_text(text: str) -> dict:
    """A ``ControlNet N`` infotext value back into unit fields (the extension's ``parse_unit``: ``Field Name: value``
    pairs; True / False, whole numbers and numbers read as such)."""
    out: dict = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition(": ")
        if not sep:
            continue
        field = "_".join(word.lower() for word in key.split(" "))
        if value in ("True", "False"):
            out[field] = value == "True"
            continue
        for cast in (int, float):
            try:
                out[field] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[field] = value
    return out

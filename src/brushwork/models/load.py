"""Files on disk -> ready diffusers/transformers components, offline and safely.

Formats: ``.safetensors`` and ``.ckpt`` single files in the original CompVis/Stability key
layout (architecture read from the tensor shapes, see ``detect.py``), diffusers folders, and hub
ids (only when online). ``.ckpt`` files are unpickled with ``weights_only=True``: a pickle that
wants to run code is refused. Conversion of the original layout uses diffusers' converters.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from . import fewstep
from .convert import UNET_PREFIX
from .detect import Detected, Shapes, detect
from .families import FAMILY_BY_NAME, KNOWN_PREDICTION_BY_HASH, SD_SCHEDULER_CONFIG, Family, shipped_config

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class ModelParts:
    """What a pipeline needs, plus what we know about where it came from."""

    name: str
    family: Family
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler_config: dict
    prediction: str  # "eps" | "v"
    default_size: tuple[int, int]
    source: str  # "single-file" | "diffusers"
    notes: list[str] = field(default_factory=list)
    # what the model's maker recommends where a request leaves it open (e.g. {"cfg_scale": 2.0}); few-step
    # models (SD-Turbo, LCM) need this the most
    defaults: dict = field(default_factory=dict)
    # what a family's own pipeline takes beside the components, e.g. the x4 upscaler's
    # {"low_res_scheduler": {...DDPMScheduler config}, "max_noise_level": 350}
    pipeline_config: dict = field(default_factory=dict)
    # SD 2 depth's MiDaS estimator (transformers DPTForDepthEstimation, fp32, kept on the CPU between runs);
    # None: the file has none, depth2img then needs a depth map
    depth_estimator: object = None
    # SDXL: OpenCLIP bigG (transformers CLIPTextModelWithProjection) and its tokenizer; the refiner has this one
    # alone (``text_encoder`` and ``tokenizer`` are then None)
    text_encoder_2: object = None
    tokenizer_2: object = None
    # ``--vae taesd``: the tiny decoder (models/taesd.py) for the final decode; None: ``vae`` decodes. Encoding
    # always uses ``vae``
    tiny_vae: object = None
    # a few-step model (``fewstep.py``): "turbo" (SD-Turbo, SDXL-Turbo) as the loader found it (its metadata, its
    # hash; an LCM UNet says so itself), and why; None: an ordinary model (the request's ``turbo`` can say otherwise)
    fewstep: str | None = None
    fewstep_why: str = ""
    # the CPU backend's converted components (engine/backends.py: OpenVINO's UNet, VAE decoder and text
    # encoders), made when the model loads per the device policy; None: torch
    backend: object = None
    # the last prompts' encodings (engine/tasks/base.py ``RunContext._encoded``): a prompt encoded again with the
    # same settings is read from here, as A1111's cached conds (cleared with the model)
    conditionings: dict = field(default_factory=dict)

    @property
    def modules(self) -> dict:
        found = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in found.items() if module is not None}

    @property
    def encoders(self) -> list[tuple]:
        """(text encoder, its tokenizer) for each text encoder this model has (one; SDXL base two), in order."""
        return [(te, tok) for te, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2))
                if te is not None]

    @property
    def text_encoders(self) -> list:
        """The text encoders this model has (one; SDXL base two)."""
        return [te for te, _ in self.encoders]


# ---- reading files ---------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and metadata of a .safetensors file, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises SafetensorError / OSError with varying text
        raise ModelError(
            f"{path.name} is not a valid .safetensors file ({_short(err)}); it may be truncated: download it again"
        ) from err
    return shapes, metadata


def load_state_dict(path: Path) -> dict:
    """All tensors of a single-file checkpoint. ``.ckpt``/``.pt`` are unpickled with ``weights_only=True``."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)  # clear error for a broken file before loading
        try:
            return load_file(str(path))
        except Exception as err:
            raise ModelError(f"{path.name} cannot be read ({_short(err)}); it may be truncated: download it again") from err
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path.name} contains code, not only weights, so it was not loaded; if you trust its source, "
            f"convert it once with: brushwork models convert '{path}'"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ModelError(f"{path.name} is not a readable checkpoint ({_short(err)}); it may be truncated") from err
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(hasattr(v, "shape") for v in data.values()):
        data = {k: v for k, v in data.items() if hasattr(v, "shape")} if isinstance(data, dict) else {}
        if not data:
            raise ModelError(f"{path.name} holds no tensors; it is not a model checkpoint")
    return data


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


def read_shapes(path: Path) -> tuple[Shapes, dict[str, str], dict | None]:
    """(shapes, metadata, state_dict or None). Safetensors: header only; pickles must be loaded."""
    if path.suffix == ".safetensors":
        shapes, metadata = read_safetensors_header(path)
        return shapes, metadata, None
    sd = load_state_dict(path)
    return {k: tuple(v.shape) for k, v in sd.items()}, {}, sd


# ---- interpreting what the keys cannot say -----------------------------------------------------


def _yaml_hints(path: Path | None) -> dict:
    """``parameterization`` and ``scale_factor`` from an original-style YAML config, if given."""
    if path is None or not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
        params = config["model"]["params"]
    except Exception:
        raise ModelError(f"{path.name} is not a Stable Diffusion config YAML (model.params missing)") from None
    hints = {}
    if params.get("parameterization") in ("v", "eps"):
        hints["prediction"] = params["parameterization"]
    if isinstance(params.get("scale_factor"), int | float):
        hints["scale_factor"] = float(params["scale_factor"])
    return hints


def _resolution(metadata: dict[str, str]) -> tuple[int, int] | None:
    value = metadata.get("modelspec.resolution", "")
    try:
        w, h = (int(x) for x in value.lower().split("x"))
        return (w, h) if w > 0 and h > 0 else None
    except ValueError:
        return None


DEFAULTS_KEY = fewstep.DEFAULTS_KEY  # safetensors metadata: JSON, e.g. {"cfg_scale": 2.0, "cfg_end": 0.85}


def _model_defaults(metadata: dict[str, str]) -> dict:
    """The recommended settings a file carries (cfg_scale, cfg_end, steps, sampler, scheduler, width, height),
    each checked as the request checks it; anything unknown or malformed is ignored (never fatal)."""
    return fewstep.file_defaults(metadata)


def recommended_defaults(path: Path, short_hash: str | None = None) -> dict:
    """The recommended settings of a model file without loading it (only .safetensors carry them): its own, over
    its few-step kind's (SD-Turbo, LCM: ``fewstep.py``); {} if none. The header is read once per file version (the
    model list asks on every page load). ``short_hash``: the file's, when known (an official Turbo file's)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    stat = path.stat()
    return dict(_defaults_of_file(str(path), stat.st_mtime_ns, stat.st_size, short_hash))


@functools.lru_cache(maxsize=256)
def _defaults_of_file(path: str, _mtime_ns: int, _size: int, short_hash: str | None) -> dict:
    try:
        shapes, metadata = read_safetensors_header(Path(path))
    except ModelError:
        return {}
    return fewstep.recommended(metadata, shapes, short_hash)


def native_size(path: Path, family: str | None, short_hash: str | None = None) -> tuple[int, int] | None:
    """(width, height) a model draws at where a request leaves them open, as loading it finds it, from its header,
    its .yaml and its folder's configs alone (the model list asks for every file); None where its family is not
    known. ``family``: its name (``ModelEntry.family``); ``short_hash``: the file's, when known (an official SD 2.1
    768 file's)."""
    known = FAMILY_BY_NAME.get(family or "")
    path = Path(path)
    if known is None or not path.exists():
        return None
    if path.is_dir():
        return _folder_size(path, known)
    stat = path.stat()
    return _size_of_file(str(path), stat.st_mtime_ns, stat.st_size, known.name, short_hash)


@functools.lru_cache(maxsize=256)
def _size_of_file(path: str, _mtime_ns: int, _size: int, family: str, short_hash: str | None) -> tuple[int, int]:
    file, known = Path(path), FAMILY_BY_NAME[family]
    metadata: dict[str, str] = {}
    if file.suffix == ".safetensors":
        try:
            metadata = read_safetensors_header(file)[1]
        except ModelError:
            pass  # the loader says what is wrong with it; the list shows the family's size meanwhile
    kind, _ = fewstep.kind_of_file(metadata, lambda: short_hash)
    try:
        pred, _ = decide_prediction(known, explicit=None, yaml_hints=_yaml_hints(file.with_suffix(".yaml")),
                                    metadata=metadata, short_hash=lambda: short_hash, name=file.name,
                                    turbo=kind == "turbo")
    except ModelError:
        pred = None  # an SD 2.x file that cannot tell 512 eps from 768 v (the loader asks for --prediction)
    return _native_size(metadata, kind, pred, known)


def _folder_size(path: Path, family: Family) -> tuple[int, int]:
    """A diffusers folder's size as ``load_diffusers_folder`` reads it: its UNet's sample size x the VAE's scale."""
    if family.configs is not None and not family.xl:
        return (family.default_size,) * 2
    try:
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        side = family.default_size
    return side, side


def decide_prediction(
    family: Family, *, explicit: str | None, yaml_hints: dict, metadata: dict, short_hash, name: str,
    turbo: bool = False,
) -> tuple[str, str]:
    """(prediction, why). Order: explicit flag, YAML, file metadata, family, known official hash, a Turbo model
    (SD-Turbo is SD 2.1 at 512: eps)."""
    if explicit:
        return explicit, "--prediction"
    if "prediction" in yaml_hints:
        return yaml_hints["prediction"], "config YAML"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v", "file metadata"
    if spec in ("eps", "epsilon"):
        return "eps", "file metadata"
    if family.prediction is not None:
        return family.prediction, "family"
    known = KNOWN_PREDICTION_BY_HASH.get(short_hash() or "")
    if known:
        return known[0], f"known file {known[1]}"
    if turbo:
        return "eps", "a Turbo model"
    raise ModelError(
        f"{name} is an SD 2.x model, which comes as 768x768 v-prediction or 512x512 eps and the weights "
        "cannot tell which: add --prediction v (768 models) or --prediction eps (512 models), "
        "or put its .yaml config beside it"
    )


# ---- building components -----------------------------------------------------------------------


def _load_into(model, state: dict, what: str):
    """Load tensors into a model built on the meta device; every parameter must be present."""
    wanted = model.state_dict().keys()
    if not any(k.startswith("text_model.") for k in wanted):  # transformers >= 5 CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in wanted}
    missing = [k for k in wanted if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"the {what} weights are incomplete: {len(missing)} tensors missing (e.g. {missing[0]})")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise ModelError(f"the {what} weights do not fit the detected architecture: {_short(err)}") from err
    return model


LCM_COND_PROJ = "time_embedding.cond_proj.weight"  # an LCM UNet's guidance (w) embedding, diffusers' name


def convert_unet(sd: dict, config) -> dict:
    """The UNet's tensors of an original-layout state dict, in diffusers' names (diffusers' converter), with an LCM
    UNet's guidance embedding, which LCM single files keep under its diffusers name and the converter leaves out."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = convert_ldm_unet_checkpoint(sd, config)
    if (cond := sd.get(UNET_PREFIX + LCM_COND_PROJ)) is not None:
        state[LCM_COND_PROJ] = cond
    return state


def build_xl_from_original(sd: dict, det: Detected):
    """(unet, vae, text_encoder or None for the refiner, text_encoder_2) of an SDXL single file."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .convert import XL_CLIP_PREFIX, XL_OPENCLIP_PREFIX, XL_REFINER_OPENCLIP_PREFIX

    refiner = not det.text_encoder
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel.from_config(det.unet)
        vae = AutoencoderKL.from_config(det.vae)
        text_encoder = None if refiner else CLIPTextModel(CLIPTextConfig(**det.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**det.text_encoder_2))
    _load_into(unet, convert_unet(sd, unet.config), "UNet")
    _load_into(vae, convert_ldm_vae_checkpoint(sd, vae.config), "VAE")
    if text_encoder is not None:
        te = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(XL_CLIP_PREFIX)},
                                         remove_prefix=XL_CLIP_PREFIX)
        te = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
        _load_into(text_encoder, te, "CLIP-L text encoder")
    prefix = XL_REFINER_OPENCLIP_PREFIX if refiner else XL_OPENCLIP_PREFIX
    te2 = convert_openclip(sd, det.text_encoder_2["num_hidden_layers"], prefix=prefix, projection=True)
    _load_into(text_encoder_2, te2, "OpenCLIP bigG text encoder")
    return unet, vae, text_encoder, text_encoder_2


def build_from_original(sd: dict, det: Detected, *, scale_factor: float | None = None):
    """(unet, vae, text_encoder) from an original-layout state dict and detected configs."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_config = dict(det.vae)
    if scale_factor:
        vae_config["scaling_factor"] = scale_factor
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel.from_config(det.unet)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**det.text_encoder))
    _load_into(unet, convert_unet(sd, unet.config), "UNet")
    _load_into(vae, convert_ldm_vae_checkpoint(sd, vae.config), "VAE")
    if det.text_encoder_kind == "clip":
        te = convert_ldm_clip_checkpoint(sd)
        te = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
    else:
        te = convert_openclip(sd, det.text_encoder["num_hidden_layers"])
    _load_into(text_encoder, te, "text encoder")
    return unet, vae, text_encoder


def convert_openclip(sd: dict, layers: int, prefix: str = "cond_stage_model.model.", *,
                     projection: bool = False) -> dict:
    """OpenCLIP text tower -> transformers CLIPTextModel keys, first ``layers`` blocks (penultimate for SD 2.x);
    ``projection`` (SDXL's bigG): its text projection too, for CLIPTextModelWithProjection (OpenCLIP multiplies
    from the right: the Linear's weight is the transpose)."""
    out = {
        "text_model.embeddings.token_embedding.weight": sd[prefix + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd[prefix + "positional_embedding"],
        "text_model.final_layer_norm.weight": sd[prefix + "ln_final.weight"],
        "text_model.final_layer_norm.bias": sd[prefix + "ln_final.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
    if projection:
        out["text_projection.weight"] = sd[prefix + "text_projection"].T.contiguous()
    return out


def load_single_file(
    path: Path,
    *,
    prediction: str | None = None,
    config_yaml: Path | None = None,
    short_hash=lambda: None,
    turbo: bool = False,
) -> ModelParts:
    """``turbo``: the request's ``--turbo`` (an SD 2.x file that cannot say its prediction is then SD-Turbo's eps);
    whether the file itself is a few-step model is read from it (``fewstep.kind_of_file``)."""
    from .tokenizers import tokenizer_for

    shapes, metadata, sd = read_shapes(path)
    det = detect(shapes, path.name)
    yaml_path = config_yaml or next((p for p in (path.with_suffix(".yaml"),) if p.is_file()), None)
    hints = _yaml_hints(yaml_path)
    kind, kind_why = fewstep.kind_of_file(metadata, short_hash)  # SD-Turbo / SDXL-Turbo: its metadata, or its hash
    pred, why = decide_prediction(
        det.family, explicit=prediction, yaml_hints=hints, metadata=metadata, short_hash=short_hash, name=path.name,
        turbo=turbo or kind == "turbo",
    )
    if sd is None:
        sd = load_state_dict(path)
    text_encoder_2 = tokenizer_2 = None
    if det.family.xl:
        unet, vae, text_encoder, text_encoder_2 = build_xl_from_original(sd, det)
        tokenizer_2 = tokenizer_for("openclip")  # bigG pads with "!" (id 0), as SD 2.x's OpenCLIP
    else:
        unet, vae, text_encoder = build_from_original(sd, det, scale_factor=hints.get("scale_factor"))
    depth_estimator = _depth_estimator(sd, det)
    del sd
    defaults = _model_defaults(metadata)
    size = _native_size(metadata, kind, pred, det.family)
    # a guess worth telling: a hash or a YAML picked the target (a file that names its own says nothing new)
    notes = [f"prediction {pred} (from {why})"] if why not in ("family", "file metadata", "--prediction") else []
    if det.family.unet_in_channels == 5 and depth_estimator is None:
        notes.append(f"{path.name} carries no depth estimator (depth_model.*): depth2img needs --depth-map")
    return ModelParts(
        name=path.stem, family=det.family, unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=None if text_encoder is None else tokenizer_for("clip" if det.family.xl else det.text_encoder_kind),
        scheduler_config=scheduler_config(pred, det.family), prediction=pred, default_size=size,
        source="single-file", notes=notes, defaults=defaults,
        pipeline_config=shipped_pipeline_config(det.family), depth_estimator=depth_estimator,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, fewstep=kind, fewstep_why=kind_why,
    )


def _native_size(metadata: dict[str, str], kind: str | None, pred: str | None, family: Family) -> tuple[int, int]:
    """The size a single file draws at where a request leaves it open: its brushwork.defaults', its modelspec's, its
    few-step kind's (Turbo: 512), its family's (SD 2.x v-prediction: 768)."""
    size = (_resolution(metadata) or _own_size(fewstep.PROFILES.get(kind, {}))
            or ((768, 768) if pred == "v" and family.name == "sd2" else (family.default_size,) * 2))
    defaults = _model_defaults(metadata)
    return defaults.get("width", size[0]), defaults.get("height", size[1])


def _own_size(profile: dict) -> tuple[int, int] | None:
    """(width, height) a few-step kind's profile names, else None."""
    return (profile["width"], profile["height"]) if "width" in profile and "height" in profile else None


def _depth_estimator(sd: dict, det: Detected):
    """SD 2 depth's MiDaS DPT-Hybrid from the file's ``depth_model.model.*`` (diffusers' from_single_file has no
    converter for it), in fp32; None when the file has none."""
    if det.depth_estimator is None:
        return None
    from . import dpt

    return dpt.build(sd, det.depth_estimator).float()


def scheduler_config(prediction: str, family: Family | None = None) -> dict:
    base = SD_SCHEDULER_CONFIG
    if family is not None and family.configs:
        base = with_own_spacing(shipped_config(family, "scheduler"))
    return {**base, "prediction_type": "v_prediction" if prediction == "v" else "epsilon"}


def with_own_spacing(config: dict) -> dict:
    """A scheduler config that names no ``timestep_spacing`` (the hub's older ones) gets its own class's default
    written in, so that another sampler built from it (``build_scheduler``) keeps the model's own timesteps
    ("Automatic") rather than its class's default: the x4 upscaler's DDIM config means "leading" for Euler too."""
    if "timestep_spacing" in config:
        return config
    import inspect

    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    param = inspect.signature(cls.__init__).parameters.get("timestep_spacing") if cls is not None else None
    if param is None or param.default is inspect.Parameter.empty:
        return config
    return {**config, "timestep_spacing": param.default}


def shipped_pipeline_config(family: Family) -> dict:
    """The x4 upscaler's low-res scheduler and noise limit, as its diffusers folder has them; {} for the others."""
    if family.configs is None or family.unet_in_channels != 7:
        return {}
    return {"low_res_scheduler": shipped_config(family, "low_res_scheduler"),
            **{k: v for k, v in shipped_config(family, "pipeline").items() if not k.startswith("_")}}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir()


def load_diffusers_folder(path: Path, *, prediction: str | None = None) -> ModelParts:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel


    if (path / "text_encoder_2").is_dir():
        parts = _load_xl_folder(path, prediction=prediction)
        parts.fewstep, parts.fewstep_why = fewstep.kind_of_folder(path)  # SDXL-Turbo's own folder
        return parts
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"the diffusers folder {path} is incomplete or broken: {_short(err)}") from err
    kind = "openclip" if text_encoder.config.hidden_act == "gelu" else "clip"
    family = next((f for f in FAMILY_BY_NAME.values() if f.matches(kind, unet.config.in_channels)), None)
    if family is None:
        raise ModelError(f"{path.name}: a {kind} model with {unet.config.in_channels} UNet input channels is not "
                         "supported yet")
    tokenizer = _folder_tokenizer(path, "tokenizer", kind)
    base, pred = _folder_scheduler(path, family, prediction)
    side = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    if family.configs is not None:
        side = family.default_size
    few = fewstep.kind_of_folder(path)  # SD-Turbo's own folder (an LCM UNet says so itself)
    return ModelParts(
        name=path.name, family=family, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=base, prediction=pred, default_size=(side, side), source="diffusers",
        pipeline_config=_folder_pipeline_config(path, family), depth_estimator=_folder_depth_estimator(path, family),
        fewstep=few[0], fewstep_why=few[1],
    )


def _load_xl_folder(path: Path, *, prediction: str | None = None) -> ModelParts:
    """An SDXL diffusers folder: base (text_encoder + text_encoder_2), refiner (text_encoder_2 alone) or
    inpainting (9 UNet input channels). Tokenizers from the folder when it has them, else the shipped ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True)
        text_encoder = None
        if (path / "text_encoder" / "config.json").is_file():
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"the diffusers folder {path} is incomplete or broken: {_short(err)}") from err
    kind = "sdxl" if text_encoder is not None else "sdxl-refiner"
    family = next((f for f in FAMILY_BY_NAME.values() if f.matches(kind, unet.config.in_channels)), None)
    if family is None:
        raise ModelError(f"{path.name}: an SDXL model with {unet.config.in_channels} UNet input channels is not "
                         "supported")

    base, pred = _folder_scheduler(path, family, prediction)
    side = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelParts(
        name=path.name, family=family, unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=_folder_tokenizer(path, "tokenizer", "clip") if text_encoder is not None else None,
        scheduler_config=base, prediction=pred, default_size=(side, side), source="diffusers",
        text_encoder_2=text_encoder_2, tokenizer_2=_folder_tokenizer(path, "tokenizer_2", "openclip"),
    )


def _folder_tokenizer(path: Path, folder: str, kind: str):
    """The folder's own tokenizer when it has one, else the shipped one of that kind (clip / openclip)."""
    from .tokenizers import tokenizer_for

    if (path / folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path / folder, local_files_only=True)
    return tokenizer_for(kind)


def _folder_scheduler(path: Path, family: Family, prediction: str | None) -> tuple[dict, str]:
    """(scheduler config, prediction): the folder's scheduler config (else the family's shipped one, else SD's),
    its prediction type unless ``prediction`` overrides it."""
    sched_file = path / "scheduler" / "scheduler_config.json"
    shipped = shipped_config(family, "scheduler") if family.configs else SD_SCHEDULER_CONFIG
    base = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(shipped)
    if family.configs is not None:
        base = with_own_spacing(base)
    pred = prediction or ("v" if base.get("prediction_type") == "v_prediction" else "eps")
    base["prediction_type"] = "v_prediction" if pred == "v" else "epsilon"
    return base, pred


def _folder_depth_estimator(path: Path, family: Family):
    """A depth model folder's ``depth_estimator`` (DPTForDepthEstimation), in fp32; None without one."""
    if family.unet_in_channels != 5 or not (path / "depth_estimator" / "config.json").is_file():
        return None
    from transformers import DPTForDepthEstimation

    try:
        model = DPTForDepthEstimation.from_pretrained(path / "depth_estimator", local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"the depth estimator of {path} is incomplete or broken: {_short(err)}") from err
    return model.float().eval()


def _folder_pipeline_config(path: Path, family: Family) -> dict:
    """The folder's own low-res scheduler and ``max_noise_level`` (model_index.json), the shipped ones where
    it has none."""
    config = shipped_pipeline_config(family)
    if not config:
        return config
    low_res = path / "low_res_scheduler" / "scheduler_config.json"
    if low_res.is_file():
        config["low_res_scheduler"] = json.loads(low_res.read_text())
    index = json.loads((path / "model_index.json").read_text())
    if isinstance(index.get("max_noise_level"), int):
        config["max_noise_level"] = index["max_noise_level"]
    return config


def load_vae(path: Path):
    """A VAE on its own: original layout (``.safetensors``/``.ckpt``/``.vae.pt``) or a diffusers folder."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path} is not a diffusers VAE folder: {_short(err)}") from err
    _, _, sd = read_shapes(path)
    sd = sd if sd is not None else load_state_dict(path)
    if not any(k.startswith("first_stage_model.") for k in sd):
        sd = {"first_stage_model." + k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv",
                                                                                   "post_quant_conv"))}
    import accelerate
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .detect import _vae_config

    config = _vae_config({k: tuple(v.shape) for k, v in sd.items()}, path.name)
    with accelerate.init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    return _load_into(vae, convert_ldm_vae_checkpoint(sd, vae.config), "VAE")

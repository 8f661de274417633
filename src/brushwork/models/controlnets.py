"""ControlNet models: the library's ``controlnet/`` folder (A1111's ``models/ControlNet``, ComfyUI's
``models/controlnet``), listed as A1111's ControlNet extension lists them, and loaded offline for the model they run
with.

Formats: single files in the original layout (lllyasviel's ``control_v11p_sd15_canny.pth`` / ``.safetensors``:
``control_model.*`` keys, or the same keys without the prefix, as some SD 2.x ControlNets ship), single files that
hold a diffusers ControlNetModel's state dict (``diffusion_pytorch_model.safetensors`` renamed, common for SDXL),
and diffusers folders (``config.json`` + weights: ``ControlNetModel.from_pretrained``, offline). The original layout
is renamed by diffusers' converter (``convert_controlnet_checkpoint``); what it leaves out (the conditioning
embedding at depths other than SD's, SDXL's size embedding ``label_emb``) is renamed here.

The architecture is read from the tensor shapes, as ``detect.py`` does for UNets (no original YAML is needed):
channels, layers, attention levels and depths, linear or convolutional projections, the text width (context), the
conditioning embedding's channels (``input_hint_block.*``), SDXL's size embedding. What shapes cannot say (attention
heads: SD 1.x has 8 everywhere, SD 2.x and SDXL one per 64 channels) comes from the model it runs with, whose
UNet's encoder a ControlNet copies; a ControlNet whose text width (or SDXL-ness) does not match that model is
refused with one line. "shuffle" in the file name means global average pooling of the control, as the extension.

Names: A1111's titles are ``name [hash]`` with its old 8-hex hash (sha256 of 64 KiB at 1 MiB: ``sd_models.model_hash``),
e.g. ``control_v11p_sd15_canny [d14c016b]``; a unit's model is found by title, name or file name.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .convert import CONTROL_PREFIX

CONTROLNET_FOLDERS = ("controlnet",)  # top folders of the library, any case (A1111's ControlNet, ComfyUI's controlnet)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")

Shapes = dict[str, tuple[int, ...]]


@dataclass
class ControlNetFile:
    name: str  # the file's stem, or the folder's name
    path: Path
    format: str  # "single" | "diffusers"
    short_hash: str | None = None  # A1111's old 8-hex hash of the weights file

    @property
    def title(self) -> str:
        """The extension's model name: ``name [hash]``."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    @property
    def weights(self) -> Path:
        if self.format == "diffusers":
            return next((self.path / n for n in DIFFUSERS_WEIGHTS if (self.path / n).is_file()), self.path)
        return self.path


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any((path / n).is_file() for n in DIFFUSERS_WEIGHTS)


def in_controlnet_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() in CONTROLNET_FOLDERS


class ControlNetLibrary:
    """The library's ControlNets, and those the last request loaded (kept, on its model's device, until a request
    asks for others: a ControlNet is as large as its model's UNet encoder)."""

    def __init__(self, store):
        self.store = store
        self._loaded: dict[tuple, object] = {}
        self._lock = threading.RLock()

    def folders(self) -> list[Path]:
        root = self.store.root
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and in_controlnet_folder(Path(p.name)))

    def files(self) -> list[ControlNetFile]:
        """Every ControlNet of the library, sorted by name (a diffusers folder is one model)."""
        found: list[ControlNetFile] = []
        for folder in self.folders():
            inside: list[Path] = []
            for path in sorted(folder.rglob("*")):
                if any(d in path.parents for d in inside):
                    continue
                if is_diffusers_folder(path):
                    inside.append(path)
                    found.append(self._hashed(ControlNetFile(path.name, path, "diffusers")))
                elif path.is_file() and path.suffix.lower() in CONTROLNET_SUFFIXES and path.stem != "None":
                    found.append(self._hashed(ControlNetFile(path.stem, path, "single")))
        return sorted(found, key=lambda f: f.name.lower())

    def _hashed(self, file: ControlNetFile) -> ControlNetFile:
        from .store import legacy_hash

        weights = file.weights
        if weights.is_file():
            file.short_hash = self.store.hashes.remembered(weights, "legacy_hash", lambda: legacy_hash(weights))
        return file

    def find(self, name: str, *, paths: bool = False) -> ControlNetFile:
        """The ControlNet ``name`` names: its title ("name [hash]"), name or file name, exactly, then in any case;
        with ``paths`` (the CLI, Python) also a file or diffusers folder anywhere."""
        wanted = name.strip()
        if paths:
            path = Path(wanted).expanduser()
            if path.is_file() and path.suffix.lower() in CONTROLNET_SUFFIXES:
                return self._hashed(ControlNetFile(path.stem, path, "single"))
            if is_diffusers_folder(path):
                return self._hashed(ControlNetFile(path.name, path, "diffusers"))
        files = self.files()
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,10}\]$", "", wanted)
        for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
            for f in files:
                if same(wanted, f.title) or any(same(bare, n) for n in (f.name, f.path.name)):
                    return f
        where = ", ".join(str(f) for f in self.folders()) or f"{self.store.root / 'controlnet'} (it does not exist)"
        known = ", ".join(f.title for f in files) or "none"
        raise ModelError(f"ControlNet model {wanted!r} not found in {where} (has: {known})")

    def load(self, file: ControlNetFile, parts, policy):
        """The ControlNet of ``file`` for the model ``parts``, in the policy's dtype (on the CPU: there; on a GPU the
        pipeline's memory mode places it). Kept for the next request."""
        stat = file.weights.stat()
        key = (str(file.path), stat.st_mtime_ns, stat.st_size, parts.family.name, id(parts.unet), policy.dtype)
        with self._lock:
            if key not in self._loaded:
                model = load_controlnet(file, parts)
                if model.dtype != policy.dtype:
                    model.to(dtype=policy.dtype)
                if policy.is_cpu:
                    model.to(policy.device)
                if policy.mixed:  # its inputs in the latents' dtype, its residuals in the UNet's (as the UNet adds them)
                    from ..engine.device import cast_io

                    cast_io(model, policy.dtype, policy.dtype)
                model.eval().requires_grad_(False)
                self._loaded[key] = model
            return self._loaded[key], key

    def keep(self, keys) -> None:
        """Drop the loaded ControlNets that are not among ``keys`` (those of the request that just started)."""
        with self._lock:
            for key in [k for k in self._loaded if k not in set(keys)]:
                del self._loaded[key]

    def unload(self) -> None:
        with self._lock:
            self._loaded.clear()


# ---- reading and converting ---------------------------------------------------------------------------------


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def to_diffusers(sd: dict, name: str = "ControlNet") -> dict:
    """An original-layout ControlNet state dict (``control_model.*`` or the bare keys), or one already in diffusers'
    names, in diffusers' names. Works on tensors and on shapes alike (nothing but names changes)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return dict(sd)
    bare = {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)} or sd
    if "input_hint_block.0.weight" not in bare or "input_blocks.0.0.weight" not in bare:
        sample = ", ".join(sorted(sd)[:3]) or "no tensors"
        if any(k.startswith("model.diffusion_model.") for k in sd):
            raise ModelError(f"{name} is a Stable Diffusion checkpoint, not a ControlNet; put it in the library's "
                             "main folder and choose it with --model")
        raise ModelError(f"{name} is not a ControlNet I know (no control_model.* / input_hint_block keys; found "
                         f"keys like: {sample}); T2I-Adapters, Control-LoRAs and ControlLLLite are not supported")
    blocks = _indices(bare, r"input_blocks\.(\d+)\.")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in bare]
    per = (downs[0] - 1) if downs else len(blocks) - 1
    state = convert_controlnet_checkpoint(bare, {"layers_per_block": per})
    # the conditioning embedding at any depth: convolutions at the even indices (SiLUs between), the first takes the
    # control picture, the last (a zero convolution) gives the UNet's width; diffusers' converter knows SD's 0..14
    state = {k: v for k, v in state.items() if not k.startswith("controlnet_cond_embedding.")}
    hint = _indices(bare, r"input_hint_block\.(\d+)\.weight")
    targets = ["conv_in", *(f"blocks.{j}" for j in range(len(hint) - 2)), "conv_out"]
    for index, target in zip(hint, targets, strict=True):
        for kind in ("weight", "bias"):
            state[f"controlnet_cond_embedding.{target}.{kind}"] = bare[f"input_hint_block.{index}.{kind}"]
    for ours, theirs in (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")):
        for kind in ("weight", "bias"):  # SDXL's size embedding, which diffusers' converter leaves out
            if f"{theirs}.{kind}" in bare:
                state[f"{ours}.{kind}"] = bare[f"{theirs}.{kind}"]
    return {k: v for k, v in state.items() if v is not None}


def _kind(context: int, xl: bool) -> str:
    if xl:
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(context, f"a model with {context}-wide text features")


def check_fits(context: int, xl: bool, in_channels: int, parts, name: str) -> None:
    """One line when a ControlNet cannot run with this model: another text width, SDXL or not, other latents."""
    unet = parts.unet.config
    model_xl = bool(parts.family.xl)
    if context != unet.cross_attention_dim or xl != model_xl:
        raise ModelError(f"{name} is a ControlNet for {_kind(context, xl)} (text width {context}); {parts.name} is "
                         f"{parts.family.label} (text width {unet.cross_attention_dim}): use a ControlNet made for "
                         f"{_kind(unet.cross_attention_dim, model_xl)}")
    latents = parts.vae.config.latent_channels
    if in_channels != latents:
        raise ModelError(f"{name} takes {in_channels}-channel latents; {parts.name}'s have {latents}")


def config_from_shapes(shapes: Shapes, parts, name: str) -> dict:
    """diffusers ControlNetModel config from diffusers-named shapes, for the model ``parts`` (checked to fit)."""
    from .detect import _groups

    levels = _indices(shapes, r"down_blocks\.(\d+)\.")
    per = len(_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\."))
    if not levels or not per:
        raise ModelError(f"{name} has no encoder blocks (down_blocks / input_blocks); it is not a ControlNet")
    channels = [shapes[f"down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels]
    attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in shapes for i in levels]
    to_k = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise ModelError(f"{name} has no cross-attention; it is not a text-to-image ControlNet")
    context = shapes[to_k[0]][1]
    xl = "add_embedding.linear_1.weight" in shapes
    in_channels = shapes["conv_in.weight"][1]
    check_fits(context, xl, in_channels, parts, name)
    unet = parts.unet.config
    depths = [len(_indices(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in levels]
    depth_set = {d for d, a in zip(depths, attention, strict=True) if a}
    first = next(i for i, a in zip(levels, attention, strict=True) if a)
    hint_blocks = len(_indices(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight"))
    embedding = [shapes["controlnet_cond_embedding.conv_in.weight"][0],
                 *(shapes[f"controlnet_cond_embedding.blocks.{2 * j + 1}.weight"][0] for j in range(hint_blocks // 2))]
    if list(channels) == list(unet.block_out_channels):  # a copy of this UNet's encoder: its heads
        heads = unet.attention_head_dim
    elif parts.family.heads == "fixed8":
        heads = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    config = {
        "in_channels": in_channels,
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "block_out_channels": channels,
        "layers_per_block": per,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": len(shapes[f"down_blocks.{first}.attentions.0.proj_in.weight"]) == 2,
        "transformer_layers_per_block": depth_set.pop() if len(depth_set) == 1 else [max(1, d) for d in depths],
        "upcast_attention": bool(unet.upcast_attention),
        "norm_num_groups": 32 if min(channels) % 32 == 0 else _groups(min(channels)),
        "conditioning_embedding_out_channels": embedding,
        "global_pool_conditions": "shuffle" in name.lower(),
    }
    if xl:
        adm = shapes["add_embedding.linear_1.weight"][1]
        if adm != unet.projection_class_embeddings_input_dim:
            raise ModelError(f"{name}'s size embedding takes {adm} inputs, {parts.name}'s UNet "
                             f"{unet.projection_class_embeddings_input_dim}: a ControlNet for another SDXL kind "
                             "(the refiner?)")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=unet.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=adm)
    return config


def load_controlnet(file: ControlNetFile, parts):
    """A diffusers ControlNetModel from a library file or folder, for the model ``parts`` (fp32, on the CPU)."""
    import accelerate
    from diffusers import ControlNetModel

    from .load import _load_into, _short, load_state_dict, read_safetensors_header

    if file.format == "diffusers":
        try:
            model = ControlNetModel.from_pretrained(file.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelError(f"the ControlNet folder {file.path} is incomplete or broken: {_short(err)}") from err
        config = model.config
        check_fits(config.cross_attention_dim, config.addition_embed_type == "text_time", config.in_channels, parts,
                   file.name)
        return model.float()
    if file.path.suffix.lower() == ".safetensors":  # the architecture from the header: a mismatch is told at once
        config_from_shapes(to_diffusers(read_safetensors_header(file.path)[0], file.name), parts, file.name)
    sd = load_state_dict(file.path)
    state = to_diffusers(sd, file.name)
    del sd
    config = config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, parts, file.name)
    with accelerate.init_empty_weights():
        model = ControlNetModel.from_config(config)
    _load_into(model, state, f"ControlNet {file.name}")
    return model.float()

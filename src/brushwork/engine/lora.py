"""LoRAs on a loaded model, through diffusers' LoRA loading (peft adapters).

A LoRA file is loaded once into the model's UNet and text encoder(s) as a named adapter (diffusers converts the
kohya layout, ``lora_unet_*`` / ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*`` with ``.alpha``, and reads the
diffusers/peft layout), and stays there for later requests (at most ``MAX_ADAPTERS``; the oldest unused ones are
dropped). Each request sets the adapters its tags name at their strengths (``apply``) and switches them all off
after (``disable``). The model's own weights are never changed (nothing is fused): with its adapters off, every
layer computes exactly what it computed before the first LoRA, so a request without LoRAs gives the picture a
freshly loaded model gives, and switching LoRAs reloads nothing but the LoRA file.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from contextlib import contextmanager

from ..errors import ModelError

log = logging.getLogger(__name__)

MAX_ADAPTERS = 8  # LoRAs kept on a loaded model between requests (each 10-200 MB for SD 1.x)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# LyCORIS module types that diffusers' LoRA loading rejects, by a tensor of each (kohya's key layout:
# ``lora_unet_<module>.<tensor>``): LoHa, LoKr, (IA)^3, OFT, GLoRA, full weight differences, norms
LYCORIS_TENSORS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "weight": "(IA)^3",
                   "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "diff": "full", "w_norm": "norm"}
_DOWN_KEYS = ("lora_A.weight", "lora.down.weight", "lora_down.weight", "lora_linear_layer.down.weight")


def components(parts) -> dict:
    """The modules a LoRA can change: {"unet": ..., "text_encoder": ..., "text_encoder_2": ...} (those present)."""
    found = {name: getattr(parts, name, None) for name in ("unet", *TEXT_ENCODERS)}
    return {name: module for name, module in found.items() if module is not None}


def adapter_name(lora) -> str:
    """The adapter's name for this version of the file (peft module keys: no dots)."""
    st = lora.path.stat()
    return "lora_" + hashlib.sha1(f"{lora.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _adapters(module) -> list[str]:
    return list(getattr(module, "peft_config", None) or {})


def loaded(parts) -> list[str]:
    """The adapters on this model, oldest first."""
    names: dict[str, None] = {}
    for module in components(parts).values():
        names.update(dict.fromkeys(_adapters(module)))
    return list(names)


def load(parts, lora, *, keep: tuple[str, ...] = ()):
    """Load ``lora`` (a ``models.loras.LoraFile``) onto the model as an adapter, unless it is there already;
    (its adapter name, a note for the user or None). A LyCORIS file (LoHa, LoKr, (IA)^3, OFT, full, norm) is read
    for ``engine.lycoris`` instead: (its ``lycoris.Network``, note). Other adapters past ``MAX_ADAPTERS`` are
    dropped, never those in ``keep``. A file that fits no layer of this model, or that cannot be read, is a
    ModelError naming it."""
    name = adapter_name(lora)
    if name in loaded(parts):
        return name, None
    from ..models.load import load_state_dict
    from . import lycoris

    state = load_state_dict(lora.path)
    kinds = lycoris_kinds(state)
    if kinds:
        if not set(kinds) <= set(lycoris.KINDS):
            applied = ", ".join(("LoRA", "LoCon") + lycoris.KINDS[:-1]) + " and " + lycoris.KINDS[-1]
            raise ModelError(f"{lora.path.name} is a LyCORIS {'/'.join(kinds)} file; brushwork applies {applied} "
                             "files, not yet LyCORIS' other kinds: use a LoRA version of it")
        return lycoris.read(parts, state, lora)
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading runs on it)
    except ImportError as err:
        raise ModelError("LoRAs need the peft package (a dependency of brushwork): pip install peft") from err
    _remove_offload_hooks(parts)
    _evict(parts, keep=(*keep, name))
    try:
        expected, got = _load_adapter(parts, state, name)
    except Exception as err:  # diffusers' and peft's errors (size mismatches, unknown layouts) vary in type
        _delete(parts, name)
        first = str(err).strip().splitlines()
        detail = " ".join(first[:3])[:300] if first else type(err).__name__
        raise ModelError(f"{lora.path.name} does not fit this model ({detail}); is it a LoRA for another model "
                         "family (SD 1.x, SD 2.x, SDXL)?") from err
    if got == 0:
        _delete(parts, name)
        raise ModelError(f"{lora.path.name} changes no layer of this model: its {expected} layers are named for "
                         "another model family (SD 1.x, SD 2.x, SDXL) or a layout brushwork does not read")
    note = None
    if got < expected:
        note = f"LoRA {lora.name}: {expected - got} of its {expected} layers are not in this model; left out"
    return name, note


def lycoris_kinds(state: dict) -> list[str]:
    """The LyCORIS module types (other than LoRA/LoCon) a kohya-layout state dict holds, e.g. ["LoHa"]."""
    kinds = set()
    for key in state:
        if key.startswith(("lora_unet_", "lora_te", "lycoris_")):
            kind = LYCORIS_TENSORS.get(key.partition(".")[2])
            if kind:
                kinds.add(kind)
    return sorted(kinds)


def _load_adapter(parts, state: dict, name: str) -> tuple[int, int]:
    """diffusers' conversion and loading, into each component the file has layers for; (layers in the file,
    layers loaded)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    found = components(parts)
    mixin = StableDiffusionXLLoraLoaderMixin if "text_encoder_2" in found else StableDiffusionLoraLoaderMixin
    with _quiet():
        converted, alphas = mixin.lora_state_dict(dict(state), unet_config=found["unet"].config)
        converted = _fit_1x1(converted, found["unet"])
        if not converted or not all("lora" in key for key in converted):
            raise ValueError("not a LoRA: its tensors are not named lora_*")
        if any(key.startswith("unet.") for key in converted):
            mixin.load_lora_into_unet(converted, alphas, found["unet"], adapter_name=name)
        elif not any(key.startswith(TEXT_ENCODERS) for key in converted):  # a bare peft/diffusers UNet layout
            found["unet"].load_lora_adapter(converted, prefix=None, network_alphas=alphas, adapter_name=name)
        for prefix in TEXT_ENCODERS:
            if prefix in found and any(key.startswith(prefix + ".") for key in converted):
                mixin.load_lora_into_text_encoder(converted, alphas, found[prefix], prefix=prefix,
                                                  adapter_name=name)
    expected = sum(1 for key in converted if key.endswith(_DOWN_KEYS))
    got = sum(1 for module in found.values() for sub in module.modules()
              if name in (getattr(sub, "lora_A", None) or {}))
    return expected, got


_UP_DOWN_KEYS = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight")  # as converted


def _fit_1x1(converted: dict, unet) -> dict:
    """A 1x1 convolution's up / down stored as Linear-shaped 2-D tensors (some trainers write SD 1.x's proj_in /
    proj_out so) taken as that convolution's, ``(out, in, 1, 1)``, and 4-D 1x1 ones for a Linear layer (SD 1.x's
    proj_in on SD 2.x's and SDXL's Linear one) as Linear ones, as A1111's ``network_lora.py`` reshapes them; peft
    refuses both shapes. Other tensors are left as they are."""
    import torch

    fitted = {}
    for key, tensor in converted.items():
        suffix = next((s for s in _UP_DOWN_KEYS if key.endswith(s)), None)
        if suffix is not None and tensor.dim() in (2, 4):
            try:
                layer = unet.get_submodule(key[:-len(suffix)].removeprefix("unet."))
            except AttributeError:  # a text encoder's layer, or a name peft maps itself (attention processors)
                layer = None
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
            elif isinstance(layer, torch.nn.Linear) and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
                tensor = tensor.flatten(1)
        fitted[key] = tensor
    return fitted


def apply(parts, uses: list[tuple[str, float, float]]) -> None:
    """Exactly the adapters ``uses`` names on, each at its strengths: (adapter, text encoder weight, UNet
    weight); a strength of 0 leaves that adapter off in that part. Every other adapter is off."""
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    for part, module in components(parts).items():
        present = set(_adapters(module))
        if not present:
            continue
        active: dict[str, float] = {}
        for name, te, unet in uses:
            weight = unet if part == "unet" else te
            if name in present and weight != 0:
                active[name] = active.get(name, 0.0) + float(weight)
        if part == "unet":
            if not active:
                module.disable_lora()
                continue
            module.enable_lora()
            module.set_adapters(list(active), list(active.values()))
        else:
            if not active:
                disable_lora_for_text_encoder(module)
                continue
            enable_lora_for_text_encoder(module)
            set_adapters_for_text_encoder(list(active), module, list(active.values()))


def disable(parts) -> None:
    """Every adapter off: the model computes what it computed as loaded."""
    apply(parts, [])


def _delete(parts, name: str) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers

    with _quiet():
        for part, module in components(parts).items():
            if name not in _adapters(module):
                continue
            if part == "unet":
                module.delete_adapters([name])
            else:
                delete_adapter_layers(module, name)


def _evict(parts, *, keep: tuple[str, ...]) -> None:
    """Drop the oldest adapters not in ``keep`` until one more fits under MAX_ADAPTERS."""
    names = [n for n in loaded(parts) if n not in keep]
    while names and len(loaded(parts)) >= MAX_ADAPTERS:
        _delete(parts, names.pop(0))


def _remove_offload_hooks(parts) -> None:
    """Take off the CPU-offload hooks a previous run's memory mode left (as diffusers' pipelines do before they load
    a LoRA: new layers must land beside real weights, not offloaded ones); the run's pipelines put its own back."""
    for module in components(parts).values():
        if hasattr(module, "_hf_hook"):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(module, recurse=True)


@contextmanager
def _quiet():
    """diffusers' and transformers' loading reports and progress bars off (the note above says what matters)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bar = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # peft's "multiple adapters", "active adapter deleted": by design here
            warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bar:
            transformers_logging.enable_progress_bar()

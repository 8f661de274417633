"""LyCORIS LoHa and LoKr files, which diffusers' LoRA loading refuses (and peft reads only in its own layout).

Each module of such a file (kohya's layout: ``lora_unet_<module path with _>.hada_w1_a`` ...; LoRA/LoCon modules
beside them too) gets its weight difference as A1111's Lora extension computes it (``network_hada.py``,
``network_lokr.py``, ``lyco_helpers.py``: Hadamard product of two low-rank products, Kronecker product of two
factors, times alpha / rank), and a forward hook adds ``strength * difference`` applied to the layer's input to
its output while the request runs. The model's weights are never changed: with the hooks removed every layer
computes exactly what it did before. The differences are computed on each call (a few small matrix products),
so a file costs no memory beyond its own tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ModelError

KINDS = ("LoHa", "LoKr")  # what this module applies (with plain LoRA/LoCon modules in the same file)
# where a component's modules are in kohya's names
PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


@dataclass(eq=False)  # compared by identity: a plan holds the same objects from request to request
class Module:
    target: object  # the model's layer (nn.Linear / nn.Conv2d, or a peft wrapper around one)
    part: str  # "unet", "text_encoder", "text_encoder_2": which strength applies
    tensors: dict  # the file's tensors of this module, by their names (hada_w1_a, lokr_w1, lora_up.weight ...)

    def difference(self, weight):
        """The weight difference times its scale (alpha / rank where the file has alpha), shaped as ``weight``."""
        import torch

        t = {k: v.to(weight.device, torch.float32) for k, v in self.tensors.items()}
        shape, dim = weight.shape, None
        if "hada_w1_a" in t:
            dim = t["hada_w1_b"].shape[0]
            w1 = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) if "hada_t1" in t else _product(
                t["hada_w1_a"], t["hada_w1_b"])
            w2 = _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]) if "hada_t2" in t else _product(
                t["hada_w2_a"], t["hada_w2_b"])
            delta = (w1.reshape(shape) * w2.reshape(shape))
        elif any(k.startswith("lokr_") for k in t):
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            for key in ("lokr_w1_b", "lokr_w2_b"):  # the rank of a decomposed factor (A1111 keeps the last)
                if key in t:
                    dim = t[key].shape[0]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            delta = torch.kron(w1, w2.contiguous()).reshape(shape)
        else:  # a LoRA / LoCon module
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            dim = down.shape[0]
            if "lora_mid.weight" in t:
                delta = torch.einsum("n m k l, i n, m j -> i j k l", t["lora_mid.weight"], up.flatten(1),
                                     down.flatten(1))
            else:
                delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        alpha = self.tensors.get("alpha")
        scale = float(alpha) / dim if alpha is not None and dim else 1.0
        return delta.reshape(shape) * scale


def _product(a, b):
    return a.flatten(1) @ b.flatten(1)


def _cp(t, wa, wb):
    """A Tucker-decomposed (CP) factor: ``lyco_helpers.make_weight_cp``."""
    import torch

    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


@dataclass(eq=False)
class Network:
    """One LyCORIS file read onto one model: its modules, by the model's layers."""

    name: str
    modules: list[Module] = field(default_factory=list)


def _layers(parts) -> dict[str, tuple[str, object]]:
    """kohya's module name -> (component, layer) for every Linear / Conv2d of the model (peft's wrappers keep the
    layer's path; their insides are left out)."""
    import torch

    from .lora import components

    out = {}
    for part, model in components(parts).items():
        for name, module in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
                for prefix in PREFIXES.get(part, ()):
                    out[prefix + name.replace(".", "_")] = (part, module)
    return out


def read(parts, state: dict, lora) -> tuple[Network, str | None]:
    """The file's modules on this model's layers; (network, a note for the user or None). ModelError where none
    of its modules is a layer of this model."""
    grouped: dict[str, dict] = {}
    for key, tensor in state.items():
        module, _, tensor_name = key.partition(".")
        grouped.setdefault(module, {})[tensor_name] = tensor
    layers = _layers(parts)
    network = Network(lora.name)
    for module, tensors in grouped.items():
        if module in layers and _known(tensors):
            part, layer = layers[module]
            network.modules.append(Module(layer, part, tensors))
    if not network.modules:
        raise ModelError(f"{lora.path.name} changes no layer of this model: its {len(grouped)} modules are named for "
                         "another model family (SD 1.x, SD 2.x, SDXL) or a layout brushwork does not read")
    missing = len(grouped) - len(network.modules)
    note = f"LoRA {lora.name}: {missing} of its {len(grouped)} modules are not in this model; left out" if missing \
        else None
    return network, note


def _known(tensors: dict) -> bool:
    return (all(k in tensors for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
            or (("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= set(tensors))
                and ("lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= set(tensors)))
            or {"lora_up.weight", "lora_down.weight"} <= set(tensors))


class Hooks:
    """The forward hooks that put networks on the model; ``remove`` takes them all off."""

    def __init__(self):
        self._handles: list = []

    def attach(self, uses: list[tuple[Network, float, float]]) -> None:
        """Each network at its strengths (text encoder, UNet); a strength of 0 adds nothing there."""
        import torch
        import torch.nn.functional as F

        for network, te, unet in uses:
            for module in network.modules:
                strength = unet if module.part == "unet" else te
                if strength == 0:
                    continue

                def hook(layer, args, output, module=module, strength=float(strength)):
                    base = getattr(layer, "base_layer", layer)
                    x = args[0]
                    delta = module.difference(base.weight).to(x.dtype)
                    if isinstance(base, torch.nn.Conv2d):
                        extra = F.conv2d(x, delta, None, base.stride, base.padding, base.dilation, base.groups)
                    else:
                        extra = F.linear(x, delta)
                    return output + strength * extra

                self._handles.append(module.target.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

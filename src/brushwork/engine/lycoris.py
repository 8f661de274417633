"""LyCORIS files (LoHa, LoKr, (IA)^3, OFT, full weight differences, norms), which diffusers' LoRA loading refuses
(and peft reads only in its own layout).

Each module of such a file (kohya's layout: ``lora_unet_<module path with _>.hada_w1_a`` ...; LoRA/LoCon modules
beside them too) gets its weight difference as A1111's Lora extension computes it (``network_hada.py``,
``network_lokr.py``, ``network_ia3.py``, ``network_oft.py``, ``network_full.py``, ``network_norm.py``,
``lyco_helpers.py``): Hadamard product of two low-rank products, Kronecker product of two factors (each times
alpha / rank); the layer's own weight scaled per output (or input) channel ((IA)^3); the weight's blocks of rows
rotated, minus the weight (OFT); the stored difference itself (full, norm), with a bias difference where the file
has one. A forward hook adds ``strength * difference`` applied to the layer's input to its output while the request
runs. The model's weights are never changed: with the hooks removed every layer computes exactly what it did
before. The differences are computed on each call (a few small matrix products), so a file costs no memory beyond
its own tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ModelError

KINDS = ("LoHa", "LoKr", "(IA)^3", "OFT", "full", "norm")  # what this module applies (LoRA/LoCon modules too)
# where a component's modules are in kohya's names
PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


@dataclass(eq=False)  # compared by identity: a plan holds the same objects from request to request
class Module:
    target: object  # the model's layer (nn.Linear / nn.Conv2d / a norm, or a peft wrapper around one)
    part: str  # "unet", "text_encoder", "text_encoder_2": which strength applies
    tensors: dict  # the file's tensors of this module, by their names (hada_w1_a, lokr_w1, lora_up.weight ...)

    def difference(self, weight):
        """The weight difference times its scale (alpha / rank where the file has alpha and a rank), shaped as
        ``weight``; (IA)^3 and OFT differences are made from ``weight`` itself."""
        import torch

        t = {k: v.to(weight.device, torch.float32) for k, v in self.tensors.items()}
        shape, dim = weight.shape, None  # dim: the rank alpha divides by; None for the kinds that have none
        if "weight" in t:  # (IA)^3: one factor per output channel, or per input channel where on_input
            axis = 1 if _on_input(self.tensors) else 0
            view = [1] * weight.dim()
            view[axis] = -1
            return weight.to(torch.float32) * t["weight"].reshape(view)
        if "oft_blocks" in t or "oft_diag" in t:
            return _rotated(weight.to(torch.float32), _rotations(t, shape[0])) - weight.to(torch.float32)
        if "diff" in t or "w_norm" in t:  # a full difference (A1111 scales neither by alpha)
            return t["diff" if "diff" in t else "w_norm"].reshape(shape)
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

    def bias_difference(self, like):
        """The bias difference of a full or norm module (``diff_b``, ``b_norm``), as ``like``'s dtype; None else."""
        bias = self.tensors.get("diff_b", self.tensors.get("b_norm"))
        return None if bias is None else bias.to(like.device, like.dtype).flatten()

    def change(self, layer, x):
        """What this module adds to ``layer``'s output for the input ``x``, at strength 1."""
        import torch
        import torch.nn.functional as F

        if isinstance(layer, torch.nn.LayerNorm | torch.nn.GroupNorm):  # (w + w_norm) * normed + (b + b_norm)
            if isinstance(layer, torch.nn.LayerNorm):
                normed = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
                view = tuple(layer.normalized_shape)
            else:
                normed = F.group_norm(x, layer.num_groups, None, None, layer.eps)
                view = (-1,) + (1,) * (x.dim() - 2)
            extra = normed * self.tensors["w_norm"].to(x.device, x.dtype).reshape(view)
            bias = self.bias_difference(x)
            return extra if bias is None else extra + bias.reshape(view)
        delta = self.difference(layer.weight).to(x.dtype)
        bias = self.bias_difference(x)
        if isinstance(layer, torch.nn.Conv2d):
            return F.conv2d(x, delta, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        return F.linear(x, delta, bias)


def _on_input(tensors: dict) -> bool:
    flag = tensors.get("on_input")
    return bool(flag.item()) if flag is not None else False


def _rotations(t: dict, out_dim: int):
    """OFT's block rotations R, (blocks, size, size) (``network_oft.py``): kohya's ``oft_blocks`` (and LyCORIS'
    constrained ones) are made orthogonal by Cayley's transform of their skew-symmetric part Q, whose norm is
    first limited to alpha * out_dim; LyCORIS' unconstrained ``oft_diag`` is stored as R itself."""
    import torch

    if "oft_diag" in t:
        return t["oft_diag"]
    blocks = t["oft_blocks"]
    q = blocks - blocks.transpose(1, 2)
    if "alpha" in t:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=float(t["alpha"]) * out_dim) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[1], device=q.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rotated(weight, rotations):
    """The weight with each block of ``size`` output rows (block k) replaced by R_k^T times it."""
    import torch

    blocks, size = rotations.shape[:2]
    grouped = weight.reshape(blocks, size, *weight.shape[1:])
    return torch.einsum("k n m, k n ... -> k m ...", rotations, grouped).reshape(weight.shape)


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
    """kohya's module name -> (component, layer) for every Linear / Conv2d / LayerNorm / GroupNorm of the model
    (peft's wrappers keep the layer's path; their insides are left out). A text encoder's layers are found by
    kohya's names too (``lora_te_text_model_encoder_layers_0_...``) where transformers' CLIP has no ``text_model``
    level (transformers 5: ``encoder.layers.0...``)."""
    import torch

    from .lora import components

    out = {}
    for part, model in components(parts).items():
        for name, module in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, torch.nn.Linear | torch.nn.Conv2d | torch.nn.LayerNorm | torch.nn.GroupNorm):
                names = [name] if part == "unet" or name.startswith("text_model.") else [name, "text_model." + name]
                for prefix in PREFIXES.get(part, ()):
                    for known in names:
                        out[prefix + known.replace(".", "_")] = (part, module)
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
        if module in layers and _known(tensors) and _fits(tensors, layers[module][1]):
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
            or {"lora_up.weight", "lora_down.weight"} <= set(tensors)
            or any(k in tensors for k in ("weight", "oft_blocks", "oft_diag", "diff", "w_norm")))


def _fits(tensors: dict, target) -> bool:
    """Whether the layer is of the type a module's kind changes, and (for the kinds whose tensors are per channel
    or whole weights) of its sizes; a module that does not fit is left out like one this model does not have."""
    import math

    import torch

    layer = getattr(target, "base_layer", target)
    if isinstance(layer, torch.nn.LayerNorm | torch.nn.GroupNorm):
        channels = math.prod(layer.normalized_shape) if isinstance(layer, torch.nn.LayerNorm) else layer.num_channels
        bias = tensors.get("b_norm")
        return "w_norm" in tensors and tensors["w_norm"].numel() == channels and (bias is None or
                                                                                 bias.numel() == channels)
    if "w_norm" in tensors:
        return False
    weight = layer.weight
    if "weight" in tensors:
        return tensors["weight"].numel() == weight.shape[1 if _on_input(tensors) else 0]
    if "diff" in tensors:
        bias = tensors.get("diff_b")
        return tensors["diff"].numel() == weight.numel() and (bias is None or bias.numel() == weight.shape[0])
    blocks = tensors.get("oft_blocks", tensors.get("oft_diag"))
    if blocks is not None:
        return blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2] and blocks.shape[0] * blocks.shape[1] == \
            weight.shape[0]
    return True


class Hooks:
    """The forward hooks that put networks on the model; ``remove`` takes them all off."""

    def __init__(self):
        self._handles: list = []

    def attach(self, uses: list[tuple[Network, float, float]]) -> None:
        """Each network at its strengths (text encoder, UNet); a strength of 0 adds nothing there."""
        for network, te, unet in uses:
            for module in network.modules:
                strength = unet if module.part == "unet" else te
                if strength == 0:
                    continue

                def hook(layer, args, output, module=module, strength=float(strength)):
                    return output + strength * module.change(getattr(layer, "base_layer", layer), args[0])

                self._handles.append(module.target.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

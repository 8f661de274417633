"""Read a checkpoint's architecture from its tensor names and shapes (ComfyUI-style).

Input is a mapping ``key -> shape`` (from a safetensors header, without reading the weights,
or from a loaded state dict). Output is a ``Detected``: the family plus diffusers configs for
the UNet, the VAE and the text encoder. Any fine-tune loads without a config file; a layout we
do not know is an error naming what was found, never a silent default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ModelError
from .convert import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    XL_CLIP_PREFIX,
    XL_OPENCLIP_PREFIX,
    XL_REFINER_OPENCLIP_PREFIX,
)
from .families import SD_VAE_SCALING_FACTOR, Family, find_family, shipped_config

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detected:
    family: Family
    unet: dict
    vae: dict
    text_encoder: dict  # transformers CLIPTextConfig kwargs
    text_encoder_kind: str
    notes: list[str] = field(default_factory=list)
    text_encoder_2: dict | None = None  # SDXL: OpenCLIP bigG (CLIPTextConfig kwargs, with its projection)
    depth_estimator: dict | None = None  # SD 2 depth's MiDaS DPT-Hybrid (DPTConfig kwargs), when the file has one


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def family_name(shapes: Shapes, *, text_encoder: str | None = None, in_channels: int | None = None,
                xl: bool = False) -> str | None:
    """What a file is, from its key names and the UNet's input width alone (no configs built): a family of
    ``families.FAMILIES`` ("sd1", "sd2-inpaint", ...), one this version does not load yet ("sdxl",
    "sdxl-refiner", "sd2-depth", "sd2-x4-upscaler", ...), "vae" or "lora"; None if it cannot be told. For a
    diffusers folder pass ``text_encoder``, ``in_channels`` and ``xl`` instead of shapes."""
    keys = shapes.keys()
    if shapes:
        if f"{UNET_PREFIX}label_emb.0.0.weight" in shapes or any(k.startswith("conditioner.embedders.")
                                                                  for k in keys):
            channels = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight", (0, 4))[1]
            if f"{XL_REFINER_OPENCLIP_PREFIX}token_embedding.weight" in shapes:  # bigG first and alone
                return "sdxl-refiner"
            return "sdxl-inpaint" if channels == 9 else "sdxl"
        if f"{UNET_PREFIX}input_blocks.0.0.weight" not in shapes:
            if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
                return "vae"
            if any("lora_" in k or k.startswith(("lycoris_", "lora.")) for k in keys):
                return "lora"
            return None
        in_channels = shapes[f"{UNET_PREFIX}input_blocks.0.0.weight"][1]
        if any(k.startswith(CLIP_PREFIX) for k in keys):
            text_encoder = "clip"
        elif any(k.startswith(OPENCLIP_PREFIX) for k in keys):
            text_encoder = "openclip"
        else:
            return None
    if xl:
        return "sdxl-inpaint" if in_channels == 9 else "sdxl"
    if text_encoder is None or in_channels is None:
        return None
    family = find_family(text_encoder, in_channels)
    if family is not None:
        return family.name
    base = "sd1" if text_encoder == "clip" else "sd2"
    return {5: f"{base}-depth", 7: f"{base}-x4-upscaler"}.get(in_channels)


def detect(shapes: Shapes, name: str = "checkpoint") -> Detected:
    keys = shapes.keys()
    has_unet = f"{UNET_PREFIX}input_blocks.0.0.weight" in shapes
    if any(k.startswith(("model.diffusion_model.joint_blocks", "double_blocks.", "transformer_blocks."))
           for k in keys):
        raise ModelError(f"{name} is a transformer (SD3/Flux-style) model; this version loads SD 1.x, 2.x and XL")
    if has_unet and (any(k.startswith("conditioner.embedders.") for k in keys)
                     or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes):
        return _detect_xl(shapes, name)
    if not has_unet:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        if any(k.startswith(("encoder.", "decoder.")) for k in keys):
            raise ModelError(f"{name} looks like a VAE on its own; pass it with --vae and pick a model with --model")
        if any("lora_" in k for k in keys):
            raise ModelError(f"{name} looks like a LoRA, not a full model; LoRA support is coming")
        raise ModelError(f"{name} is not a Stable Diffusion checkpoint I know (found keys like: {sample})")

    if any(k.startswith(CLIP_PREFIX) for k in keys):
        te_kind = "clip"
    elif any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        te_kind = "openclip"
    else:
        raise ModelError(f"{name} has a UNet but no text encoder I know (CLIP or OpenCLIP); it cannot be used alone")
    in_channels = shapes[f"{UNET_PREFIX}input_blocks.0.0.weight"][1]
    family = find_family(te_kind, in_channels)
    if family is None:
        raise ModelError(
            f"{name}: a {te_kind} model with a {in_channels}-channel UNet input is not supported yet "
            "(known: 4 = text-to-image, 9 = inpainting, 5 = SD 2 depth)"
        )
    text_encoder = _clip_config(shapes) if te_kind == "clip" else _openclip_config(shapes)
    unet = _unet_config(shapes, family, text_encoder["hidden_size"])
    vae = _vae_config(shapes, name)
    if family.configs is not None:  # what the shapes cannot say (VAE scaling factor, native sizes): shipped
        unet = {**unet, "sample_size": shipped_config(family, "unet")["sample_size"]}
        shipped_vae = shipped_config(family, "vae")
        vae = {**vae, "scaling_factor": shipped_vae["scaling_factor"], "sample_size": shipped_vae["sample_size"]}
    detected = Detected(family, unet, vae, text_encoder, te_kind)
    if family.unet_in_channels == 5:
        from . import dpt

        detected.depth_estimator = dpt.config_from_shapes(shapes) if dpt.has_depth_estimator(shapes) else None
    return detected


def _detect_xl(shapes: Shapes, name: str) -> Detected:
    """SDXL base (CLIP-L at ``conditioner.embedders.0.transformer.``, OpenCLIP bigG at ``embedders.1.model.``), its
    inpainting model (9 input channels) and the refiner (bigG alone, at ``embedders.0.model.``)."""
    keys = shapes.keys()
    in_channels = shapes[f"{UNET_PREFIX}input_blocks.0.0.weight"][1]
    clip_l = f"{XL_CLIP_PREFIX}text_model.embeddings.token_embedding.weight" in shapes
    refiner = not clip_l and f"{XL_REFINER_OPENCLIP_PREFIX}token_embedding.weight" in shapes
    big_g = XL_REFINER_OPENCLIP_PREFIX if refiner else XL_OPENCLIP_PREFIX
    if f"{big_g}token_embedding.weight" not in shapes or not (clip_l or refiner):
        found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")})[:4]
        raise ModelError(f"{name} is an SDXL UNet without the text encoders SDXL needs (CLIP-L and OpenCLIP bigG); "
                         f"found: {', '.join(found) or 'none'}")
    family = find_family("sdxl-refiner" if refiner else "sdxl", in_channels)
    if family is None:
        raise ModelError(f"{name}: an SDXL model with a {in_channels}-channel UNet input is not supported "
                         "(known: 4 = text-to-image, 9 = inpainting)")
    text_encoder_2 = _openclip_config(shapes, big_g, penultimate_only=False)
    text_encoder = {} if refiner else _clip_config(shapes, XL_CLIP_PREFIX)
    context = text_encoder_2["hidden_size"] + text_encoder.get("hidden_size", 0)
    unet = _unet_config(shapes, family, context)
    # label_emb: the pooled bigG text, then 6 (base: size, crop, target size) or 5 (refiner: size, crop,
    # aesthetic score) numbers, each embedded in addition_time_embed_dim sinusoids
    adm = shapes[f"{UNET_PREFIX}label_emb.0.0.weight"][1]
    numbers = 5 if refiner else 6
    per_number, rest = divmod(adm - text_encoder_2["projection_dim"], numbers)
    if rest or per_number <= 0:
        raise ModelError(f"{name}: the UNet's size embedding ({adm} inputs) does not fit the text encoder's pooled "
                         f"width {text_encoder_2['projection_dim']} and {numbers} size numbers")
    unet.update(addition_embed_type="text_time", addition_time_embed_dim=per_number,
                projection_class_embeddings_input_dim=adm,
                sample_size=shipped_config(family, "unet")["sample_size"])
    vae = _vae_config(shapes, name)
    shipped_vae = shipped_config(family, "vae")
    vae.update(scaling_factor=shipped_vae["scaling_factor"], sample_size=shipped_vae["sample_size"],
               force_upcast=shipped_vae["force_upcast"])
    detected = Detected(family, unet, vae, text_encoder, family.text_encoder)
    detected.text_encoder_2 = text_encoder_2
    return detected


def _unet_config(shapes: Shapes, family: Family, text_width: int) -> dict:
    p = UNET_PREFIX
    model_channels, in_channels = shapes[f"{p}input_blocks.0.0.weight"][:2]
    blocks = _indices(shapes, rf"{re.escape(p)}input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"{p}input_blocks.{i}.0.op.weight" in shapes]
    per = (downsamplers[0] - 1) if downsamplers else len(blocks) - 1
    n_levels = len(downsamplers) + 1
    channels, down_types = [], []
    for level in range(n_levels):
        first = 1 + level * (per + 1)
        channels.append(shapes[f"{p}input_blocks.{first}.0.out_layers.3.weight"][0])
        has_attn = f"{p}input_blocks.{first}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
    attn_keys = [k for k in shapes if ".attn2.to_k.weight" in k]
    if not attn_keys:
        raise ModelError("the UNet has no cross-attention layers; this is not a text-to-image Stable Diffusion model")
    context_dim = shapes[attn_keys[0]][1]
    if context_dim != text_width:
        raise ModelError(f"the UNet expects text features of width {context_dim}, the text encoder gives {text_width}")
    first_attn = next(f"{p}input_blocks.{1 + lv * (per + 1)}.1" for lv in range(n_levels)
                      if down_types[lv].startswith("CrossAttn"))
    depths = [len(_indices(shapes, rf"{re.escape(p)}input_blocks\.{1 + lv * (per + 1)}\.1\."
                                   rf"transformer_blocks\.(\d+)\.")) for lv in range(n_levels)]
    attn_depths = {d for d, t in zip(depths, down_types, strict=True) if t.startswith("CrossAttn")}
    # SDXL has more transformer blocks in deeper levels ([1, 2, 10]); SD 1.x/2.x the same everywhere
    depth: int | list[int] = attn_depths.pop() if len(attn_depths) == 1 else [max(d, 1) for d in depths]
    linear = len(shapes[f"{first_attn}.proj_in.weight"]) == 2
    if family.heads == "fixed8":
        heads: int | list[int] = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    up_types = [t.replace("Down", "Up") for t in reversed(down_types)]
    config = {
        "sample_size": family.default_size // 8,
        "in_channels": in_channels,
        "out_channels": shapes[f"{p}out.2.weight"][0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": per,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "upcast_attention": family.upcast_attention,
        "norm_num_groups": 32 if min(channels) % 32 == 0 else _groups(min(channels)),
    }
    time_width = shapes[f"{p}time_embed.0.weight"][0]
    if time_width != 4 * model_channels:  # SD's is 4x the first level's width; small models may differ
        config["time_embedding_dim"] = time_width
    if (cond := shapes.get(f"{p}time_embedding.cond_proj.weight")) is not None:  # an LCM UNet's guidance embedding
        config["time_cond_proj_dim"] = cond[1]
    cross_only = _cross_only(shapes, family, channels, per, context_dim)
    if any(cross_only):
        config["only_cross_attention"] = cross_only
    if (mid := shapes.get(f"{p}middle_block.1.transformer_blocks.0.attn1.to_k.weight")) is not None:
        if mid[1] == context_dim != channels[-1]:
            config["mid_block_only_cross_attention"] = True
    if f"{p}label_emb.weight" in shapes:  # a class embedding (the x4 upscaler's noise level: one of 1000)
        config["num_class_embeds"] = shapes[f"{p}label_emb.weight"][0]
    return config


def _cross_only(shapes: Shapes, family: Family, channels: list[int], per: int, context_dim: int) -> list[bool]:
    """Per level, whether the first attention of each transformer block reads the text instead of the picture
    (the original's ``disable_self_attentions``, diffusers' ``only_cross_attention``): its keys then have the
    text's width. Where the level is as wide as the text the shapes cannot tell; the family's shipped config
    does (the x4 upscaler's deepest level, 1024 wide beside OpenCLIP-H's 1024), else self-attention."""
    p = UNET_PREFIX
    known = shipped_config(family, "unet").get("only_cross_attention") if family.configs else None
    out = []
    for level, width in enumerate(channels):
        key = f"{p}input_blocks.{1 + level * (per + 1)}.1.transformer_blocks.0.attn1.to_k.weight"
        if key not in shapes:
            out.append(False)  # no attention at this level
        elif width == context_dim:
            out.append(bool(known[level]) if isinstance(known, list) and len(known) == len(channels) else False)
        else:
            out.append(shapes[key][1] == context_dim)
    return out


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def _vae_config(shapes: Shapes, name: str) -> dict:
    p = VAE_PREFIX
    if f"{p}encoder.conv_in.weight" not in shapes:
        raise ModelError(f"{name} has no VAE (first_stage_model.*); pass one with --vae")
    levels = _indices(shapes, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    per = len(_indices(shapes, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."))
    channels = [shapes[f"{p}encoder.down.{i}.block.{per - 1}.conv2.weight"][0] for i in levels]
    latent = shapes[f"{p}post_quant_conv.weight"][0]
    return {
        "in_channels": shapes[f"{p}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{p}decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": per,
        "latent_channels": latent,
        "norm_num_groups": 32 if min(channels) % 32 == 0 else _groups(min(channels)),
        "scaling_factor": SD_VAE_SCALING_FACTOR,
        "sample_size": 512,
    }


def _clip_config(shapes: Shapes, prefix: str = CLIP_PREFIX) -> dict:
    p = prefix + "text_model."
    if f"{p}embeddings.token_embedding.weight" not in shapes:
        p = prefix  # checkpoints saved with old transformers have no "text_model." level
    vocab, width = shapes[f"{p}embeddings.token_embedding.weight"]
    layers = len(_indices(shapes, rf"{re.escape(p)}encoder\.layers\.(\d+)\."))
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shapes[f"{p}encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": shapes[f"{p}embeddings.position_embedding.weight"][0],
        "hidden_act": "quick_gelu",
        "projection_dim": width,
    }


def _openclip_config(shapes: Shapes, prefix: str = OPENCLIP_PREFIX, *, penultimate_only: bool = True) -> dict:
    """``penultimate_only`` (SD 2.x): the last block is left out, SD 2.x never reads it; SDXL keeps every block
    (its pooled embedding comes from the last)."""
    p = prefix
    vocab, width = shapes[f"{p}token_embedding.weight"]
    blocks = len(_indices(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\."))
    if blocks < 2:
        raise ModelError("the OpenCLIP text encoder has fewer than 2 layers; SD 2.x and XL use the penultimate one")
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shapes[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": blocks - 1 if penultimate_only else blocks,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": shapes[f"{p}positional_embedding"][0],
        "hidden_act": "gelu",
        "projection_dim": shapes.get(f"{p}text_projection", (width, width))[-1],
    }

"""Write diffusers components back into the original CompVis/Stability single-file key layout.

Loading the original layout uses diffusers' own converters (``load.py``); this module is the
inverse, used to save our bundled mini model and to build test checkpoints in the exact layout
a real ``sd-v1-4.ckpt`` or ``v2-1_768-ema-pruned.safetensors`` has. A round-trip test checks
that original -> diffusers (by diffusers' converter) gives back every tensor unchanged.
"""

from __future__ import annotations

from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
# SDXL (sgm's GeneralConditioner): base = CLIP-L then OpenCLIP bigG; the refiner has bigG alone, first
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
XL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

_RESNET_UNET = {  # diffusers resnet -> original ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(sd: dict, prefix_map: list[tuple[str, str]], inner: dict[str, str] | None = None) -> dict:
    """Map keys by the first matching (diffusers prefix -> original prefix); optionally rename the part after it."""
    out = {}
    for key, value in sd.items():
        for new, old in prefix_map:
            if key.startswith(new + "."):
                rest = key[len(new) + 1 :]
                if inner:
                    head, _, tail = rest.rpartition(".")  # e.g. "conv1" / "weight", "to_out.0" / "bias"
                    rest = f"{inner.get(head, head)}.{tail}"
                out[old + "." + rest] = value
                break
        else:
            raise KeyError(f"no original-layout name for {key}")
    return out


def unet_to_original(sd: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    n_levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    resnets: list[tuple[str, str]] = []
    plain: list[tuple[str, str]] = [
        ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("class_embedding", "label_emb"),  # an nn.Embedding of classes (the x4 upscaler's noise levels)
        # an LCM UNet's guidance embedding: the original layout has none, LCM single files keep diffusers' name
        ("time_embedding.cond_proj", "time_embedding.cond_proj"),
        ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),  # SDXL's sizes
    ]
    resnets += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    for i in range(n_levels):
        for j in range(per):
            idx = 1 + i * (per + 1) + j
            resnets.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0"))
            plain.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1"))
        if i < n_levels - 1:
            plain.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (per + 1) + per}.0.op"))
        has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            idx = i * (per + 1) + j
            resnets.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0"))
            plain.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1"))
        if i < n_levels - 1:
            last = i * (per + 1) + per
            plain.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if has_attn else 1}.conv"))
    res_keys = {k: v for k, v in sd.items() if any(k.startswith(n + ".") for n, _ in resnets)}
    other = {k: v for k, v in sd.items() if k not in res_keys}
    out = _rename(res_keys, resnets, _RESNET_UNET)
    out.update(_rename(other, plain))
    return {UNET_PREFIX + k: v for k, v in out.items()}


def vae_to_original(sd: dict, config) -> dict:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    n_levels = len(config["block_out_channels"])
    resnets: list[tuple[str, str]] = []
    plain: list[tuple[str, str]] = [
        ("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_norm_out", "encoder.norm_out"),
        ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
        ("decoder.conv_norm_out", "decoder.norm_out"), ("decoder.conv_out", "decoder.conv_out"),
        ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
    ]
    for part in ("encoder", "decoder"):
        resnets += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1"),
                    (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")]
    for i in range(n_levels):
        for j in range(config["layers_per_block"]):
            resnets.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"))
        plain.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        up = n_levels - 1 - i
        for j in range(config["layers_per_block"] + 1):
            resnets.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}"))
        plain.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv"))
    attn = {k: v for k, v in sd.items() if ".mid_block.attentions.0." in k}
    res_keys = {k: v for k, v in sd.items() if k not in attn and any(k.startswith(n + ".") for n, _ in resnets)}
    other = {k: v for k, v in sd.items() if k not in attn and k not in res_keys}
    out = _rename(res_keys, resnets, _RESNET_VAE)
    out.update(_rename(other, plain))
    for part in ("encoder", "decoder"):
        sub = {k: v for k, v in attn.items() if k.startswith(part + ".")}
        for k, v in _rename(sub, [(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")], _VAE_ATTN).items():
            # diffusers keeps q/k/v/proj_out as Linear; the original layout has 1x1 convolutions
            out[k] = v[:, :, None, None] if v.ndim == 2 else v
    return {VAE_PREFIX + k: v for k, v in out.items()}


def with_text_model_prefix(sd: dict) -> dict:
    """transformers 5 dropped the ``text_model.`` level from CLIPTextModel keys; the original layout has it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def clip_to_original(sd: dict) -> dict:
    """transformers CLIPTextModel -> ``cond_stage_model.transformer.text_model.*`` (SD 1.x)."""
    return {CLIP_PREFIX + k: v for k, v in with_text_model_prefix(sd).items()}


def openclip_to_original(sd: dict, config) -> dict:
    """transformers CLIPTextModel (SD 2.x, penultimate layer) -> OpenCLIP ``cond_stage_model.model.*``.

    SD 2.x conditions on OpenCLIP's penultimate layer, so the diffusers text encoder has one layer
    fewer than the checkpoint. To keep the original layout we append a final residual block with
    zero weights; it is never evaluated (SD 2.x stops before it).
    """
    import torch

    sd = with_text_model_prefix(sd)
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    width = config.hidden_size
    out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    out["logit_scale"] = torch.tensor(4.6052, dtype=out["ln_final.weight"].dtype)
    n = config.num_hidden_layers
    for i in range(n + 1):
        src = f"text_model.encoder.layers.{min(i, n - 1)}."
        dst = f"transformer.resblocks.{i}."

        def get(name, _src=src, _last=(i == n)):
            t = sd[_src + name]
            return torch.zeros_like(t) if _last else t

        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            out[dst + theirs + ".weight"] = get(ours + ".weight")
            out[dst + theirs + ".bias"] = get(ours + ".bias")
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat(
                [get(f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0
            )
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def openclip_full_to_original(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection (SDXL's OpenCLIP bigG, every layer) -> OpenCLIP keys under
    ``prefix``; OpenCLIP keeps the projection as a matrix applied from the right (the Linear's transpose)."""
    import torch

    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6052, dtype=sd["text_model.final_layer_norm.weight"].dtype),
    }
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
            for kind in ("weight", "bias"):
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"])
    return {prefix + k: v for k, v in out.items()}


def to_original_state_dict(*, unet, vae, text_encoder, text_encoder_kind: str | None = None,
                           text_encoder_2=None) -> dict:
    """All components -> one state dict in the original single-file layout. SDXL: ``text_encoder_2`` (bigG);
    ``text_encoder`` (CLIP-L) is None for the refiner."""
    if text_encoder_2 is not None:
        sd = unet_to_original(unet.state_dict(), unet.config)
        sd.update(vae_to_original(vae.state_dict(), vae.config))
        if text_encoder is None:
            sd.update(openclip_full_to_original(text_encoder_2.state_dict(), XL_REFINER_OPENCLIP_PREFIX))
        else:
            sd.update({XL_CLIP_PREFIX + k: v for k, v in with_text_model_prefix(text_encoder.state_dict()).items()})
            sd.update(openclip_full_to_original(text_encoder_2.state_dict(), XL_OPENCLIP_PREFIX))
        return sd
    if text_encoder_kind is None:
        text_encoder_kind = "openclip" if text_encoder.config.hidden_act == "gelu" else "clip"
    sd = unet_to_original(unet.state_dict(), unet.config)
    sd.update(vae_to_original(vae.state_dict(), vae.config))
    te = text_encoder.state_dict()
    if text_encoder_kind == "openclip":
        sd.update(openclip_to_original(te, text_encoder.config))
    else:
        sd.update(clip_to_original(te))
    return sd


def save_single_file(
    path: str | Path,
    *,
    unet,
    vae,
    text_encoder,
    dtype=None,
    metadata: dict[str, str] | None = None,
    text_encoder_kind: str | None = None,
    text_encoder_2=None,
) -> Path:
    """Save as ``.safetensors`` (with ``metadata``) or ``.ckpt`` (``{"state_dict": ...}``), by the suffix."""
    import torch

    path = Path(path)
    sd = to_original_state_dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_kind=text_encoder_kind,
                                text_encoder_2=text_encoder_2)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata=metadata or {})
    else:
        torch.save({"state_dict": sd}, tmp)
    tmp.replace(path)
    return path


CONTROL_PREFIX = "control_model."  # ControlNet single files (lllyasviel's control_v11p_sd15_canny.pth, ...)


def controlnet_to_original(sd: dict, config, prefix: str = CONTROL_PREFIX) -> dict:
    """diffusers ControlNetModel state dict -> the original ``control_model.*`` layout: the UNet encoder's names (as
    ``unet_to_original``), ``input_hint_block.{0, 2, ...}`` (the conditioning embedding's convolutions, SiLUs between),
    ``zero_convs.N.0`` and ``middle_block_out.0``."""
    levels = len(config["block_out_channels"])
    own: dict = {}
    rest: dict = {}
    blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    for key, value in sd.items():
        head, _, kind = key.rpartition(".")
        if head == "controlnet_cond_embedding.conv_in":
            own[f"input_hint_block.0.{kind}"] = value
        elif head.startswith("controlnet_cond_embedding.blocks."):
            own[f"input_hint_block.{2 * (int(head.split('.')[2]) + 1)}.{kind}"] = value
        elif head == "controlnet_cond_embedding.conv_out":
            own[f"input_hint_block.{2 * (blocks + 1)}.{kind}"] = value
        elif head.startswith("controlnet_down_blocks."):
            own[f"zero_convs.{head.split('.')[1]}.0.{kind}"] = value
        elif head == "controlnet_mid_block":
            own[f"middle_block_out.0.{kind}"] = value
        else:
            rest[key] = value
    as_unet = {**dict(config), "up_block_types": ["UpBlock2D"] * levels}  # an encoder alone: no up blocks to name
    out = {k.removeprefix(UNET_PREFIX): v for k, v in unet_to_original(rest, as_unet).items()}
    out.update(own)
    return {prefix + k: v for k, v in out.items()}

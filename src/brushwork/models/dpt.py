"""The depth estimator inside an SD 2 depth single file: MiDaS v3 DPT-Hybrid, as transformers' DPTForDepthEstimation.

``512-depth-ema.ckpt`` carries its estimator under ``depth_model.model.``: ``pretrained.*`` is the ViT-hybrid
backbone (timm's ``vit_base_resnet50_384``: a BiT ResNet stem and 3 stages, then ViT-B/16 on its 1/16 feature
map; ``act_postprocess3/4`` read blocks 8 and 11 out), ``scratch.*`` the DPT neck (``layer{1..4}_rn``,
``refinenet{4..1}``) and head (``output_conv``). The key names map one to one onto transformers' DPT-Hybrid
(``KEY_TEMPLATES``; the attention's fused ``qkv`` splits into query/key/value), which is what transformers'
``convert_dpt_hybrid_to_pytorch.py`` does to MiDaS's file. The config is Intel/dpt-hybrid-midas's
(``configs/dpt-hybrid-midas.json``, what a diffusers folder of SD 2 depth carries) with every size read from the
tensor shapes, so a small estimator in the same layout loads too. Only the ImageNet classifier of timm's ViT
(``pretrained.model.head``), which MiDaS never runs, is left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ModelError

DEPTH_PREFIX = "depth_model.model."
CONFIG_FILE = Path(__file__).parent / "configs" / "dpt-hybrid-midas.json"
IGNORED = ("pretrained.model.head.weight", "pretrained.model.head.bias")  # timm's classifier: never run by MiDaS

_BB = "pretrained.model.patch_embed.backbone."
_BIT = "dpt.embeddings.backbone.bit."
# (original name, transformers name); {name} is one dotted part, {rest} the remainder
KEY_TEMPLATES: tuple[tuple[str, str], ...] = (
    (_BB + "stem.conv.weight", _BIT + "embedder.convolution.weight"),
    (_BB + "stem.norm.{p}", _BIT + "embedder.norm.{p}"),
    (_BB + "stages.{s}.blocks.{b}.{rest}", _BIT + "encoder.stages.{s}.layers.{b}.{rest}"),
    ("pretrained.model.patch_embed.proj.{p}", "dpt.embeddings.projection.{p}"),
    ("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
    ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"),
    ("pretrained.model.blocks.{i}.norm1.{p}", "dpt.encoder.layer.{i}.layernorm_before.{p}"),
    ("pretrained.model.blocks.{i}.norm2.{p}", "dpt.encoder.layer.{i}.layernorm_after.{p}"),
    ("pretrained.model.blocks.{i}.attn.proj.{p}", "dpt.encoder.layer.{i}.attention.output.dense.{p}"),
    ("pretrained.model.blocks.{i}.mlp.fc1.{p}", "dpt.encoder.layer.{i}.intermediate.dense.{p}"),
    ("pretrained.model.blocks.{i}.mlp.fc2.{p}", "dpt.encoder.layer.{i}.output.dense.{p}"),
    ("pretrained.model.norm.{p}", "dpt.layernorm.{p}"),
    # the readout of blocks 8 and 11 (the hybrid's first two neck inputs are the ResNet's stages 1 and 2)
    *((f"pretrained.act_postprocess{k}.0.project.0.{{p}}", f"neck.reassemble_stage.readout_projects.{k - 1}.0.{{p}}")
      for k in (3, 4)),
    *((f"pretrained.act_postprocess{k}.3.{{p}}", f"neck.reassemble_stage.layers.{k - 1}.projection.{{p}}")
      for k in (3, 4)),
    ("pretrained.act_postprocess4.4.{p}", "neck.reassemble_stage.layers.3.resize.{p}"),
    *((f"scratch.layer{k}_rn.weight", f"neck.convs.{k - 1}.weight") for k in (1, 2, 3, 4)),
    # MiDaS fuses from the deepest (refinenet4) up; transformers' fusion layers count from the deepest
    *((f"scratch.refinenet{k}.out_conv.{{p}}", f"neck.fusion_stage.layers.{4 - k}.projection.{{p}}")
      for k in (1, 2, 3, 4)),
    *((f"scratch.refinenet{k}.resConfUnit{{u}}.conv{{c}}.{{p}}",
       f"neck.fusion_stage.layers.{4 - k}.residual_layer{{u}}.convolution{{c}}.{{p}}") for k in (1, 2, 3, 4)),
    ("scratch.output_conv.{n}.{p}", "head.head.{n}.{p}"),
)
_QKV = ("pretrained.model.blocks.{i}.attn.qkv.{p}", "dpt.encoder.layer.{i}.attention.attention.{part}.{p}")
_QKV_PARTS = ("query", "key", "value")


def _regex(template: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()])
        out += f"(?P<{m.group(1)}>.+)" if m.group(1) == "rest" else f"(?P<{m.group(1)}>[^.]+)"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\Z")


_FORWARD = [(_regex(a), b) for a, b in KEY_TEMPLATES]
_BACKWARD = [(_regex(b), a) for a, b in KEY_TEMPLATES]


def has_depth_estimator(shapes) -> bool:
    return f"{DEPTH_PREFIX}pretrained.model.cls_token" in shapes


def to_transformers(sd: dict, prefix: str = DEPTH_PREFIX) -> dict:
    """The estimator's tensors of an original-layout state dict -> transformers DPTForDepthEstimation keys. A key
    under ``prefix`` that has no counterpart is an error naming it (the layout is not the one we know)."""
    import torch

    out, qkv = {}, _regex(_QKV[0])
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in IGNORED:
            continue
        if m := qkv.match(name):
            for part, chunk in zip(_QKV_PARTS, torch.chunk(value, 3, dim=0), strict=True):
                out[_QKV[1].format(part=part, **m.groupdict())] = chunk
            continue
        for rx, target in _FORWARD:
            if m := rx.match(name):
                out[target.format(**m.groupdict())] = value
                break
        else:
            raise ModelError(f"the depth estimator has a tensor this version does not know: {key}; a MiDaS "
                             "DPT-Hybrid (as in 512-depth-ema.ckpt) is expected")
    return out


def to_original(sd: dict, prefix: str = DEPTH_PREFIX) -> dict:
    """The inverse: a transformers DPT-Hybrid state dict -> the original single file's ``depth_model.model.*`` keys
    (to build test checkpoints in the real layout)."""
    import torch

    out, parts = {}, {}
    qkv = _regex(_QKV[1])
    for key, value in sd.items():
        if m := qkv.match(key):
            groups = m.groupdict()
            parts.setdefault((groups["i"], groups["p"]), {})[groups["part"]] = value
            continue
        for rx, target in _BACKWARD:
            if m := rx.match(key):
                out[prefix + target.format(**m.groupdict())] = value
                break
        else:
            raise KeyError(f"no original-layout name for {key}")
    for (i, p), chunks in parts.items():
        out[prefix + _QKV[0].format(i=i, p=p)] = torch.cat([chunks[name] for name in _QKV_PARTS], dim=0)
    return out


def shipped_config() -> dict:
    return json.loads(CONFIG_FILE.read_text(encoding="utf-8"))


def _indices(shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _groups(widths: list[int]) -> int:
    """GroupNorm's group count: 32 (BiT's) where every width allows it, else the largest that divides them all."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))


def config_from_shapes(shapes, prefix: str = DEPTH_PREFIX) -> dict:
    """DPTConfig kwargs of the estimator in a file: Intel/dpt-hybrid-midas's, with the sizes its tensors have."""
    p = prefix + "pretrained.model."
    bb = p + "patch_embed.backbone."
    try:
        hidden = shapes[p + "cls_token"][-1]
        layers = len(_indices(shapes, rf"{re.escape(p)}blocks\.(\d+)\."))
        stages = _indices(shapes, rf"{re.escape(bb)}stages\.(\d+)\.")
        depths = [len(_indices(shapes, rf"{re.escape(bb)}stages\.{s}\.blocks\.(\d+)\.")) for s in stages]
        widths = [shapes[f"{bb}stages.{s}.blocks.{depths[i] - 1}.conv3.weight"][0] for i, s in enumerate(stages)]
        norms = [v[0] for k, v in shapes.items() if k.startswith(bb) and ".norm" in k and k.endswith(".weight")]
        grid = round((shapes[p + "pos_embed"][1] - 1) ** 0.5)
        neck = [shapes[f"{prefix}scratch.layer{k}_rn.weight"][1] for k in (1, 2, 3, 4)]
        fusion = shapes[f"{prefix}scratch.layer1_rn.weight"][0]
        embedding = shapes[bb + "stem.conv.weight"][0]
    except KeyError as err:
        raise ModelError(f"the depth estimator (depth_model.*) is incomplete: {err.args[0]} is missing") from err
    if len(stages) != 3 or layers < 4:
        raise ModelError(f"the depth estimator is not a MiDaS DPT-Hybrid (a 3-stage ResNet and at least 4 ViT "
                         f"blocks expected; found {len(stages)} stages and {layers} blocks)")
    patch = 4 * 2 ** (len(stages) - 1)  # the ResNet's stride: the stem's 4, then 2 for each stage after the first
    config = shipped_config()
    config.update(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=shapes[p + "blocks.0.mlp.fc1.weight"][0], image_size=grid * patch, patch_size=patch,
        # MiDaS reads blocks 8 and 11 of ViT-B's 12: the fourth-last and the last
        backbone_out_indices=[2, 5, layers - 4, layers - 1], neck_hidden_sizes=neck, fusion_hidden_size=fusion,
        backbone_featmap_shape=[1, widths[-1], grid, grid],
    )
    backbone = config["backbone_config"]
    # BiT's config lists a fourth width, unused with three stages: kept, so the official file's config is Intel's
    backbone.update(embedding_size=embedding, depths=depths, hidden_sizes=widths + backbone["hidden_sizes"][3:],
                    num_groups=_groups(norms))
    return config


def build(sd: dict, config: dict, prefix: str = DEPTH_PREFIX):
    """DPTForDepthEstimation with the file's weights; every tensor must fit (no missing, no unknown ones)."""
    import accelerate
    from transformers import DPTConfig, DPTForDepthEstimation

    with accelerate.init_empty_weights():
        model = DPTForDepthEstimation(DPTConfig(**config))
    state = to_transformers(sd, prefix)
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:
        what = f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else \
            f"{len(unexpected)} tensors it does not have (e.g. {unexpected[0]})"
        raise ModelError(f"the depth estimator's weights do not fit a DPT-Hybrid: {what}")
    wrong = next((k for k, v in state.items() if tuple(v.shape) != tuple(wanted[k].shape)), None)
    if wrong is not None:
        raise ModelError(f"the depth estimator's {wrong} has shape {tuple(state[wrong].shape)}, a DPT-Hybrid of "
                         f"these sizes needs {tuple(wanted[wrong].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

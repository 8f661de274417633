"""Tiny random models of each family, in the real layouts (a few hundred KB each).

They are saved through ``brushwork.models.convert`` into the original single-file layout
(.safetensors / .ckpt) and as diffusers folders, and loaded back through the public loader:
the same code path a real ``sd-v1-4.ckpt`` takes.
"""

from __future__ import annotations

import functools
from pathlib import Path

FAMILY_SPECS = {
    # name: (text encoder kind, unet in_channels)
    "sd1": ("clip", 4),
    "sd1-inpaint": ("clip", 9),
    "sd2": ("openclip", 4),
    "sd2-inpaint": ("openclip", 9),
}


def build_components(family: str = "sd1", seed: int = 0, **unet_options):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    kind, in_channels = FAMILY_SPECS[family]
    torch.manual_seed(seed)
    width = 32
    sd2 = kind == "openclip"
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=[1, 1] if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
        **unet_options,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=width,
        )
    )
    # random init leaves norms at identity and some layers at zero; perturb every tensor so
    # that a mapping mistake anywhere changes the output
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, text_encoder


def save_single(path: Path, family: str = "sd1", seed: int = 0, metadata: dict | None = None, **unet_options) -> Path:
    from brushwork.models.convert import save_single_file

    unet, vae, te = build_components(family, seed, **unet_options)
    return save_single_file(path, unet=unet, vae=vae, text_encoder=te, metadata=metadata)


def save_diffusers(path: Path, family: str = "sd1", seed: int = 0) -> Path:
    """The same weights as ``save_single`` (same seed), as a diffusers folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from brushwork.models.families import SD_SCHEDULER_CONFIG
    from brushwork.models.tokenizers import tokenizer_for

    unet, vae, te = build_components(family, seed)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer_for(FAMILY_SPECS[family][0]), unet=unet,
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


# ---- the SD 2 x4 upscaler (7 input channels: 4 latent + the low-res RGB picture) ----------------------------


def build_upscaler_components(seed: int = 0):
    """A tiny x4 upscaler in the real one's shape: 3 UNet levels (the first without attention, the second with
    cross-attention only, the last with both, as the real ``only_cross_attention`` [T, T, T, F]), a class
    embedding for the noise level (1000 classes), a 3-level VAE (x4) with the upscaler's scaling factor, and an
    OpenCLIP-style text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    width = 32
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=[True, True, False], cross_attention_dim=width, attention_head_dim=8,
        use_linear_projection=True, num_class_embeds=1000, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=width))
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        # the noise-level embedding starts at N(0, 1): scaled to the time embedding's size, so it matters but does
        # not drown the rest
        unet.class_embedding.weight.mul_(0.1)
    return unet, vae, text_encoder


def save_upscaler_single(path: Path, seed: int = 0) -> Path:
    """The tiny x4 upscaler in the original single-file layout (``x4-upscaler-ema.ckpt``'s keys)."""
    from brushwork.models.convert import save_single_file

    unet, vae, te = build_upscaler_components(seed)
    return save_single_file(path, unet=unet, vae=vae, text_encoder=te, text_encoder_kind="openclip")


def save_upscaler_diffusers(path: Path, seed: int = 0) -> Path:
    """The same weights as ``save_upscaler_single`` (same seed), as a diffusers StableDiffusionUpscalePipeline
    folder, with the real one's schedulers."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from brushwork.models.families import FAMILY_BY_NAME, shipped_config
    from brushwork.models.tokenizers import tokenizer_for

    family = FAMILY_BY_NAME["sd2-x4-upscaler"]
    unet, vae, te = build_upscaler_components(seed)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer_for("openclip"), unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(shipped_config(family, "low_res_scheduler")),
        scheduler=DDIMScheduler.from_config(shipped_config(family, "scheduler")), max_noise_level=350,
    )
    pipe.save_pretrained(path)
    return path


# ---- SD 2 depth (5 input channels: 4 latent + the depth) with its MiDaS DPT-Hybrid -------------------------


def build_dpt_hybrid(seed: int = 0):
    """A tiny MiDaS DPT-Hybrid (transformers DPTForDepthEstimation) in the real one's shape: Intel/dpt-hybrid-midas's
    config with small sizes: a 3-stage BiT ResNet (one bottleneck each), 4 ViT blocks (blocks 0 and 3 read out, as
    the real one's 8 and 11 of 12), a 64 x 64 training size (a 4 x 4 grid of 16-pixel patches)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    from brushwork.models.dpt import shipped_config

    config = shipped_config()
    config.update(hidden_size=32, num_hidden_layers=4, num_attention_heads=1, intermediate_size=37, image_size=64,
                  backbone_out_indices=[2, 5, 0, 3], neck_hidden_sizes=[32, 64, 32, 32], fusion_hidden_size=16,
                  backbone_featmap_shape=[1, 128, 4, 4])
    config["backbone_config"].update(embedding_size=16, hidden_sizes=[32, 64, 128, 2048], depths=[1, 1, 1],
                                     num_groups=8)
    torch.manual_seed(seed + 1)
    model = DPTForDepthEstimation(DPTConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # the head ends in a ReLU: a bias keeps the random depth positive, a larger last layer makes it vary (by about
        # 0.1 across a picture, well above the normalization's epsilon)
        model.head.head[4].bias.add_(1.0)
        model.head.head[4].weight.mul_(50.0)
    return model.eval()


@functools.lru_cache(maxsize=2)
def build_depth_components(seed: int = 0):
    """(unet, vae, text_encoder, depth_estimator): the tiny SD 2 model with a 5-channel UNet, and a tiny DPT-Hybrid.
    Built once per seed (the files of one seed share them); to save, not to change."""
    import torch
    from diffusers import UNet2DConditionModel

    plain, vae, te = build_components("sd2", seed)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel.from_config({**plain.config, "in_channels": 5})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, te, build_dpt_hybrid(seed)


def depth_original_state_dict(seed: int = 0, estimator: bool = True) -> dict:
    """The tiny depth model in 512-depth-ema.ckpt's layout: the usual keys plus ``depth_model.model.*`` (MiDaS's
    names, with timm's unused ImageNet classifier ``pretrained.model.head`` as the real file has it)."""
    import torch

    from brushwork.models.convert import to_original_state_dict
    from brushwork.models.dpt import DEPTH_PREFIX, to_original

    unet, vae, te, dpt = build_depth_components(seed)
    sd = to_original_state_dict(unet=unet, vae=vae, text_encoder=te, text_encoder_kind="openclip")
    if estimator:
        sd.update(to_original(dpt.state_dict()))
        sd[DEPTH_PREFIX + "pretrained.model.head.weight"] = torch.randn(10, 32)
        sd[DEPTH_PREFIX + "pretrained.model.head.bias"] = torch.zeros(10)
    return sd


def save_depth_single(path: Path, seed: int = 0, estimator: bool = True) -> Path:
    """``depth_original_state_dict`` as ``.safetensors`` or ``.ckpt`` (``{"state_dict": ...}``), by the suffix."""
    import torch

    sd = {k: v.contiguous() for k, v in depth_original_state_dict(seed, estimator).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


def save_depth_diffusers(path: Path, seed: int = 0) -> Path:
    """The same weights as ``save_depth_single`` (same seed), as a StableDiffusionDepth2ImgPipeline folder with its
    depth_estimator and feature_extractor."""
    from diffusers import PNDMScheduler, StableDiffusionDepth2ImgPipeline
    from transformers import DPTImageProcessorPil

    from brushwork.models.families import SD_SCHEDULER_CONFIG
    from brushwork.models.tokenizers import tokenizer_for

    unet, vae, te, dpt = build_depth_components(seed)
    processor = DPTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer_for("openclip"), unet=unet,
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER_CONFIG), depth_estimator=dpt, feature_extractor=processor)
    pipe.save_pretrained(path)
    return path


# ---- SDXL: base (CLIP-L + OpenCLIP bigG), refiner (bigG alone), inpainting (9 channels) -------------------------


def build_xl_components(seed: int = 0, *, refiner: bool = False, in_channels: int = 4):
    """(unet, vae, text_encoder or None for the refiner, text_encoder_2). Three UNet levels, two with attention at
    different depths (1 and 2 transformer blocks, as SDXL's [1, 2, 10]); bigG's projection is not square, so a
    transposed projection would not load."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width, pooled, time_dim = 32, 16, 8
    te_kwargs = dict(vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=3,
                     num_attention_heads=1, max_position_embeddings=77)
    text_encoder = None if refiner else CLIPTextModel(CLIPTextConfig(**te_kwargs, hidden_act="quick_gelu",
                                                                     projection_dim=width))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_kwargs, hidden_act="gelu", projection_dim=pooled))
    context = width if refiner else 2 * width
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=context, attention_head_dim=[1, 1, 1],
        use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + (5 if refiner else 6) * time_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.13025, force_upcast=True,
    )
    with torch.no_grad():
        for model in (unet, vae, text_encoder, text_encoder_2):
            for p in (model.parameters() if model is not None else ()):
                p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, text_encoder, text_encoder_2


def save_xl_single(path: Path, seed: int = 0, *, refiner: bool = False, in_channels: int = 4,
                   metadata: dict | None = None) -> Path:
    from brushwork.models.convert import save_single_file

    unet, vae, te, te2 = build_xl_components(seed, refiner=refiner, in_channels=in_channels)
    return save_single_file(path, unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2, metadata=metadata)


def xl_pipeline(seed: int = 0, *, refiner: bool = False, in_channels: int = 4):
    """Plain diffusers' SDXL pipeline over the same weights as ``save_xl_single`` (the same seed)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    from brushwork.models.families import FAMILY_BY_NAME, shipped_config
    from brushwork.models.tokenizers import tokenizer_for

    unet, vae, te, te2 = build_xl_components(seed, refiner=refiner, in_channels=in_channels)
    family = FAMILY_BY_NAME["sdxl-refiner" if refiner else "sdxl"]
    scheduler = EulerDiscreteScheduler.from_config(shipped_config(family, "scheduler"))
    parts = dict(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=None if refiner else tokenizer_for("clip"),
                 tokenizer_2=tokenizer_for("openclip"), unet=unet, scheduler=scheduler)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True, add_watermarker=False)
    elif in_channels == 9:
        pipe = StableDiffusionXLInpaintPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_xl_diffusers(path: Path, seed: int = 0, *, refiner: bool = False) -> Path:
    xl_pipeline(seed, refiner=refiner).save_pretrained(path)
    return path

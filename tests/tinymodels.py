"""Tiny random models of each family, in the real layouts (a few hundred KB each).

They are saved through ``brushwork.models.convert`` into the original single-file layout
(.safetensors / .ckpt) and as diffusers folders, and loaded back through the public loader:
the same code path a real ``sd-v1-4.ckpt`` takes.
"""

from __future__ import annotations

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

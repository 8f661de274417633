"""The model families brushwork knows: what identifies each, and what the weights cannot say.

A family row holds what is true of every checkpoint of that family: the text encoder kind,
how attention heads are counted, the scheduler config, the default prediction type and size.
Everything that varies between fine-tunes (channel counts, depths, context size) is read from
the tensor shapes in ``detect.py``, never from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# SD 1.x / 2.x DDPM training schedule (the same for every family below).
SD_SCHEDULER_CONFIG: dict = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025  # SDXL's VAE (same architecture as SD's, retrained): its own latent scale


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    # "clip" (OpenAI CLIP, SD 1.x) | "openclip" (OpenCLIP, SD 2.x) | "sdxl" (CLIP-L + OpenCLIP bigG, SDXL base)
    # | "sdxl-refiner" (bigG alone)
    text_encoder: str
    unet_in_channels: int  # 4 = plain, 9 = inpainting
    heads: str  # "fixed8": 8 heads everywhere (SD 1.x) | "per64": one head per 64 channels (SD 2.x)
    default_size: int
    prediction: str | None  # "eps" | "v" | None = cannot be told from the keys
    upcast_attention: bool = False
    # the shipped configs (models/configs/<configs>.<part>.json) for what the weights cannot say; None: SD's
    configs: str | None = None

    def matches(self, text_encoder: str, in_channels: int) -> bool:
        return self.text_encoder == text_encoder and self.unet_in_channels == in_channels

    @property
    def xl(self) -> bool:
        """SDXL's conditioning: two text encoders (or the refiner's one), pooled text and size embeddings."""
        return self.text_encoder.startswith("sdxl")


FAMILIES: tuple[Family, ...] = (
    Family("sd1", "Stable Diffusion 1.x", "clip", 4, "fixed8", 512, "eps"),
    Family("sd1-inpaint", "Stable Diffusion 1.x inpainting", "clip", 9, "fixed8", 512, "eps"),
    # SD 2.x 512 (eps) and 768 (v-prediction) have identical keys and shapes: prediction=None.
    Family("sd2", "Stable Diffusion 2.x", "openclip", 4, "per64", 512, None),
    Family("sd2-inpaint", "Stable Diffusion 2.x inpainting", "openclip", 9, "per64", 512, "eps"),
    # 4 latent + 1 depth input channels (512-depth-ema); its MiDaS estimator, when the file has one: models/dpt.py
    Family("sd2-depth", "Stable Diffusion 2 depth", "openclip", 5, "per64", 512, "eps"),
    # 4 latent + 3 low-res RGB input channels; 8 heads a level, as the original's num_heads: 8; output = input x 4
    Family("sd2-x4-upscaler", "Stable Diffusion x4 upscaler", "openclip", 7, "fixed8", 128, "v",
           configs="sd2-x4-upscaler"),
    # SDXL: CLIP-L and OpenCLIP bigG side by side (2048-wide context), pooled bigG text + 6 size numbers
    Family("sdxl", "Stable Diffusion XL", "sdxl", 4, "per64", 1024, "eps", configs="sdxl"),
    Family("sdxl-inpaint", "Stable Diffusion XL inpainting", "sdxl", 9, "per64", 1024, "eps", configs="sdxl"),
    # the refiner: bigG alone (1280-wide), pooled text + 5 numbers (size, crop, aesthetic score)
    Family("sdxl-refiner", "Stable Diffusion XL refiner", "sdxl-refiner", 4, "per64", 1024, "eps",
           configs="sdxl-refiner"),
)

FAMILY_BY_NAME = {f.name: f for f in FAMILIES}

# Official SD 2.x files, by the first 10 hex digits of their sha256 (A1111's "Model hash"),
# so a downloaded official file needs neither a flag nor a YAML. Fine-tunes are not listed.
KNOWN_PREDICTION_BY_HASH: dict[str, tuple[str, str]] = {
    "ad2a33c361": ("v", "v2-1_768-ema-pruned.ckpt"),
    "dcd690123c": ("v", "v2-1_768-ema-pruned.safetensors"),
    "4711ff4dd2": ("v", "v2-1_768-nonema-pruned.ckpt"),
    "ff144a4984": ("v", "v2-1_768-nonema-pruned.safetensors"),
    "bfcaf07557": ("v", "768-v-ema.ckpt"),
    "df955bdf6b": ("eps", "v2-1_512-ema-pruned.safetensors"),
}


def find_family(text_encoder: str, in_channels: int) -> Family | None:
    found = [f for f in FAMILIES if f.matches(text_encoder, in_channels)]
    assert len(found) <= 1, f"ambiguous family table: {found}"
    return found[0] if found else None


def shipped_config(family: Family, part: str) -> dict:
    """A config that ships in the package for this family (``part``: unet, vae, scheduler, low_res_scheduler,
    text_encoder, pipeline), as the family's diffusers folder on the hub has it; nothing is downloaded."""
    import json
    from pathlib import Path

    if family.configs is None:
        raise KeyError(f"{family.name} ships no configs")
    path = Path(__file__).parent / "configs" / f"{family.configs}.{part}.json"
    return json.loads(path.read_text(encoding="utf-8"))

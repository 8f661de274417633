"""Train brushwork's bundled mini model from scratch on procedural shape scenes (CPU, about an hour).

The model is a tiny Stable Diffusion 1.x: ``AutoencoderKL`` + CLIP text encoder + ``UNet2DConditionModel``,
saved as one ``.safetensors`` file in the original SD key layout, so it loads through the same code as
a real ``sd-v1-4.ckpt``.

    .venv/bin/python tools/train_mini.py --work /tmp/mini/run            # the full run
    .venv/bin/python tools/train_mini.py --work /tmp/mini/x --vae-steps 200 --unet-steps 300   # a quick try

Stages (each saves to ``--work`` and is skipped on a rerun when its output is there):
  1. VAE: reconstruction of 64x64 scenes; then latents are rescaled to SD's scaling factor 0.18215.
  2. UNet + text encoder. First a short warm-up of the text encoder alone on an auxiliary loss that
     makes its end-of-text states name the layout (which color and kind sits at which position); then
     both jointly: SD 1.x DDPM noise schedule, v-prediction, loss weight min(SNR, 5) + 1 in x0 terms
     (the noisiest steps, where the caption alone decides the background and the places, keep full
     weight), 10% empty captions (for classifier-free guidance), the auxiliary loss kept on. Its small
     head is thrown away; it only teaches the text encoder the layout words.
  3. Export: ``mini.safetensors`` (fp16, SD key layout) + metrics on held-out captions.

Everything is seeded; the same command on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from brushwork.mini import scenes  # noqa: E402
from brushwork.mini.evaluate import evaluate  # noqa: E402
from brushwork.models.tokenizers import clip_tokenizer  # noqa: E402

SCALING_FACTOR = 0.18215
EOS = 49407


# ------------------------------------------------------------------------------------------ components


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=scenes.IMAGE_SIZE,
        scaling_factor=SCALING_FACTOR,
    )


def build_text_encoder(hidden: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return CLIPTextModel(config)


def build_unet(channels: tuple[int, ...], cross_attention_dim: int, attention_at_top: bool = False,
               time_embedding: int | None = None):
    """SD1-style UNet on 16x16 latents; cross-attention at every level below the top one (or at all)."""
    from diffusers import UNet2DConditionModel

    down = ["CrossAttnDownBlock2D"] * len(channels)
    if not attention_at_top:
        down[0] = "DownBlock2D"  # attention at 16x16 doubles the cost on a CPU
    up = ["CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in reversed(down)]
    return UNet2DConditionModel(
        sample_size=scenes.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        time_embedding_dim=time_embedding,  # None: 4x the first level's width, as SD
    )


def build_scheduler(prediction: str = "eps"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100, constant: bool = False) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if constant:
        return peak
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ 1. VAE


def train_vae(args, work: Path):
    from diffusers import AutoencoderKL

    out = work / "vae"
    if (out / "config.json").exists():
        log("VAE: reusing " + str(out))
        return AutoencoderKL.from_pretrained(out)
    torch.manual_seed(args.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start, cpu = time.time(), time.process_time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=50)
        images, _, _ = scenes.batch(seed=10_000_000 + step, count=args.vae_batch)
        x = to_tensor(images)
        if step < args.vae_crop_until * args.vae_steps:
            # Most steps see random 32x32 crops (4x cheaper); the last ones see whole pictures.
            top, left = torch.randint(0, 33, (2,), generator=generator).tolist()
            x = x[:, :, top : top + 32, left : left + 32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            recon = vae.decode(z).sample
        rec = (recon.float() - x).pow(2).mean() + 0.5 * (recon.float() - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"VAE step {step}/{args.vae_steps} rec {rec.item():.4f} kl {kl.item():.3f} ({time.time() - start:.0f}s)")
    rescale_latents(vae)
    vae.save_pretrained(out)
    (work / "vae_time.txt").write_text(f"{time.time() - start:.0f} {time.process_time() - cpu:.0f}")
    return vae


@torch.no_grad()
def rescale_latents(vae) -> None:
    """Scale the latent space so that ``latents * 0.18215`` have unit std, as SD's loader assumes.

    The encoder's mean rows of ``quant_conv`` are multiplied by k, its log-variance rows get
    ``2 ln k``, and ``post_quant_conv`` divides its input by k: the decoder output is unchanged.
    """
    images, _, _ = scenes.batch(seed=99_000_000, count=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean = vae.encode(to_tensor(images)).latent_dist.mean.float()
    k = 1.0 / (SCALING_FACTOR * mean.std().item())
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    log(f"VAE latents rescaled by {k:.3f} (raw std {mean.std().item():.3f}, mean {mean.mean().item():.3f})")


# ------------------------------------------------------------------------------------------ 2. UNet + text


def layout_targets(chosen: list[scenes.Scene]) -> torch.Tensor:
    """Per scene: background color, then for each position the color (or none) and kind (or none)."""
    colors, kinds, positions = list(scenes.COLORS), scenes.KINDS, scenes.POSITIONS
    rows = []
    for scene in chosen:
        row = [colors.index(scene.background)]
        at = {s.position: s for s in scene.shapes}
        for position in positions:
            shape = at.get(position)
            row.append(colors.index(shape.color) if shape else len(colors))
            row.append(kinds.index(shape.kind) if shape else len(kinds))
        rows.append(row)
    return torch.tensor(rows)


class LayoutHead(torch.nn.Module):
    """Auxiliary classifier: end-of-text state -> background color and, per position, color and kind."""

    def __init__(self, hidden: int):
        super().__init__()
        n_colors, n_kinds = len(scenes.COLORS), len(scenes.KINDS)
        self.sizes = [n_colors] + [n_colors + 1, n_kinds + 1] * len(scenes.POSITIONS)
        self.proj = torch.nn.Sequential(torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, sum(self.sizes)))

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(states.float()).split(self.sizes, dim=-1)
        losses = [F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(logits)]
        correct = torch.stack([(lg.argmax(-1) == targets[:, i]) for i, lg in enumerate(logits)], 1)
        return torch.stack(losses).sum(), correct.all(1).float().mean()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_unet(args, work: Path, vae):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = work / "unet_final"
    if (out / "unet" / "config.json").exists():
        log("UNet: reusing " + str(out))
        return UNet2DConditionModel.from_pretrained(out / "unet"), CLIPTextModel.from_pretrained(out / "text_encoder")
    torch.manual_seed(args.seed + 1)
    text_encoder = build_text_encoder(args.hidden, args.text_layers)
    unet = build_unet(tuple(args.channels), args.hidden, args.attention_at_top, args.time_embedding or None)
    head = LayoutHead(args.hidden)
    log(
        f"params: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M"
    )
    tokenizer = clip_tokenizer()
    scheduler = build_scheduler(args.prediction)
    vae.requires_grad_(False).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 2)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # Each timestep's loss weighted as min(SNR, 5) + floor in x0 terms (an epsilon target already carries SNR,
    # a v target SNR + 1). floor 0 is min-SNR-5; a floor of 1 keeps the noisiest steps, where the caption
    # alone decides the background and where things go, at full weight instead of ~SNR (0.005).
    weights = (torch.clamp(snr, max=5.0) + args.floor) / (snr + 1 if args.prediction == "v" else snr)
    x0_weights = 1.0 / snr
    empty = tokenize(tokenizer, [""])
    cpu = time.process_time()
    if args.text_warmup:
        warm_up_text_encoder(args, text_encoder, head, tokenizer)
    # An exponential moving average of the weights is what gets saved (it smooths the last steps' noise).
    live = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    averaged = list(ema_unet.parameters()) + list(ema_text.parameters())
    start = time.time()
    for step in range(args.unet_steps):
        lr = lr_at(step, args.unet_steps, args.lr, constant=args.lr_schedule == "constant")
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions, chosen = scenes.batch(seed=step, count=args.batch)
        ids = tokenize(tokenizer, captions)
        drop = torch.rand(len(captions), generator=generator) < args.uncond
        ids[drop] = empty
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            latents = vae.encode(to_tensor(images)).latent_dist
            latents = (latents.mean + latents.std * torch.randn(latents.mean.shape, generator=generator)).float()
        latents = latents * SCALING_FACTOR
        noise = torch.randn(latents.shape, generator=generator)
        if args.offset_noise:
            # Offset noise: a random per-channel shift of the noise, so the model cannot read the picture's mean
            # color from the noisy input at high noise and must take it (the background) from the caption.
            noise = noise + args.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
        t = torch.randint(0, 1000, (len(captions),), generator=generator)
        if args.high_t:
            # Extra samples at high noise, where the layout and background come from the caption alone.
            high = torch.rand(len(captions), generator=generator) < args.high_t
            t = torch.where(high, torch.randint(750, 1000, (len(captions),), generator=generator), t)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            states = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=states).sample
        target = scheduler.get_velocity(latents, noise, t) if args.prediction == "v" else noise
        mse = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        diffusion = (mse * weights[t]).mean()
        # The picture's mean color (here: the background) is fixed in the first, noisiest steps, where an error
        # in the mean of the predicted noise is multiplied by sqrt((1 - a) / a) (up to 15x) in the picture. The
        # epsilon loss barely sees that error, so the mean is also scored where it lands: in x0 space.
        if args.dc:
            dc_error = (pred.float() - target).mean(dim=(2, 3))
            dc = (dc_error.pow(2) * x0_weights[t, None]).mean()
            diffusion = diffusion + args.dc * dc
        keep = ~drop
        eos_index = (ids == EOS).int().argmax(1)
        pooled = states[torch.arange(len(ids)), eos_index]
        targets = layout_targets(chosen)
        aux_a, acc = head.loss(pooled[keep], targets[keep])
        aux_b, _ = head.loss(states[keep, -1], targets[keep])
        loss = diffusion + args.aux * (aux_a + aux_b) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(averaged, live, 1 - decay)
        if step % 25 == 0 or step == args.unet_steps - 1:
            log(
                f"step {step}/{args.unet_steps} lr {lr:.2e} diff {diffusion.item():.4f} aux {aux_a.item():.3f} "
                f"layout-acc {acc.item():.2f} ({time.time() - start:.0f}s)"
            )
        if args.save_every and (step + 1) % args.save_every == 0:
            save_parts(work / "unet_latest", ema_unet, ema_text, step + 1)
            (work / "unet_latest" / "time.txt").write_text(f"{time.time() - start:.0f} {time.process_time() - cpu:.0f}")
    save_parts(out, ema_unet, ema_text, args.unet_steps)
    (work / "unet_time.txt").write_text(f"{time.time() - start:.0f} {time.process_time() - cpu:.0f}")
    return ema_unet, ema_text


def warm_up_text_encoder(args, text_encoder, head, tokenizer) -> None:
    """Teach the text encoder the layout words first (the auxiliary loss alone, cheap), so that the UNet
    gets informative conditioning from its first step."""
    optimizer = torch.optim.AdamW(list(text_encoder.parameters()) + list(head.parameters()), lr=args.lr)
    start = time.time()
    for step in range(args.text_warmup):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.text_warmup, args.lr, warmup=20, constant=True)
        _, captions, chosen = scenes.batch(seed=50_000_000 + step, count=args.batch * 2)
        ids = tokenize(tokenizer, captions)
        states = text_encoder(ids).last_hidden_state
        pooled = states[torch.arange(len(ids)), (ids == EOS).int().argmax(1)]
        targets = layout_targets(chosen)
        loss_a, acc = head.loss(pooled, targets)
        loss_b, _ = head.loss(states[:, -1], targets)
        optimizer.zero_grad(set_to_none=True)
        (loss_a + loss_b).backward()
        torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.text_warmup - 1:
            log(f"text warm-up {step}/{args.text_warmup} aux {loss_a.item():.3f} layout-acc {acc.item():.2f} "
                f"({time.time() - start:.0f}s)")


def save_parts(folder: Path, unet, text_encoder, step: int) -> None:
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "step.txt").write_text(str(step))


# ------------------------------------------------------------------------------------------ 3. export


def pipeline(vae, text_encoder, unet, prediction: str):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerAncestralDiscreteScheduler.from_config(build_scheduler(prediction).config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quality(pipe, count: int, steps: int, guidance: float, cfg_end: float = 1.0) -> dict:
    from brushwork.engine.run import end_guidance_after  # what the engine does for --cfg-end

    def end_cfg(p, i, t, tensors):
        return end_guidance_after(cfg_end, p, i, tensors)

    def generate(prompt: str, seed: int):
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
            height=scenes.IMAGE_SIZE, width=scenes.IMAGE_SIZE,
            callback_on_step_end=end_cfg, callback_on_step_end_tensor_inputs=["prompt_embeds"],
        ).images[0]

    return evaluate(generate, count=count)


def export(work: Path, out_path: Path, vae, text_encoder, unet, prediction: str, defaults: dict) -> None:
    from brushwork.models.convert import save_single_file

    metadata = {
        "modelspec.resolution": f"{scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE}",
        "modelspec.title": "brushwork mini",
        "modelspec.architecture": "stable-diffusion-v1",
        # Read by brushwork's loader (and other tools that honour ModelSpec) to pick the scheduler's target.
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        # brushwork uses these when a request leaves them open (a small model over-saturates at CFG 7, and
        # CFG in the last, least noisy steps pinches its squares' sides)
        "brushwork.defaults": json.dumps(defaults),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(out_path, unet=unet, vae=vae, text_encoder=text_encoder, dtype=torch.float16, metadata=metadata)
    log(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB)")


def write_card(path: Path, args, work: Path, vae, text_encoder, unet, metrics: dict | None) -> None:
    """A short model card beside the weights: data, architecture, training, measured quality."""

    def millions(model) -> str:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"

    def seconds(name: str) -> tuple[int, int]:
        """(wall, cpu) seconds of a stage, as its time file recorded them."""
        parts = (work / name).read_text().split() if (work / name).exists() else []
        return (int(parts[0]), int(parts[-1])) if parts else (0, 0)

    vae_s, vae_cpu = seconds("vae_time.txt")
    unet_s, unet_cpu = seconds("unet_time.txt")
    lines = [
        "# brushwork mini",
        "",
        "A tiny Stable Diffusion 1.x model (same architecture family and single-file key layout as",
        "`sd-v1-4.ckpt`) trained from scratch by `tools/train_mini.py` on procedural pictures of flat shapes.",
        "It is brushwork's default model when none is installed, and the model tests use to check that a",
        "picture matches its prompt. It draws nothing but its toy world.",
        "",
        "## Data",
        f"- `brushwork.mini.scenes`: {scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE} pictures of one or two shapes "
        f"({', '.join(scenes.KINDS)}) in {len(scenes.COLORS)} colors ({', '.join(scenes.COLORS)}), "
        f"placed {', '.join(scenes.POSITIONS)} (pairs: left/right or top/bottom), on a plain background of another",
        "  of those colors, with small jitter of place and size; half the scenes have one shape.",
        "- English captions built from the same facts with varied word order and phrasing, e.g.",
        '  "a red circle on the left and a blue square on the right, on a white background",',
        '  "on a black background, at the top a green triangle and one purple circle near the bottom".',
        "- About 10% of all fact combinations (a hash of the facts) are held out of training; the quality",
        "  numbers below are measured on those only.",
        "",
        "## Architecture",
        f"- VAE: `AutoencoderKL`, blocks {list(vae.config.block_out_channels)}, 4 latent channels, "
        f"{scenes.IMAGE_SIZE // 4}x{scenes.IMAGE_SIZE // 4} latents, scaling factor {SCALING_FACTOR} ({millions(vae)}).",
        f"- Text encoder: `CLIPTextModel`, hidden {text_encoder.config.hidden_size}, "
        f"{text_encoder.config.num_hidden_layers} layers, {text_encoder.config.num_attention_heads} heads, CLIP BPE "
        f"vocabulary 49408, 77 tokens ({millions(text_encoder)}; most of it the token embedding).",
        f"- UNet: `UNet2DConditionModel`, blocks {list(unet.config.block_out_channels)}, "
        f"{list(unet.config.down_block_types)}, 8 attention heads, cross-attention {unet.config.cross_attention_dim}, "
        f"timestep embedding {unet.config.time_embedding_dim or 4 * unet.config.block_out_channels[0]} "
        f"({millions(unet)}).",
        "- Noise schedule: SD 1.x DDPM (1000 steps, scaled_linear 0.00085-0.012), "
        + ("v-prediction (as SD 2.x 768; the file says so in `modelspec.prediction_type`)."
           if args.prediction == "v" else "epsilon prediction."),
        "- Stored in fp16, SD key layout (`model.diffusion_model.*`, `first_stage_model.*`,",
        "  `cond_stage_model.transformer.text_model.*`); metadata `modelspec.resolution` = "
        f"`{scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE}`.",
        "",
        "## Training (CPU, from scratch, seeded)",
        f"- VAE: {args.vae_steps} steps, batch {args.vae_batch}, AdamW lr {args.vae_lr}, MSE + 0.5 L1 + KL "
        f"{args.vae_kl}, 32x32 crops for the first {int(args.vae_crop_until * 100)}% of steps; {vae_s / 60:.1f} min "
        f"({vae_cpu / 60:.1f} min of CPU time).",
        *_unet_training_lines(args),
        f"  {unet_s / 60:.1f} min ({unet_cpu / 60:.1f} min of CPU time).",
        f"- Total {(vae_s + unet_s) / 60:.1f} min wall, {(vae_cpu + unet_cpu) / 60:.1f} min of CPU time, "
        f"{args.threads} torch thread(s) on a 2-core CPU.",
        "- Reproduce: `.venv/bin/python tools/train_mini.py --work /tmp/mini/run "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _reproduce_args(args).items())
        + "`",
        "",
        "## Use",
        f"- Default size {scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE}; sampler \"Euler a\", {args.eval_steps} steps; "
        f"CFG {args.recommended_cfg:g} for the first {args.recommended_cfg_end:.0%} of the steps, the prompt alone "
        "after (CFG end), both written into the file (`brushwork.defaults`) so that brushwork uses them when no "
        "`--cfg-scale` / `--cfg-end` is given.",
        "- Prompts in the style of the captions above. Words outside that world are ignored.",
        "",
    ]
    if metrics:
        lines += [
            f"## Quality on {metrics['images']} held-out captions ({metrics['shapes']} shapes)",
            "Pictures read back with the pixel checker `brushwork.mini.checker` "
            f"(Euler a, {args.eval_steps} steps, CFG {args.guidance} ending at {args.cfg_end:.0%} of the steps, "
            "seeds 2024+i; the checker scores 100% on the "
            "generator's own pictures).",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        for key in ("background_color_accuracy", "shape_color_accuracy", "shape_kind_accuracy",
                    "position_accuracy", "whole_scene_accuracy"):
            lines.append(f"| {key.replace('_', ' ')} | {metrics[key] * 100:.1f}% |")
        lines.append(f"| seconds per image (training machine, {args.threads} torch thread(s)) | "
                     f"{metrics['seconds_per_image']:.2f} |")
        lines += ["", "`benchmarks/mini_quality.py` measures the same through the engine "
                  "(`benchmarks/results/mini_quality.json`).", ""]
    path.write_text("\n".join(lines))


def _unet_training_lines(args) -> list[str]:
    lines = []
    if args.text_warmup:
        lines.append(f"- Text encoder warm-up: {args.text_warmup} steps of the layout loss alone (batch {args.batch * 2}).")
    loss = "min-SNR-5" if not args.floor else f"min(SNR, 5) + {args.floor:g} (in x0 terms)"
    lines.append(
        f"- UNet + text encoder jointly: {args.unet_steps} steps, batch {args.batch}, AdamW lr {args.lr} (warm-up 100 "
        f"steps, then {'cosine down to 10%' if args.lr_schedule == 'cosine' else 'constant'}), weights saved as an EMA "
        f"(decay {args.ema}), {'v' if args.prediction == 'v' else 'epsilon'} target, loss weight {loss}, "
        f"{int(args.uncond * 100)}% empty captions, and an auxiliary layout loss (weight {args.aux}) on the text "
        "encoder's end-of-text states whose small head is discarded"
        + (f"; offset noise {args.offset_noise}" if args.offset_noise else "")
        + (f"; an x0-space loss on the predicted mean color (weight {args.dc})" if args.dc else "")
        + (f"; {int(args.high_t * 100)}% of samples from the noisiest quarter of timesteps" if args.high_t else "")
        + ";"
    )
    return lines


def _reproduce_args(args) -> dict:
    keys = ("seed", "prediction", "floor", "text_warmup", "vae_steps", "unet_steps", "batch", "lr", "lr_schedule", "hidden", "text_layers", "aux", "uncond", "ema", "offset_noise", "dc", "high_t", "time_embedding")
    out = {k: getattr(args, k) for k in keys}
    out["channels"] = " ".join(map(str, args.channels))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mini/run"), help="scratch folder (outside git)")
    parser.add_argument("--out", type=Path, default=ROOT / "src/brushwork/models/mini/mini.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-crop-until", type=float, default=0.8, help="fraction of VAE steps on 32x32 crops")
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--unet-steps", type=int, default=4700)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                        help="after 100 warm-up steps: cosine down to 10%% of --lr, or constant")
    parser.add_argument("--hidden", type=int, default=128, help="text encoder width = UNet cross-attention size")
    parser.add_argument("--text-layers", type=int, default=3)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 64, 128])
    parser.add_argument("--time-embedding", type=int, default=128,
                        help="width of the UNet's timestep embedding (0: 4x the first of --channels, as SD)")
    parser.add_argument("--attention-at-top", action="store_true", help="cross-attention at 16x16 too (2x slower)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the UNet stage (slower on 1 thread)")
    parser.add_argument("--prediction", choices=("eps", "v"), default="v", help="training target (v: SD 2.x's v-prediction)")
    parser.add_argument("--floor", type=float, default=1.0,
                        help="loss weight in x0 terms is min(SNR, 5) + floor (0: plain min-SNR-5)")
    parser.add_argument("--text-warmup", type=int, default=200, help="steps of layout-only text encoder training first")
    parser.add_argument("--offset-noise", type=float, default=0.0)
    parser.add_argument("--dc", type=float, default=0.0, help="weight of the x0-space loss on the mean color")
    parser.add_argument("--high-t", type=float, default=0.0, help="fraction of samples drawn from t in [750, 1000)")
    parser.add_argument("--uncond", type=float, default=0.1, help="fraction of empty captions")
    parser.add_argument("--aux", type=float, default=0.1, help="weight of the layout loss on the text encoder")
    parser.add_argument("--ema", type=float, default=0.995, help="decay of the weight average that is saved")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a CPU busy with other work)")
    parser.add_argument("--eval-count", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale of the held-out evaluation")
    parser.add_argument("--recommended-cfg", type=float, default=2.0,
                        help="CFG scale written into the file as its default (used when a request leaves CFG open)")
    parser.add_argument("--cfg-end", type=float, default=0.85,
                        help="fraction of the evaluation's steps with CFG (the last ones use the prompt alone)")
    parser.add_argument("--recommended-cfg-end", type=float, default=0.85,
                        help="CFG end written into the file as its default (used when a request leaves it open)")
    parser.add_argument("--no-export", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    random.seed(args.seed)
    vae = train_vae(args, args.work)
    if args.unet_steps == 0:
        return
    unet, text_encoder = train_unet(args, args.work, vae)
    pipe = pipeline(vae, text_encoder, unet, args.prediction)
    metrics = None
    if args.eval_count:
        asked = {"count": args.eval_count, "steps": args.eval_steps, "guidance": args.guidance,
                 "cfg_end": args.cfg_end}
        saved = json.loads((args.work / "metrics.json").read_text()) if (args.work / "metrics.json").exists() else {}
        if saved.get("asked") == asked:
            metrics = saved  # the same evaluation of the same weights, already done
        else:
            metrics = {**quality(pipe, args.eval_count, args.eval_steps, args.guidance, args.cfg_end), "asked": asked}
            (args.work / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log("held-out quality: " + json.dumps(metrics))
    if not args.no_export:
        defaults = {"cfg_scale": args.recommended_cfg, "cfg_end": args.recommended_cfg_end}
        export(args.work, args.out, vae, text_encoder, unet, args.prediction, defaults)
        write_card(args.out.parent / "MODEL_CARD.md", args, args.work, vae, text_encoder, unet, metrics)


if __name__ == "__main__":
    main()

"""A LoRA on the full-size SD 1.5 UNet and CLIP-L (random weights): load time, apply / switch-off time, the step's
cost with the adapter on, and the memory it takes; and that switched off, the UNet computes exactly what it did.

    .venv/bin/python benchmarks/lora.py --out benchmarks/results/lora.json      # SD 1.5, a rank-32 LoRA
    .venv/bin/python benchmarks/lora.py --arch tiny --out /tmp/lora.json         # a check of this script

The LoRA is kohya's layout (``lora_unet_*`` / ``lora_te_*`` with ``.alpha``) for every attention projection, the
feed-forward layers and proj_in/proj_out of the UNet, and the attention and MLP layers of the text encoder (what
a typical civitai LoRA covers), random, saved as .safetensors and loaded through ``engine.lora.load`` (diffusers'
conversion and peft adapters), exactly as a request's ``<lora:...>`` tag loads it. Timed: loading the file onto
the model (once per file: later requests reuse the adapter), ``apply`` (what every request with the tag does),
``disable`` (what every request ends with), and one UNet call at 512x512 (batch 2, as a CFG step) without, with,
and again without the adapter. ``exact_after_disable``: the last call's output equals the first's bit for bit.
RSS is the process's (every loaded weight included), before and after loading, and its peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from step import clip_l, machine, sd15_unet, write_results  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def kohya_lora(unet, text_encoder, rank: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    state = {}
    for prefix, model, targets in (("lora_unet_", unet, UNET_TARGETS), ("lora_te_", text_encoder, TE_TARGETS)):
        for name, module in model.named_modules():
            if not name.endswith(targets):
                continue
            key = prefix + name.replace(".", "_")
            if isinstance(module, torch.nn.Linear):
                down, up = (rank, module.in_features), (module.out_features, rank)
            elif isinstance(module, torch.nn.Conv2d):
                down, up = (rank, module.in_channels, 1, 1), (module.out_channels, rank, 1, 1)
            else:
                continue
            state[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.01
            state[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.01
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def tiny_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=1, max_position_embeddings=77)).eval()
    return unet, te


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    args = parser.parse_args(argv)
    started = time.time()

    import torch
    from safetensors.torch import save_file

    from brushwork.engine import lora
    from brushwork.models.loras import LoraFile

    torch.manual_seed(0)
    unet, te = (sd15_unet(), clip_l().eval()) if args.arch == "sd15" else tiny_models()
    parts = SimpleNamespace(unet=unet, text_encoder=te)
    side = 64 if args.arch == "sd15" else 8
    latents = torch.randn(2, 4, side, side)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    results = {"machine": machine(), "arch": args.arch, "rank": args.rank}

    def step():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = unet(latents, 500, context).sample
            return out, round(time.perf_counter() - t0, 3)

    before, results["step_s_before"] = step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-lora.safetensors"
        state = kohya_lora(unet, te, args.rank)
        save_file(state, path)
        results["lora_file_mb"] = round(path.stat().st_size / 2**20, 1)
        results["lora_layers"] = sum(1 for k in state if k.endswith("lora_down.weight"))
        del state
        results["rss_mb_before_load"] = current_rss_mb()
        t0 = time.perf_counter()
        name, note = lora.load(parts, LoraFile(path.stem, path, path.stem))
        results["load_s"] = round(time.perf_counter() - t0, 3)
        results["note"] = note
        results["rss_mb_after_load"] = current_rss_mb()
        t0 = time.perf_counter()
        lora.apply(parts, [(name, 1.0, 1.0)])
        results["apply_s"] = round(time.perf_counter() - t0, 4)
        with_lora, results["step_s_with_lora"] = step()
        t0 = time.perf_counter()
        lora.disable(parts)
        results["disable_s"] = round(time.perf_counter() - t0, 4)
        after, results["step_s_after"] = step()
    results["changed_by_lora"] = bool((with_lora - before).abs().max() > 0)
    results["exact_after_disable"] = bool(torch.equal(after, before))
    print({k: v for k, v in results.items() if k != "machine"})
    write_results(results, started, args.out)
    return 0 if results["exact_after_disable"] and results["changed_by_lora"] else 1


if __name__ == "__main__":
    sys.exit(main())

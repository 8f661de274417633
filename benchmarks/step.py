"""Seconds per denoising step of the full-size SD 1.5 UNet (random weights), plain diffusers vs brushwork.

    .venv/bin/python benchmarks/step.py                       # CPU (and the GPU too when CUDA exists)
    .venv/bin/python benchmarks/step.py --sizes 512 --rounds 5 --out benchmarks/results/step.json

One step is one UNet call on a batch of 2 (classifier-free guidance: the prompt and the negative
prompt), as in every txt2img step. Both variants run in the same process, interleaved round by
round, so a busy machine slows both alike; we report medians and the ratio. "diffusers" is what
plain diffusers does by default (fp32 on a CPU, fp16 eager on a GPU); "brushwork" is what
``engine.device.choose(..., "auto")`` picks for this model on this machine, placed by
``engine.device.place``, exactly as the engine runs it. The VAE decode of one 512x512 image is
timed the same way. ``rel_error`` is |brushwork - diffusers fp32| / |diffusers fp32| of the UNet's
output (the noise prediction) for the same input: the quality cost of the faster path.
Speed and memory do not depend on the weights' values, so random weights measure the real thing.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


# ---- full-size architectures, random weights ----------------------------------------------------


def sd15_unet():
    """The SD 1.5 UNet (diffusers' defaults are its config: 320/640/1280/1280, 8 heads, context 768)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # the same weights every run: a backend's cache (keyed by the weights) is found again
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()


def unet_pass(args):
    """One pass of a full-size UNet for the single-pass benchmarks (``ov_profile.py``, ``cpu_backends.py``): the
    options they share on ``args`` (``--unet sd21|sd15``, ``--side``, ``--batch``) -> (the UNet, a module taking
    (sample, timestep, encoder_hidden_states) and returning the prediction, and those three inputs)."""
    import torch

    torch.manual_seed(0)
    unet = sd21_unet() if args.unet == "sd21" else sd15_unet()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.side // 8, args.side // 8, generator=gen)
    t = torch.full((args.batch,), 999.0)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=gen)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    return unet, Wrapped().eval(), (x, t, context)


def add_unet_pass_options(parser, rounds: int) -> None:
    parser.add_argument("--unet", choices=["sd21", "sd15"], default="sd21")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=rounds)


def sd21_unet():
    """The SD 2.1 UNet: linear projections, heads of 64 channels, context 1024 (OpenCLIP-H)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True).eval()


def sd_vae(sample_size: int = 512):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()


def clip_l():
    """SD 1.x's text encoder: CLIP ViT-L/14's text tower, 12 layers of width 768."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).eval()


def openclip_h():
    """SD 2.x's text encoder: OpenCLIP ViT-H/14's text tower up to the penultimate layer (23 of width 1024)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=1024)).eval()


# ---- the machine --------------------------------------------------------------------------------


def machine() -> dict:
    import diffusers
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu_threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        info["cpu_cores"] = int(fields.get("CPU(s)", "0").strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        info["cpu"] = platform.processor()
    from brushwork.engine.device import _cpu_flags, cpu_has_native_bf16

    info["cpu_native_bf16"] = cpu_has_native_bf16()
    info["cpu_bf16_flags"] = sorted(f for f in _cpu_flags() if "bf16" in f or f.startswith("amx"))
    # the vector extensions the kernels can use (int8 pays with VNNI: avx512_vnni / avx_vnni)
    info["cpu_flags"] = sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f)
    try:
        info["load_average_at_start"] = [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def sgemm_gflops(side: int = 2048, seconds: float = 2.0) -> dict:
    """What this machine's cores do in fp32 matrix products right now (torch's sgemm, the threads torch uses): the
    practical ceiling a model's fp32 pass can reach here, which a shared machine moves from one minute to the next.
    Median and best GFLOP/s over ~``seconds`` of ``side``-square products."""
    import statistics

    import torch

    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up
    rates, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        a @ b
        rates.append(2 * side**3 / (time.perf_counter() - t0) / 1e9)
    return {"median": round(statistics.median(rates), 1), "best": round(max(rates), 1), "side": side,
            "threads": torch.get_num_threads()}


def write_results(results: dict, started: float, out: str) -> None:
    """Close a benchmark's results (peak RSS, load average, wall time) and write them as JSON."""
    import os

    results["peak_rss_mb"] = peak_rss_mb()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.time() - started, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---- timing -------------------------------------------------------------------------------------


def timed(fn, device: str) -> float:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleave(variants: dict, rounds: int, device: str, warmup: int = 1) -> dict:
    """{name: [seconds, ...]}: each round runs every variant once, in turn."""
    times = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            seconds = timed(fn, device)
            if r >= warmup:
                times[name].append(seconds)
        if r >= warmup:  # other processes on the machine skew CPU timings: keep the evidence
            times.setdefault("_load_average_1min", []).append(round(__import__("os").getloadavg()[0], 2))
    return times


def summary(times: dict, base: str = "diffusers") -> dict:
    times = dict(times)
    load = times.pop("_load_average_1min", None)
    out = {name: {"median_s": round(statistics.median(t), 3), "runs_s": [round(x, 3) for x in t]}
           for name, t in times.items()}
    if load:
        out["load_average_1min_per_round"] = load
    for name in times:
        if name != base and name in out:
            out[name]["speedup_vs_" + base] = round(out[base]["median_s"] / out[name]["median_s"], 2)
    return out


def rel_error(a, b) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm()), 5)


# ---- the benchmark ------------------------------------------------------------------------------


def accelerated(policy, kind: str, module, first: dict):
    """The context a CPU backend runs ``module`` in (OpenVINO: ``engine.backends``, its conversions cached in
    brushwork's cache folder, so a second run of this benchmark reads them); ``first`` gets its statistics.
    ``context.time_cache_read(call)`` times ``call`` on a new backend object, which has nothing in memory and
    reads the conversion from the disk cache, as a new process or a restarted server does."""
    from contextlib import nullcontext

    if policy.backend != "openvino":
        context = lambda: nullcontext()  # noqa: E731
        context.time_cache_read = lambda call: None
        return context
    from brushwork import Settings
    from brushwork.engine.backends import OpenVinoModel

    settings = Settings.load()

    def fresh():
        return OpenVinoModel(Path(settings.cache_dir) / "openvino", threads=settings.threads)

    accel = fresh()
    first["backend_stats"] = accel.stats

    def context():
        return getattr(accel, kind)(module)

    def time_cache_read(call):
        again = fresh()
        started = time.perf_counter()
        with getattr(again, kind)(module):
            call()
        first["first_call_from_cache_s"] = round(time.perf_counter() - started, 2)
        first["from_cache_stats"] = again.stats

    context.time_cache_read = time_cache_read
    return context


def unet_step_variants(unet, device: str, side: int, *, compile: bool, backend: str = "auto", first=None):
    """(variants, inputs, policies): plain diffusers and brushwork's automatic choice of the same UNet."""
    import torch

    from brushwork.engine import device as device_mod

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side // 8, side // 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(500.0)
    policy = device_mod.choose(device, "auto", unet_params=device_mod.unet_param_count(SimpleNamespace(unet=unet)),
                               compile=compile, backend=backend)
    ours = copy.deepcopy(unet)
    device_mod.place(SimpleNamespace(unet=ours, vae=sd_vae_stub(), text_encoder=sd_vae_stub(),
                                     text_encoders=[sd_vae_stub()]), policy)
    backend_context = accelerated(policy, "unet", ours, first if first is not None else {})
    if device == "cpu":
        plain = unet  # diffusers' default on a CPU: fp32
        plain_in = (latents, context)
    else:
        plain = unet.to(device, torch.float16)  # diffusers' usual GPU setup: fp16, eager, SDPA
        plain_in = (latents.to(device, torch.float16), context.to(device, torch.float16))
    ours_in = (latents.to(device, policy.latent_dtype), context.to(device, policy.text_dtype))

    def run(model, inputs, context=None):
        with torch.inference_mode(), (context or nullcontext)():
            return model(inputs[0], t.to(device), encoder_hidden_states=inputs[1], return_dict=False)[0]

    def brushwork(plain_context=False):  # plain_context: the caller has put a backend's context around the call
        return run(ours, ours_in, None if plain_context else backend_context)

    brushwork.time_cache_read = backend_context.time_cache_read
    return {"diffusers": lambda: run(plain, plain_in), "brushwork": brushwork}, policy


def sd_vae_stub():
    """place() wants three modules; each part of this benchmark times one."""
    import torch

    class Stub(torch.nn.Linear):
        @property
        def dtype(self):
            return self.weight.dtype

    return Stub(1, 1)


def bench_unet(device: str, sizes: list[int], rounds: int, compile: bool, results: dict,
               backend: str = "auto") -> None:
    import torch

    unet = sd15_unet()
    for side in sizes:
        first: dict = {}
        variants, policy = unet_step_variants(unet, device, side, compile=compile, backend=backend, first=first)
        # quality: brushwork's output against plain diffusers' for the same input (fp32 on a CPU); the first call
        # of each is timed apart (a backend's conversion and compilation, or a cache read, happen there)
        outputs = {}
        for name, fn in variants.items():
            started = time.perf_counter()
            outputs[name] = fn().float().cpu()
            first[f"{name}_first_call_s"] = round(time.perf_counter() - started, 2)
        ours = variants["brushwork"]
        ours.time_cache_read(lambda ours=ours: ours(plain_context=True))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = interleave(variants, rounds, device, warmup=0)  # the calls above were the warm-up
        entry = {"what": f"SD 1.5 UNet, {side}x{side}, batch 2 (CFG), one step", "policy": policy.describe(),
                 "policy_why": policy.why, "backend": policy.backend, "channels_last": policy.channels_last,
                 "compile": policy.compile, "first_calls": first, **summary(times)}
        base = "fp32" if device == "cpu" else "fp16"
        entry["brushwork"][f"rel_error_vs_diffusers_{base}"] = rel_error(outputs["brushwork"], outputs["diffusers"])
        if device == "cuda":
            entry["peak_vram_gb_both_unets"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results[f"unet_{device}_{side}"] = entry
        print(json.dumps({f"unet_{device}_{side}": entry}), flush=True)
        del variants


def bench_vae(device: str, rounds: int, results: dict, backend: str = "auto") -> None:
    import torch

    from brushwork.engine import device as device_mod
    from brushwork.engine.run import decode

    vae = sd_vae()
    # the VAE of an SD 1.5 model
    policy = device_mod.choose(device, "auto", unet_params=859_520_964, backend=backend)
    ours = copy.deepcopy(vae)
    device_mod.place(SimpleNamespace(unet=sd_vae_stub(), vae=ours, text_encoder=sd_vae_stub(),
                                     text_encoders=[sd_vae_stub()]), policy)
    first: dict = {}
    backend_context = accelerated(policy, "decoder", ours, first)
    plain = vae if device == "cpu" else vae.to(device, torch.float16)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    pixels = {}

    def run(model, name, context=None):
        with (context or nullcontext)():
            pixels[name] = decode(model, latents)[0][0]

    started = time.perf_counter()
    run(ours, "brushwork", backend_context)
    first["brushwork_first_call_s"] = round(time.perf_counter() - started, 2)
    backend_context.time_cache_read(lambda: run(ours, "brushwork"))
    times = interleave({"diffusers": lambda: run(plain, "diffusers"),
                        "brushwork": lambda: run(ours, "brushwork", backend_context)}, rounds, device)
    import numpy as np

    diff = np.abs(np.asarray(pixels["diffusers"]).astype(int) - np.asarray(pixels["brushwork"]).astype(int))
    entry = {"what": "SD VAE decode, one 512x512 image", "policy": policy.describe(), "backend": policy.backend,
             "first_calls": first, **summary(times)}
    entry["brushwork"]["pixel_diff_vs_diffusers"] = {"mean": round(float(diff.mean()), 3), "max": int(diff.max())}
    results[f"vae_decode_{device}_512"] = entry
    print(json.dumps({f"vae_decode_{device}_512": entry}), flush=True)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,256", help="image sides, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile brushwork's UNet")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                        help="brushwork's CPU backend (engine/backends.py) [auto: what the engine picks here]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step.json"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]

    started = time.time()
    results: dict = {"benchmark": "step", "machine": machine(), "sizes": sizes, "rounds": args.rounds}
    for device in devices:
        bench_unet(device, sizes, args.rounds, args.compile, results, backend=args.backend)
        if not args.skip_vae:
            bench_vae(device, args.rounds, results, backend=args.backend)
    if "cuda" not in devices:
        results["gpu"] = "no CUDA device in this run; the GPU variants run when one is present"
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall time of whole images through the public API (Engine.generate) vs a plain diffusers pipeline.

    .venv/bin/python benchmarks/image.py                      # CPU: SD 1.5, 20 steps, 512x512
    .venv/bin/python benchmarks/image.py --rounds 2 --out benchmarks/results/image.json

A full-size SD 1.5 checkpoint with random weights (the real architecture: UNet 320/640/1280/1280,
context 768; CLIP-L text encoder, 12 layers of width 768; VAE 128/256/512/512) is built, saved with
``brushwork.models.convert.save_single_file`` into a temporary folder and loaded through the
engine, exactly as a downloaded ``v1-5-pruned.safetensors`` would be. Plain diffusers gets a
``StableDiffusionPipeline`` built from the very same module objects (same weights), in its default
setup (fp32 on a CPU; fp16, eager, SDPA on a GPU). Both use the Euler sampler, 20 steps, CFG 7.5, the
same seed (so the same initial noise) and no watermark; runs are interleaved in one process.
``pixel_diff`` compares the two images: the quality cost of brushwork's faster path.

With CUDA present it also runs the GPU: SD 1.5 at 512, SD 2.1 (768, v-prediction) at 768 and SDXL base at
1024 (10 steps: ``max_steps`` in ``GPU_MODELS``), for every memory mode (high, medium, low, minimal), with it/s and
peak VRAM (torch.cuda.max_memory_allocated, and the allocator's reserved peak) per mode, against diffusers fp16 eager.
SDXL is fewstep.py's full-size build (the UNet config brushwork ships, CLIP-L + OpenCLIP bigG, SDXL's VAE), made on
the GPU (its 3.5 B parameters' random init takes ~100 s on 2 CPU cores; on the CPU if that fails), saved as an
original SDXL single file in fp16 (as the real ones are) and loaded by the engine as a downloaded one would be;
plain diffusers gets a ``StableDiffusionXLPipeline`` on the same modules (its VAE's default ``force_upcast``).
Nothing is fetched: the checkpoints are made here.

A check of the GPU path's plumbing in seconds, here, without a GPU (build, save, load, every memory mode, JSON):

    .venv/bin/python benchmarks/image.py --device cuda --gpu-device cpu --arch tiny --gpu-families sdxl \
        --steps 2 --out /tmp/image-tiny.json

``--gpu-device cpu`` runs ``bench_gpu`` on the CPU (diffusers in fp32; no VRAM to measure; low and minimal plan as
medium there, nothing to offload to: the JSON's ``skipped`` says so); ``--arch tiny`` swaps in the tests' tiny
architectures (tests/tinymodels.py) at 64x64. Its keys are ``cpu_tiny_<family>_64``, never ``gpu_*``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import ROOT, clip_l, machine, openclip_h, sd15_unet, sd21_unet, sd_vae, write_results  # noqa: E402

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
NEGATIVE = "blurry"


def build_modules(family: str, arch: str = "full", device: str = "cpu") -> dict:
    """The modules of a random-weight model: full size (the real architecture) or ``tiny`` (the tests')."""
    import torch

    if arch == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodels import build_components

        if family == "sdxl":
            from fewstep import build

            parts = build("sdxl", "tiny")[0]
            return {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder,
                    "text_encoder_2": parts.text_encoder_2}
        unet, vae, te = build_components("sd1" if family == "sd15" else "sd2")
        return {"unet": unet, "vae": vae, "text_encoder": te}
    if family == "sd15":
        return {"unet": sd15_unet(), "vae": sd_vae(512), "text_encoder": clip_l()}
    if family == "sd21":
        return {"unet": sd21_unet(), "vae": sd_vae(768), "text_encoder": openclip_h()}
    from fewstep import build  # SDXL base: fewstep.py's full-size build, made on ``device`` (fast on a GPU)

    try:
        with torch.device(device):
            parts = build("sdxl", "full")[0]
    except Exception as err:  # a module that cannot be made there: the CPU, as fewstep.py does
        if device == "cpu":
            raise
        print(f"building SDXL on {device} failed ({type(err).__name__}: {err}); building on the CPU", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        parts = build("sdxl", "full")[0]
    return {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder,
            "text_encoder_2": parts.text_encoder_2}


def build_checkpoint(folder: Path, family: str, arch: str = "full", device: str = "cpu"):
    """(path, modules, info) of a random-weight checkpoint in the original single-file layout (SDXL: both text
    encoders, fp16 as the real files; full size, the modules are then fp16 on the CPU: the weights the file holds)."""
    import torch

    from brushwork.models.convert import save_single_file

    t0 = time.perf_counter()
    modules = build_modules(family, arch, device)
    build_s = time.perf_counter() - t0
    dtype = torch.float16 if family == "sdxl" else None  # tiny too: the check loads an fp16 SDXL file as well
    if family == "sdxl" and arch == "full":  # full size: the modules become what the file holds, fp16 on the CPU
        for module in modules.values():
            module.to("cpu", dtype)
        if device != "cpu":
            torch.cuda.empty_cache()
    path = folder / f"random-{family}-{arch}.safetensors"
    t0 = time.perf_counter()
    save_single_file(path, dtype=dtype, **modules)
    info = {"arch": arch, "build_s": round(build_s, 1), "built_on": device if family == "sdxl" else "cpu",
            "save_s": round(time.perf_counter() - t0, 1), "file_gb": round(path.stat().st_size / 2**30, 2),
            "file_dtype": "fp16" if dtype is not None else "fp32"}
    print(f"built in {info['build_s']} s, saved {path.name} ({info['file_gb']} GiB) in {info['save_s']} s",
          flush=True)
    return path, modules, info


def diffusers_pipeline(modules: dict, family: str, device: str):
    """Plain diffusers over the same module objects: fp32 on a CPU, fp16 on a GPU (SDXL's VAE: its default
    ``force_upcast``, decoding in fp32)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from brushwork.models.families import FAMILY_BY_NAME, SD_SCHEDULER_CONFIG, shipped_config
    from brushwork.models.tokenizers import tokenizer_for

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **modules, tokenizer=tokenizer_for("clip"), tokenizer_2=tokenizer_for("openclip"),
            scheduler=EulerDiscreteScheduler.from_config(shipped_config(FAMILY_BY_NAME["sdxl"], "scheduler")),
            add_watermarker=False,
        )
    else:
        config = dict(SD_SCHEDULER_CONFIG)
        if family == "sd21":
            config["prediction_type"] = "v_prediction"
        pipe = StableDiffusionPipeline(
            **modules, tokenizer=tokenizer_for("clip" if family == "sd15" else "openclip"),
            scheduler=EulerDiscreteScheduler.from_config(config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        pipe.to(device, torch.float16)
    return pipe


def run_diffusers(pipe, side: int, steps: int, seed: int, device: str):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    t0 = time.perf_counter()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, width=side,
                 height=side, generator=generator).images[0]
    if device != "cpu":
        torch.cuda.synchronize()
    return image, time.perf_counter() - t0


def run_engine(engine, path: Path, side: int, steps: int, seed: int, device: str, memory: str = "auto",
               prediction: str | None = None, fast: bool = False, tome: float = 0.0):
    from brushwork import GenerationRequest

    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, model=str(path), steps=steps,
                                cfg_scale=7.5, seed=seed, width=side, height=side, sampler="Euler",
                                watermark=False, device=device, memory=memory, prediction=prediction,
                                fast=fast, token_merging_ratio=tome)
    t0 = time.perf_counter()
    result = engine.generate(request)
    return result, time.perf_counter() - t0


def pixel_diff(a, b) -> dict:
    import numpy as np

    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    return {"mean": round(float(d.mean()), 2), "max": int(d.max()), "p99": float(np.percentile(d, 99))}


def bench_cpu(folder: Path, steps: int, rounds: int, results: dict, side: int = 512, fast: bool = True) -> None:
    from brushwork import Engine, Settings

    path, modules, _ = build_checkpoint(folder, "sd15")
    engine = Engine(Settings(home=folder / "home"))
    pipe = diffusers_pipeline(modules, "sd15", "cpu")
    times = {"diffusers": [], "brushwork": []}
    images = {}
    t0 = time.perf_counter()
    first = run_engine(engine, path, side, 1, 0, "cpu")[0].timings  # loads the model; a 1-step warm-up
    print(f"brushwork load + 1-step warm-up: {time.perf_counter() - t0:.1f} s {first}", flush=True)
    run_diffusers(pipe, side, 1, 0, "cpu")  # the same warm-up for diffusers
    for _ in range(rounds):
        images["diffusers"], seconds = run_diffusers(pipe, side, steps, 1, "cpu")
        times["diffusers"].append(seconds)
        print(f"diffusers: {seconds:.1f} s", flush=True)
        result, seconds = run_engine(engine, path, side, steps, 1, "cpu")
        times["brushwork"].append(seconds)
        images["brushwork"] = result.images[0]
        print(f"brushwork: {seconds:.1f} s {result.timings}", flush=True)
    loaded = engine._loaded
    entry = {
        "what": f"SD 1.5 (random weights), {steps} steps Euler, {side}x{side}, CFG 7.5, one image, CPU",
        "brushwork_policy": loaded.policy.describe(), "brushwork_policy_why": loaded.policy.why,
        "diffusers": {"median_s": round(statistics.median(times["diffusers"]), 1),
                      "runs_s": [round(x, 1) for x in times["diffusers"]]},
        "brushwork": {"median_s": round(statistics.median(times["brushwork"]), 1),
                      "runs_s": [round(x, 1) for x in times["brushwork"]],
                      "load_and_1_step_warmup_timings_s": first, "last_timings_s": result.timings},
        "pixel_diff_brushwork_vs_diffusers_fp32": pixel_diff(images["brushwork"], images["diffusers"]),
    }
    if fast:  # the opt-in speed-ups, once each: fast mode (DeepCache-style), token merging, both
        variants = {"brushwork_fast": (True, 0.0), "brushwork_tome_0.5": (False, 0.5),
                    "brushwork_fast_tome_0.5": (True, 0.5)}
        for name, (quick, tome) in variants.items():
            variant, seconds = run_engine(engine, path, side, steps, 1, "cpu", fast=quick, tome=tome)
            print(f"{name}: {seconds:.1f} s {variant.timings}", flush=True)
            entry[name] = {
                "s": round(seconds, 1), "timings_s": variant.timings, "notes": variant.notes,
                "speedup_vs_diffusers": round(entry["diffusers"]["median_s"] / seconds, 2),
                "pixel_diff_vs_brushwork_default": pixel_diff(variant.images[0], images["brushwork"]),
                "pixel_diff_vs_diffusers_fp32": pixel_diff(variant.images[0], images["diffusers"]),
            }
            variant.images[0].save(folder / f"{name}.png")
    entry["speedup"] = round(entry["diffusers"]["median_s"] / entry["brushwork"]["median_s"], 2)
    results[f"cpu_sd15_{side}"] = entry
    print(json.dumps({f"cpu_sd15_{side}": entry}), flush=True)
    images["brushwork"].save(folder / "brushwork.png")
    images["diffusers"].save(folder / "diffusers.png")
    del pipe, modules, engine
    gc.collect()


# family: image side, prediction (None: the file's), steps at most (SDXL: fewer, to fit the GPU check's time)
GPU_MODELS = {"sd15": {"side": 512, "prediction": None}, "sd21": {"side": 768, "prediction": "v"},
              "sdxl": {"side": 1024, "prediction": None, "max_steps": 10}}
TINY_SIDE = 64  # --arch tiny: the tiny UNets' levels divide its latents (the tiny VAEs scale by 2)


def _cuda(device: str, what: str):
    """torch.cuda's memory bookkeeping where the device is CUDA; nothing on a CPU."""
    import torch

    if device == "cpu":
        return None
    if what == "reset":
        torch.cuda.empty_cache()
        return torch.cuda.reset_peak_memory_stats()
    if what == "empty":
        return torch.cuda.empty_cache()
    if what == "sync":
        return torch.cuda.synchronize()
    return {"peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_vram_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def bench_gpu(folder: Path, steps: int, results: dict, families=tuple(GPU_MODELS), device: str = "cuda",
              arch: str = "full") -> None:
    """Per model: eager diffusers fp16, then brushwork in every memory mode; it/s and peak VRAM. ``device="cpu"``
    and ``arch="tiny"``: the same code on the CPU with tiny models, a check of the plumbing (no VRAM measured)."""
    from brushwork import Engine, Settings

    for family in families:
        spec = GPU_MODELS[family]
        side = spec["side"] if arch == "full" else TINY_SIDE
        prediction = spec["prediction"]
        n = min(steps, spec.get("max_steps", steps))
        where = "gpu" if device != "cpu" else "cpu"
        key = f"{where}_{family}_{side}" if arch == "full" else f"{where}_{arch}_{family}_{side}"
        path, modules, info = build_checkpoint(folder, family, arch, device)
        plain = "diffusers_fp16_eager" if device != "cpu" else "diffusers_fp32_cpu"
        entry: dict = {"what": f"{family} ({arch}, random weights), {n} steps Euler, {side}x{side}, CFG 7.5, "
                               f"one image, {device}", "steps": n, "device": device, "checkpoint": info}
        try:
            pipe = diffusers_pipeline(modules, family, device)
            run_diffusers(pipe, side, 2, 0, device)  # warm-up
            _cuda(device, "reset")
            _, seconds = run_diffusers(pipe, side, n, 1, device)
            entry[plain] = {"s": round(seconds, 2), "it_s": round(n / seconds, 2), **(_cuda(device, "peak") or {})}
            pipe.to("cpu")
            del pipe
        except Exception as err:  # the plain side's failure does not lose brushwork's numbers
            entry[plain] = {"error": f"{type(err).__name__}: {str(err)[:1000]}"}
        del modules
        gc.collect()
        _cuda(device, "empty")
        print(json.dumps({key: entry}), flush=True)  # each number as soon as it is measured: a timeout keeps them
        engine = Engine(Settings(home=folder / f"home-{family}"))
        for memory in ("high", "medium", "low", "minimal"):
            try:
                t0 = time.perf_counter()
                first = run_engine(engine, path, side, 2, 0, device, memory, prediction)[0]  # warm-up (and load)
                first_s = time.perf_counter() - t0
                _cuda(device, "reset")
                result, seconds = run_engine(engine, path, side, n, 1, device, memory, prediction)
                entry[f"brushwork_{memory}"] = {
                    "s": round(seconds, 2), "it_s": round(n / max(result.timings["sample_s"], 1e-9), 2),
                    **(_cuda(device, "peak") or {}), "timings": result.timings, "notes": result.notes,
                    "warmup_2_steps_s": round(first_s, 2), "warmup_timings": first.timings,
                }
            except Exception as err:  # one mode's failure (a bug to fix) does not lose the other modes' numbers
                entry[f"brushwork_{memory}"] = {"error": f"{type(err).__name__}: {str(err)[:1000]}"}
            print(json.dumps({key: {f"brushwork_{memory}": entry[f"brushwork_{memory}"]}}), flush=True)
        if engine._loaded is not None:
            entry["policy"] = engine._loaded.policy.describe()
            try:  # what the engine made of the file: SDXL (both text encoders), the dtypes it runs in
                parts = engine._loaded.parts
                entry["loaded_as"] = {"family": parts.family.name, "prediction": parts.prediction,
                                      "unet_dtype": str(parts.unet.dtype).removeprefix("torch."),
                                      "vae_dtype": str(parts.vae.dtype).removeprefix("torch.")}
            except Exception as err:
                entry["loaded_as"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        if "s" in entry["brushwork_high"] and "s" in entry[plain]:
            entry["speedup_high_vs_diffusers"] = round(entry[plain]["s"] / entry["brushwork_high"]["s"], 2)
        if device == "cpu":
            entry["skipped"] = {
                "peak_vram": "no CUDA device: nothing to measure (a check of the plumbing, not a benchmark)",
                "memory_modes": "on a CPU low and minimal plan as medium (engine/memory.py: nothing to offload "
                                "to), so they ran, but their offload (model / sequential) and VAE tile sizes did not",
            }
        results[key] = entry
        print(json.dumps({key: entry}), flush=True)
        engine.unload()
        del engine
        path.unlink()
        gc.collect()
        _cuda(device, "empty")


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved CPU rounds")
    parser.add_argument("--side", type=int, default=512, help="CPU image side")
    parser.add_argument("--no-fast", action="store_true", help="skip the opt-in runs (fast mode, token merging)")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--gpu-families", default=",".join(GPU_MODELS),
                        help="the GPU's models, comma-separated (one per process keeps a timeout's losses small)")
    parser.add_argument("--gpu-device", default="cuda", choices=["cuda", "cpu"],
                        help="where the GPU variants run: cpu is a check of their plumbing without a GPU")
    parser.add_argument("--arch", default="full", choices=["full", "tiny"],
                        help="the GPU variants' models: tiny = the tests' tiny architectures at 64x64 (a check)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched
    started = time.time()
    results: dict = {"benchmark": "image", "machine": machine(), "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="brushwork-bench-") as tmp:
        if args.device in ("all", "cpu"):
            bench_cpu(Path(tmp), args.steps, args.rounds, results, args.side, not args.no_fast)
        if args.device in ("all", "cuda") and (args.gpu_device == "cpu" or torch.cuda.is_available()):
            bench_gpu(Path(tmp), args.steps, results, [f for f in args.gpu_families.split(",") if f],
                      args.gpu_device, args.arch)
        else:
            results["gpu"] = "no CUDA device in this run; the GPU variants run when one is present"
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

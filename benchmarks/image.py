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

With CUDA present it also runs the GPU: SD 1.5 at 512 and SD 2.1 (768, v-prediction) at 768, for
every memory mode, with it/s and peak VRAM (torch.cuda.max_memory_allocated) per mode.
Nothing is fetched: the checkpoints are made here.
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


def build_checkpoint(folder: Path, family: str):
    """(path, modules) of a full-size random-weight checkpoint in the original single-file layout."""
    from brushwork.models.convert import save_single_file

    if family == "sd15":
        unet, vae, te = sd15_unet(), sd_vae(512), clip_l()
    else:
        unet, vae, te = sd21_unet(), sd_vae(768), openclip_h()
    path = folder / f"random-{family}.safetensors"
    t0 = time.perf_counter()
    save_single_file(path, unet=unet, vae=vae, text_encoder=te)
    print(f"saved {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path, (unet, vae, te)


def diffusers_pipeline(modules, family: str, device: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from brushwork.models.families import SD_SCHEDULER_CONFIG
    from brushwork.models.tokenizers import tokenizer_for

    unet, vae, te = modules
    config = dict(SD_SCHEDULER_CONFIG)
    if family == "sd21":
        config["prediction_type"] = "v_prediction"
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer_for("clip" if family == "sd15" else "openclip"), unet=unet,
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

    path, modules = build_checkpoint(folder, "sd15")
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


GPU_MODELS = {"sd15": (512, None), "sd21": (768, "v")}  # family: (side, prediction)


def bench_gpu(folder: Path, steps: int, results: dict, families=tuple(GPU_MODELS)) -> None:
    """Per model: eager diffusers fp16, then brushwork in every memory mode; it/s and peak VRAM."""
    import torch

    from brushwork import Engine, Settings

    for family in families:
        side, prediction = GPU_MODELS[family]
        path, modules = build_checkpoint(folder, family)
        pipe = diffusers_pipeline(modules, family, "cuda")
        run_diffusers(pipe, side, 2, 0, "cuda")  # warm-up
        torch.cuda.reset_peak_memory_stats()
        _, seconds = run_diffusers(pipe, side, steps, 1, "cuda")
        entry = {"diffusers_fp16_eager": {"s": round(seconds, 2), "it_s": round(steps / seconds, 2),
                                          "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}}
        pipe.to("cpu")
        del pipe, modules
        gc.collect()
        torch.cuda.empty_cache()
        key = f"gpu_{family}_{side}"
        print(json.dumps({key: entry}), flush=True)  # each number as soon as it is measured: a timeout keeps them
        engine = Engine(Settings(home=folder / f"home-{family}"))
        for memory in ("high", "medium", "low", "minimal"):
            try:
                run_engine(engine, path, side, 2, 0, "cuda", memory, prediction)  # warm-up (and load)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                result, seconds = run_engine(engine, path, side, steps, 1, "cuda", memory, prediction)
                entry[f"brushwork_{memory}"] = {
                    "s": round(seconds, 2), "it_s": round(steps / max(result.timings["sample_s"], 1e-9), 2),
                    "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2), "timings": result.timings,
                    "notes": result.notes,
                }
            except Exception as err:  # one mode's failure (a bug to fix) does not lose the other modes' numbers
                entry[f"brushwork_{memory}"] = {"error": f"{type(err).__name__}: {str(err)[:1000]}"}
            print(json.dumps({key: {f"brushwork_{memory}": entry[f"brushwork_{memory}"]}}), flush=True)
        if engine._loaded is not None:
            entry["policy"] = engine._loaded.policy.describe()
        if "s" in entry["brushwork_high"]:
            entry["speedup_high_vs_diffusers"] = round(
                entry["diffusers_fp16_eager"]["s"] / entry["brushwork_high"]["s"], 2)
        results[key] = entry
        print(json.dumps({key: entry}), flush=True)
        engine.unload()
        del engine
        path.unlink()
        gc.collect()
        torch.cuda.empty_cache()


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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched
    started = time.time()
    results: dict = {"benchmark": "image", "machine": machine(), "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="brushwork-bench-") as tmp:
        if args.device in ("all", "cpu"):
            bench_cpu(Path(tmp), args.steps, args.rounds, results, args.side, not args.no_fast)
        if args.device in ("all", "cuda") and torch.cuda.is_available():
            bench_gpu(Path(tmp), args.steps, results, [f for f in args.gpu_families.split(",") if f])
        else:
            results["gpu"] = "no CUDA device in this run; the GPU variants run when one is present"
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The SD x4 upscaler at full size (random weights): brushwork's defaults against plain diffusers' defaults.

    .venv/bin/python benchmarks/upscale.py                                  # 128 -> 512 on the CPU, few steps
    .venv/bin/python benchmarks/upscale.py --sizes 128 512 --plain-steps 75 --brushwork-steps 20  # in full
    .venv/bin/python benchmarks/upscale.py --convergence 32                 # + the samplers' error, 32 -> 128
    .venv/bin/python benchmarks/upscale.py --model tiny --sizes 32 --convergence 32 --out .../upscale_tiny.json
    python benchmarks/upscale.py --device cuda --memory low --sizes 512 --plain-steps 0 --brushwork-steps 20 \
        --equal-steps 0                                                     # the GPU check's part (512 -> 2048)

The architecture is the real one (the configs brushwork ships for stabilityai/stable-diffusion-x4-upscaler: UNet
256/512/512/1024 with 7 input channels, the 3-level VAE, OpenCLIP-H's text tower), with random weights: speed and
memory do not depend on the weights' values. Everything runs in one process, one variant after the other.

- ``plain``: diffusers' StableDiffusionUpscalePipeline as its documentation calls it: ``pipe(prompt="",
  image=...)``, i.e. 75 DDIM steps with CFG 9 (two UNet passes a step), no tiling. On a CPU 75 steps take many
  minutes, so by default ``--plain-steps 2`` of them run and the full run is extrapolated:
  ``total(2) + 73 x median step`` (each step costs the same: a fixed schedule of UNet calls).
- ``brushwork``: the engine's run (``engine.run.generate``, the ``upscale`` task) with the ``upscale`` command's
  defaults (``engine.tasks.upscale.DEFAULTS``: 20 DPM++ 2M Karras steps; an empty prompt runs without CFG, one
  pass a step), tiles of 128 with an overlap of 32 (an input of 128 is one tile). ``--brushwork-steps 2`` of the 20
  run by default, extrapolated the same way.
- ``equal``: brushwork at the plain settings and steps (at ``--equal-size``, 64 -> 256 by default: the pixels do
  not depend on the size, the minutes do), on the same seed, against plain diffusers' pixels: with a
  prompt (CFG on both sides: the same computation) and with an empty prompt (brushwork skips CFG, whose two halves
  are equal: the same picture up to float rounding).
- ``convergence`` (optional): how far each sampler's result is from a 150-step DDIM reference at the same seed
  (random weights: this measures the solver's error on the model's ODE, not picture quality).

Peak RSS is sampled every 20 ms during each variant (the resident set of this process, weights included).

``--device cuda`` runs every variant on the GPU (the components in the policy's dtypes, fp16 there; on the GPU they
are loaded without being moved to it, as the engine loads a model, and the memory mode places them) and
``--memory`` (auto, high, medium, low, minimal: ``engine.memory``) is brushwork's memory mode (the plain pipeline
has none: all on the GPU, untiled). On CUDA each variant also records its peak VRAM (``torch.cuda`` allocator
statistics, reset before the variant: ``peak_vram_allocated_gb``, ``peak_vram_reserved_gb``, in GiB;
``under_4gb_vram``: reserved under 4 GiB; the CUDA context's few hundred MB are outside both), step times are taken
after a ``torch.cuda.synchronize()``, a 1-step brushwork run at 64 -> 256 warms the GPU up first
(``cuda_warmup_s``) and, in ``low`` and ``minimal``, weights left on the GPU by an earlier variant go back to the CPU
before the next brushwork variant (so its peak is the mode's, not the order's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import machine, write_results  # noqa: E402


class PeakRSS:
    """The largest resident set size of this process while the block runs (sampled)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def components():
    """The full-size x4 upscaler, random weights (seed 0), from brushwork's shipped configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from brushwork.models.families import FAMILY_BY_NAME, shipped_config

    family = FAMILY_BY_NAME["sd2-x4-upscaler"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(shipped_config(family, "unet")).eval()
    vae = AutoencoderKL.from_config(shipped_config(family, "vae")).eval()
    te = {k: v for k, v in shipped_config(family, "text_encoder").items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te)).eval()
    return family, unet, vae, text_encoder


def tiny_components():
    sys.path.insert(0, str(ROOT / "tests"))
    from brushwork.models.families import FAMILY_BY_NAME
    from tinymodels import build_upscaler_components

    return (FAMILY_BY_NAME["sd2-x4-upscaler"], *build_upscaler_components())


def picture(side: int):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    rgb = [128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), 128 + 60 * np.sin((x + y) / 11)]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


def pixel_diff(a, b) -> dict:
    import numpy as np

    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4)}


class Steps:
    """Wall time of each denoising step, from a per-step callback (``sync``: after the GPU's queued work)."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.marks = [time.perf_counter()]

    def __call__(self, *args):
        if self.sync:
            import torch

            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [round(b - a, 3) for a, b in zip(self.marks, self.marks[1:], strict=False)]


class PeakVRAM:
    """The CUDA allocator's peak while the block runs (``on`` False: nothing, and ``fields`` is empty)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            import torch

            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.on:
            import torch

            torch.cuda.synchronize()
            self.allocated, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()

    def fields(self) -> dict:
        if not self.on:
            return {}
        return {"peak_vram_allocated_gb": round(self.allocated / 2**30, 2),
                "peak_vram_reserved_gb": round(self.reserved / 2**30, 2), "under_4gb_vram": self.reserved < 4 * 2**30}


def run_plain(parts, image, *, steps: int, prompt: str = "", seed: int = 0, guidance: float = 9.0,
              device: str = "cpu"):
    """diffusers' pipeline as documented (DDIM from the model's scheduler config, CFG 9), no tiling (on a GPU: every
    component on it, without brushwork's offload hooks)."""
    import diffusers
    import torch

    config = parts.pipeline_config
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        low_res_scheduler=diffusers.DDPMScheduler.from_config(config["low_res_scheduler"]),
        scheduler=diffusers.DDIMScheduler.from_config(parts.scheduler_config), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    parts.vae.disable_tiling()  # brushwork's memory modes may have switched diffusers' tiling on: plain is plain
    parts.vae.disable_slicing()
    cuda = device != "cpu"
    if cuda:  # brushwork's low / minimal modes leave offload hooks on the modules (and weights off the GPU)
        pipe.remove_all_hooks()
        pipe.to(device)
    marks = Steps(sync=cuda)
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as rss, PeakVRAM(cuda) as vram:
        out = pipe(prompt=prompt, image=image, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(seed), callback=marks, callback_steps=1).images[0]
    total = time.perf_counter() - t0
    return out, {"steps": steps, "cfg_scale": guidance, "total_s": round(total, 2), "step_s": marks.seconds,
                 "peak_rss_mb": rss.mb, **vram.fields()}


def run_brushwork(parts, policy, image, memory: str = "auto", **fields):
    from brushwork.engine.run import generate
    from brushwork.request import GenerationRequest, Mode

    cuda = not policy.is_cpu
    if cuda and memory in ("low", "minimal"):  # what an earlier variant left on the GPU: the mode offloads it
        for module in parts.modules.values():
            if any(p.device.type == "cuda" for p in module.parameters()):
                module.to("cpu")
    marks = Steps(sync=cuda)
    request = GenerationRequest(mode=Mode.UPSCALE, init_image=image, watermark=False, seed=0, **fields).validate()
    t0 = time.perf_counter()
    with PeakRSS() as rss, PeakVRAM(cuda) as vram:
        result = generate(parts, policy, request, model_name="x4-random", model_hash=None, memory_mode=memory,
                          control=_control(marks))
    total = time.perf_counter() - t0
    extra = {**vram.fields(), **({"memory": memory, "notes": result.notes} if cuda else {})}
    return result.images[0], {**{k: v for k, v in fields.items() if k != "prompt"}, "total_s": round(total, 2),
                              "step_s": marks.seconds, "timings": result.timings, "peak_rss_mb": rss.mb, **extra}


def _control(marks):
    from brushwork.engine.tasks import RunControl

    return RunControl(progress=lambda info: marks())


def extrapolate(measured: dict, steps: int) -> float:
    """A run at ``steps`` steps from one at fewer: each further step costs the median step."""
    per = statistics.median(measured["step_s"])
    return round(measured["total_s"] + (steps - measured["steps"]) * per, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128], help="input sides (the output is 4x)")
    ap.add_argument("--plain-steps", type=int, default=2, help="plain steps actually run (75 = the full default; 0 = brushwork alone)")
    ap.add_argument("--brushwork-steps", type=int, default=2, help="brushwork steps actually run (20 = in full)")
    ap.add_argument("--equal-steps", type=int, default=2,
                    help="steps of the equal-settings pixel comparison (0 = skip it)")
    ap.add_argument("--equal-size", type=int, default=64, help="input side of the equal-settings comparison")
    ap.add_argument("--convergence", type=int, default=0, help="input side of the sampler-error study (0 = off)")
    ap.add_argument("--model", choices=["full", "tiny"], default="full",
                    help="tiny: the tests' tiny x4 upscaler (a check of this script, and a cheap convergence study)")
    ap.add_argument("--device", default="cpu", help="cpu (the default) or cuda / cuda:N")
    ap.add_argument("--memory", choices=["auto", "high", "medium", "low", "minimal"], default="auto",
                    help="brushwork's memory mode (engine.memory; on a CPU low and minimal are medium)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/upscale.json"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    from brushwork.engine import device as device_mod
    from brushwork.engine.tasks.upscale import DEFAULTS, PLAIN_DEFAULTS
    from brushwork.models.load import ModelParts, scheduler_config, shipped_pipeline_config
    from brushwork.models.tokenizers import tokenizer_for

    results: dict = {"machine": machine(), "command": " ".join(sys.argv), "defaults": {"brushwork": DEFAULTS,
                                                                                       "plain": PLAIN_DEFAULTS}}
    t0 = time.perf_counter()
    family, unet, vae, text_encoder = components() if args.model == "full" else tiny_components()
    results["model"] = args.model
    results["build_s"] = round(time.perf_counter() - t0, 1)
    results["params_m"] = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                           for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    parts = ModelParts(name="x4-random", family=family, unet=unet, vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer_for("openclip"), scheduler_config=scheduler_config("v", family),
                       prediction="v", default_size=(128, 128), source="benchmark",
                       pipeline_config=shipped_pipeline_config(family))
    policy = device_mod.choose(args.device, "auto", unet_params=device_mod.unet_param_count(parts))
    device_mod.place(parts, policy, to_device=policy.is_cpu)  # on a GPU the memory mode places them, as in the engine
    results["policy"] = policy.describe()
    if args.memory != "auto":
        results["memory"] = args.memory
    print(f"built in {results['build_s']} s; {policy.describe()}", flush=True)
    cuda = not policy.is_cpu
    if cuda:  # CUDA's context, kernels and the memory mode's first setup, outside the measured variants
        t0 = time.perf_counter()
        run_brushwork(parts, policy, picture(64), memory=args.memory, **{**DEFAULTS, "steps": 1})
        results["cuda_warmup_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"build_s": results["build_s"], "policy": results["policy"],
                          "cuda_warmup_s": results["cuda_warmup_s"]}), flush=True)

    for side in args.sizes:
        image = picture(side)
        key = f"{side}->{4 * side}"
        res: dict = {}
        full = PLAIN_DEFAULTS["steps"]
        if args.plain_steps:
            plain_img, res["plain"] = run_plain(parts, image, steps=args.plain_steps, device=policy.device)
            res["plain"]["extrapolated_total_s_at_75_steps"] = extrapolate(res["plain"], full)
            print(key, "plain", res["plain"], flush=True)
            if cuda:  # a JSON line each, as measured: what the GPU check keeps when a timeout stops the run
                print(json.dumps({key: {"plain": res["plain"]}}), flush=True)
        else:  # --plain-steps 0: brushwork alone (the plain pipeline at 512 -> 2048 takes hours on a CPU)
            res["plain"] = {"not_run": "--plain-steps 0"}
        ours_img, res["brushwork"] = run_brushwork(parts, policy, image, memory=args.memory,
                                                   **{**DEFAULTS, "steps": args.brushwork_steps})
        res["brushwork"]["steps"] = args.brushwork_steps
        res["brushwork"]["extrapolated_total_s_at_20_steps"] = extrapolate(res["brushwork"], DEFAULTS["steps"])
        print(key, "brushwork", res["brushwork"], flush=True)
        if cuda:
            print(json.dumps({key: {"brushwork": res["brushwork"]}}), flush=True)
        if args.plain_steps:
            res["speedup_vs_plain_defaults"] = round(res["plain"]["extrapolated_total_s_at_75_steps"]
                                                     / res["brushwork"]["extrapolated_total_s_at_20_steps"], 2)
        res["unet_passes"] = {"plain": 2 * full, "brushwork": DEFAULTS["steps"]}
        assert ours_img.size == (4 * side, 4 * side)
        results[key] = res

    # equal settings: the same computation, so the same pixels (fp32) or within rounding (bf16 on the CPU)
    if args.equal_steps:
        results["equal_settings"] = equal_settings(parts, policy, picture(args.equal_size), args.equal_steps,
                                                   args.memory)
    if args.convergence:
        results["convergence"] = convergence(parts, policy, picture(args.convergence), args.memory)
    write_results(results, started, args.out)


def equal_settings(parts, policy, image, n: int, memory: str = "auto") -> dict:
    equal: dict = {"input": f"{image.width}x{image.height}", "steps": n, "sampler": "DDIM", "cfg_scale": 9.0}
    empty_plain, e0 = run_plain(parts, image, steps=n, device=policy.device)
    empty_ours, e1 = run_brushwork(parts, policy, image, memory, prompt="", steps=n, sampler="DDIM", cfg_scale=9.0)
    prompt_plain, p0 = run_plain(parts, image, steps=n, prompt="a photo", device=policy.device)
    prompt_ours, p1 = run_brushwork(parts, policy, image, memory, prompt="a photo", steps=n, sampler="DDIM",
                                    cfg_scale=9.0)
    equal["empty_prompt"] = {"pixel_diff": pixel_diff(empty_ours, empty_plain), "plain_total_s": e0["total_s"],
                             "brushwork_total_s": e1["total_s"],
                             "note": "brushwork runs it without CFG (one UNet pass a step, plain two)"}
    equal["with_prompt"] = {"pixel_diff": pixel_diff(prompt_ours, prompt_plain), "plain_total_s": p0["total_s"],
                            "brushwork_total_s": p1["total_s"]}
    print("equal", equal, flush=True)
    return equal


def convergence(parts, policy, image, memory: str = "auto") -> dict:
    """Mean pixel distance of each sampler's picture from a 150-step DDIM reference (empty prompt, same seed)."""
    ref, r = run_brushwork(parts, policy, image, memory, prompt="", steps=150, sampler="DDIM")
    out = {"reference": "DDIM 150 steps", "input": f"{image.width}x{image.height}", "reference_s": r["total_s"]}
    for sampler, schedule, steps in (("DDIM", "Automatic", 75), ("DDIM", "Automatic", 20),
                                     ("DPM++ 2M", "Karras", 10), ("DPM++ 2M", "Karras", 20),
                                     ("DPM++ 2M", "Karras", 30), ("Euler", "Automatic", 20)):
        img, r = run_brushwork(parts, policy, image, memory, prompt="", steps=steps, sampler=sampler,
                               scheduler=schedule)
        out[f"{sampler} {schedule} {steps}"] = {**pixel_diff(img, ref), "total_s": r["total_s"]}
        print("convergence", sampler, schedule, steps, out[f"{sampler} {schedule} {steps}"], flush=True)
    return out


if __name__ == "__main__":
    main()

"""Steps per second of the full-size SD 1.5 (512) and SD 2.1 (768) UNets on a CUDA GPU, random weights.

    python benchmarks/gpu/unet.py --out $OUT/unet.json                       # eager variants, both models
    python benchmarks/gpu/unet.py --families sd15:512 --variants diffusers_fp16,brushwork \
        --compile default,max-autotune --out $OUT/compile.json                 # + torch.compile, one mode each

One step is one UNet call on a batch of 2 (classifier-free guidance), as in every txt2img step, so steps/s is the
sampler's it/s without the scheduler's (tiny) share. Variants, all in one process and interleaved round by round:

  diffusers_fp16          plain diffusers on a GPU: fp16, eager, its default attention (PyTorch SDPA), NCHW
  diffusers_fp16_no_sdpa  the same with diffusers' classic attention (AttnProcessor: bmm + softmax): what SDPA buys
  brushwork               ``engine.device.choose("cuda", "auto")`` placed by ``engine.device.place``, as the engine
                          runs it (fp16, SDPA, channels_last)
  brushwork_nchw          brushwork's policy without channels_last: what channels_last buys
  brushwork_bf16          ``choose("cuda", "bf16")``
  compiled_<mode>         brushwork's placed UNet under ``torch.compile(mode=<mode>, dynamic=False)``; the first call
                          (compilation) is timed apart as compile_s

``rel_error_vs_fp32`` is |variant - fp32| / |fp32| of the noise prediction for the same input, the fp32 reference
computed on the same GPU with TF32 off. ``peak_vram_gb`` is torch.cuda.max_memory_allocated during one call of that
variant alone, with only its own weights counted (``weights_gb``) plus what the call needs on top (``activations_gb``).
The JSON is rewritten after every measurement, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: step.py (which puts src/ on the path)
from step import interleave, machine, rel_error, sd15_unet, sd21_unet, sd_vae_stub, summary  # noqa: E402

BUILDERS = {"sd15": (sd15_unet, "SD 1.5 UNet"), "sd21": (sd21_unet, "SD 2.1 UNet")}
EAGER = ("diffusers_fp16", "diffusers_fp16_no_sdpa", "brushwork", "brushwork_nchw", "brushwork_bf16")
GiB = 2**30
DEV = "cuda"  # --device cpu only smoke-tests this script where there is no GPU (slow, no memory numbers)


def gpu_info() -> dict:
    import torch

    if DEV == "cpu":
        return {"smoke_test_on_cpu": True}
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / GiB, 1),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "sdpa_backends_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                "math": torch.backends.cuda.math_sdp_enabled()},
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return info


class Results:
    def __init__(self, out: str, args):
        self.path = Path(out)
        self.data = {"benchmark": "gpu_unet_step", "args": vars(args), "machine": machine(), "cuda": gpu_info()}
        self.started = time.time()
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.time() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def fp32_reference(unet, inputs, t):
    """The noise prediction in fp32 on the GPU, TF32 off (the CPU's arithmetic, at the GPU's speed)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = copy.deepcopy(unet).to(DEV)
        with torch.inference_mode():
            out = model(inputs[0].to(DEV), t.to(DEV), encoder_hidden_states=inputs[1].to(DEV), return_dict=False)[0]
        out = out.float().cpu()
        del model
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        empty_cache()


def empty_cache() -> None:
    import torch

    if DEV != "cpu":
        torch.cuda.empty_cache()


def make_variant(name: str, unet, unet_params: int):
    """(model on the GPU, latent dtype, context dtype, description) for one eager variant."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from brushwork.engine import device as device_mod

    if name.startswith("diffusers"):
        model = copy.deepcopy(unet).to(DEV, torch.float16)
        if name.endswith("no_sdpa"):
            model.set_attn_processor(AttnProcessor())
        return model, torch.float16, torch.float16, "fp16 eager, " + ("classic attention" if "no_sdpa" in name
                                                                      else "SDPA") + ", NCHW"
    policy = device_mod.choose(DEV, "bf16" if name.endswith("bf16") else "auto", unet_params=unet_params)
    if name.endswith("nchw"):
        policy = dataclasses.replace(policy, channels_last=False)
    model = copy.deepcopy(unet)
    device_mod.place(SimpleNamespace(unet=model, vae=sd_vae_stub(), text_encoder=sd_vae_stub()), policy)
    return model, policy.latent_dtype, policy.text_dtype, f"{policy.describe()}, channels_last={policy.channels_last}"


def call(model, latents, context, t):
    import torch

    with torch.inference_mode():
        return model(latents, t, encoder_hidden_states=context, return_dict=False)[0]


def peak_of_one_call(fn, weights_bytes: int) -> dict:
    import torch

    if DEV == "cpu":
        return {"weights_gb": round(weights_bytes / GiB, 2)}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return {"weights_gb": round(weights_bytes / GiB, 2), "activations_gb": round(extra / GiB, 2),
            "peak_vram_gb": round((weights_bytes + extra) / GiB, 2)}


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_family(family: str, side: int, variants: list[str], compile_modes: list[str], rounds: int, warmup: int,
                 results: Results) -> None:
    import torch

    build, label = BUILDERS[family]
    key = f"unet_{family}_{side}"
    entry = results.data.setdefault(key, {"what": f"{label}, {side}x{side}, batch 2 (CFG), one step, random weights"})
    t0 = time.perf_counter()
    unet = build()
    params = sum(p.numel() for p in unet.parameters())
    entry["unet_params"] = params
    entry["build_s"] = round(time.perf_counter() - t0, 1)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side // 8, side // 8, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor(500.0)
    reference = fp32_reference(unet, (latents, context), t)
    results.save()

    fns, models = {}, {}
    for name in variants:
        try:
            model, lat_dtype, ctx_dtype, how = make_variant(name, unet, params)
        except Exception as err:  # one variant that cannot be built does not stop the others
            entry[name] = {"error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
            continue
        inputs = (latents.to(DEV, lat_dtype), context.to(DEV, ctx_dtype), t.to(DEV))
        fn = (lambda model=model, inputs=inputs: call(model, *inputs))
        first = fn().float().cpu()
        entry[name] = {"how": how, "rel_error_vs_fp32": rel_error(first, reference),
                       **peak_of_one_call(fn, weights_bytes(model))}
        fns[name], models[name] = fn, model
        results.save()
    del unet
    if fns:
        times = interleave(fns, rounds, DEV, warmup=warmup)
        base = "diffusers_fp16" if "diffusers_fp16" in fns else next(iter(fns))
        for name, stats in summary(times, base=base).items():
            if name in entry and isinstance(stats, dict):
                stats["steps_per_s"] = round(1 / stats["median_s"], 2)
                entry[name].update(stats)
        results.save()
        print(json.dumps({key: entry}), flush=True)

    for mode in compile_modes:
        name = f"compiled_{mode}"
        if "brushwork" not in models:
            entry[name] = {"error": "needs the brushwork variant"}
            break
        entry[name] = {"status": "compiling (a JSON left like this means the part's timeout stopped it)"}
        results.save()
        try:
            torch._dynamo.reset()
            model = copy.deepcopy(models["brushwork"])
            model.compile(mode=None if mode == "default" else mode, dynamic=False)
            placed = next(models["brushwork"].parameters()).dtype
            inputs = (latents.to(DEV, placed), context.to(DEV, placed), t.to(DEV))
            fn = (lambda model=model, inputs=inputs: call(model, *inputs))
            c0 = time.perf_counter()
            first = fn().float().cpu()
            if DEV != "cpu":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - c0
            pair = {"diffusers_fp16": fns["diffusers_fp16"], name: fn} if "diffusers_fp16" in fns else {name: fn}
            stats = summary(interleave(pair, rounds, DEV, warmup=warmup), base=next(iter(pair)))
            entry[name] = {"how": f"brushwork's placed UNet, torch.compile(mode={mode!r}, dynamic=False)",
                           "compile_s": round(compile_s, 1), "rel_error_vs_fp32": rel_error(first, reference),
                           **stats[name], "steps_per_s": round(1 / stats[name]["median_s"], 2)}
            if "diffusers_fp16" in stats:
                entry[name]["diffusers_fp16_same_rounds_median_s"] = stats["diffusers_fp16"]["median_s"]
            if "brushwork" in entry and "median_s" in entry["brushwork"]:
                entry[name]["speedup_vs_brushwork_eager"] = round(
                    entry["brushwork"]["median_s"] / stats[name]["median_s"], 2)
        except Exception as err:
            entry[name] = {"error": f"{type(err).__name__}: {str(err)[:2000]}"}
            traceback.print_exc()
        results.save()
        print(json.dumps({key: {name: entry[name]}}), flush=True)
        empty_cache()
    del fns, models
    empty_cache()


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15:512,sd21:768", help="model:side, comma-separated")
    parser.add_argument("--variants", default=",".join(EAGER), help=f"eager variants, of: {', '.join(EAGER)}")
    parser.add_argument("--compile", default="", help="torch.compile modes to add (default, max-autotune, "
                                                      "max-autotune-no-cudagraphs, reduce-overhead), comma-separated")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: only a smoke test of this script (e.g. --families sd15:64 --rounds 1)")
    args = parser.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "gpu_unet_step", "skipped": "no CUDA device"}) + "\n")
        print("no CUDA device: nothing to measure")
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(EAGER))
    if unknown:
        parser.error(f"unknown variants {unknown}")
    compile_modes = [m for m in args.compile.split(",") if m]
    results = Results(args.out, args)
    failed = False
    for spec in args.families.split(","):
        family, side = spec.split(":")
        try:
            bench_family(family, int(side), variants, compile_modes, args.rounds, args.warmup, results)
        except Exception as err:  # the next model still runs
            failed = True
            results.data.setdefault(f"unet_{family}_{side}", {})["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        results.save()
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

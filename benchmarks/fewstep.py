"""A picture in one step on the CPU: SD-Turbo, SDXL-Turbo and SDXL base (random weights), brushwork vs plain diffusers.

    .venv/bin/python benchmarks/fewstep.py --only sd-turbo                  # SD-Turbo 512, full VAE and TAESD
    .venv/bin/python benchmarks/fewstep.py                                  # + SDXL-Turbo 512, SDXL base 1024 (~16 GB)
    .venv/bin/python benchmarks/fewstep.py --arch tiny --size 64 --out /tmp/fewstep.json   # a check of this script

The architectures are the real ones, with random weights (speed and memory do not depend on the weights' values):

- ``sd-turbo``: SD 2.1's UNet (320/640/1280/1280, heads of 64 channels, linear projections, context 1024), OpenCLIP-H's
  text tower (the 23 layers SD 2.x reads), SD's VAE; 512x512, 1 step, no CFG (one UNet pass), Euler a on trailing
  timesteps. Decoded by the full VAE and by TAESD (diffusers' ``AutoencoderTiny`` with its default config, which is
  taesd's architecture).
- ``sdxl-turbo``: SDXL base (the UNet config brushwork ships, CLIP-L + OpenCLIP bigG, SDXL's VAE) at 512x512, the same
  one-step settings; full VAE and TAESDXL (the same architecture as TAESD).
- ``sdxl``: SDXL base at 1024x1024, one Euler step with CFG 5 (two UNet passes): for scale; full VAE.

Each picture is timed end to end (text encoding + UNet + decode), in one process, over the same module objects
(an SDXL UNet is 10 GB in fp32: two copies would not fit):

- ``plain``: diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` built on those modules and called
  as the SD-Turbo / SDXL-Turbo model cards call it: ``pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`` with
  Euler a on trailing timesteps (the Turbo folders' scheduler), ``pipe.vae = AutoencoderTiny`` for TAESD (diffusers'
  documented way). SDXL base: its own Euler scheduler config, ``guidance_scale=5.0`` (diffusers' default).
- ``brushwork``: ``engine.run.model_defaults`` + ``engine.run.generate`` on ``ModelParts`` holding the same modules,
  placed by ``engine.device.choose("cpu", "auto", ...)`` / ``place`` (what ``Engine.generate`` does after loading).
  Turbo: the request says ``turbo=True`` and leaves steps, CFG, sampler and schedule to the model's few-step defaults
  (``models/fewstep.py``: 1 step, CFG 1, Euler a, SGM Uniform = trailing) where this tree has them; otherwise they
  are set explicitly (the JSON says which). TAESD: ``--vae taesd``, read from a temporary library's ``vae-approx/``
  (a random decoder saved in the original ``taesd_decoder.pth`` layout), as ``Engine`` loads it.

The watermark is off on both sides (brushwork's and diffusers' SDXL invisible-watermark), so the pixels compare.
Every variant runs ``1 + --rounds`` times per side, the sides alternating which goes first; the first run is reported
apart from the warm ones. Per run: wall seconds, the seconds inside each module (forward hooks on the text
encoders, the UNet and the VAE's decoder, counted calls), peak RSS (sampled every 20 ms: the whole process, every
loaded weight included) and the RSS before the run. ``pixel_diff`` is brushwork's picture against plain diffusers' at
the same settings and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import clip_l, machine, openclip_h, sd_vae, sgemm_gflops, write_results  # noqa: E402
from upscale import PeakRSS, pixel_diff  # noqa: E402

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
SEED = 0
GOAL = {"what": "SD-Turbo, 1 step, 512x512, TAESD decode, end to end, fp32, on these 2 cores (brushwork, warm)",
        "target_s": 8.0, "arithmetic_limit_s": 6.0,
        "why": "issue 14: UNet 0.80 TFLOP + TAESD 0.14 + text encoder 0.05 at ~166 GFLOP/s"}

UNET_GFLOP = 804.3  # one SD 2.1 UNet pass at 512, batch 1 (benchmarks/ov_profile.py's count)
# name -> (family, native side, decoders, one-step settings)
MODELS = {
    "sd-turbo": {"family": "sd2", "side": 512, "decoders": ("vae", "taesd"), "turbo": True},
    "sdxl-turbo": {"family": "sdxl", "side": 512, "decoders": ("vae", "taesdxl"), "turbo": True},
    "sdxl": {"family": "sdxl", "side": 1024, "decoders": ("vae",), "turbo": False, "cfg_scale": 5.0},
}


# ---- the models ---------------------------------------------------------------------------------------------------


def sd21_unet():
    """SD 2.1 (and SD-Turbo)'s UNet at 512: diffusers' defaults (320/640/1280/1280) with SD 2's heads and context."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True).eval()


def sdxl_text_encoders():
    """SDXL's CLIP-L (12 layers of 768) and OpenCLIP bigG (32 layers of 1280, projection 1280), as its folders' configs."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    big_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)).eval()
    return clip_l(), big_g


def tiny_autoencoder(arch: str, seed: int):
    """TAESD's architecture (``AutoencoderTiny()``'s defaults: 64 channels, blocks (1,3,3,3) / (3,3,3,1), 8x up);
    ``tiny``: 2 stages of 16 channels (2x up, as the tests' tiny VAEs)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if arch == "full":
        return AutoencoderTiny().eval()
    return AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(3, 1)).eval()


def build(name: str, arch: str):
    """ModelParts of random full-size (or tiny) weights for this model, and the tiny decoder for it."""
    import torch

    from brushwork.models.families import FAMILY_BY_NAME, shipped_config
    from brushwork.models.load import ModelParts, scheduler_config
    from brushwork.models.tokenizers import tokenizer_for

    spec = MODELS[name]
    family = FAMILY_BY_NAME[spec["family"]]
    torch.manual_seed(0)
    text_encoder_2 = tokenizer_2 = None
    if arch == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodels import build_components, build_xl_components

        if family.xl:
            unet, vae, text_encoder, text_encoder_2 = build_xl_components()
        else:
            unet, vae, text_encoder = build_components("sd2")
    elif family.xl:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(shipped_config(family, "unet")).eval()
        vae = AutoencoderKL.from_config(shipped_config(family, "vae")).eval()
        text_encoder, text_encoder_2 = sdxl_text_encoders()
    else:
        unet, vae, text_encoder = sd21_unet(), sd_vae(), openclip_h()
    if family.xl:
        tokenizer, tokenizer_2 = tokenizer_for("clip"), tokenizer_for("openclip")
    else:
        tokenizer = tokenizer_for("openclip")
    parts = ModelParts(name=f"{name}-random", family=family, unet=unet, vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, scheduler_config=scheduler_config("eps", family), prediction="eps",
                       default_size=(spec["side"],) * 2, source="benchmark", text_encoder_2=text_encoder_2,
                       tokenizer_2=tokenizer_2)
    return parts, tiny_autoencoder(arch, seed=1)


def save_original_decoder(model, path: Path) -> Path:
    """``model``'s decoder as madebyollin's ``taesd_decoder.pth`` holds it: diffusers' ``decoder.layers.I.*`` is the
    original ``(I + 1).*`` (the original's layer 0 is a weightless clamp)."""
    import torch

    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            state[f"{int(index) + 1}.{rest}"] = value.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def params_m(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


# ---- per-module time ----------------------------------------------------------------------------------------------


class ModuleClock:
    """Seconds spent inside each watched module's forward (and how many calls), while ``active``."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.seconds = {name: 0.0 for name in modules}
        self.calls = {name: 0 for name in modules}
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self.watch(name, module)

    def watch(self, name: str, module) -> None:
        """Count ``module``'s forward under ``name`` (another module of that name too: one runs at a time)."""
        self.seconds.setdefault(name, 0.0)
        self.calls.setdefault(name, 0)
        self.modules.setdefault(name, module)
        self._handles.append(module.register_forward_pre_hook(self._pre(name)))
        self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self._start.pop(name)
            self.calls[name] += 1
        return hook

    def reset(self):
        self.seconds = {name: 0.0 for name in self.modules}
        self.calls = {name: 0 for name in self.modules}

    def report(self) -> dict:
        return {name: {"s": round(self.seconds[name], 2), "calls": self.calls[name]}
                for name in self.modules if self.calls[name]}

    def remove(self):
        for handle in self._handles:
            handle.remove()


# ---- the two sides ------------------------------------------------------------------------------------------------


def fewstep_defaults_available() -> bool:
    """Whether this tree has the few-step model defaults (``GenerationRequest.turbo`` and ``models/fewstep.py``)."""
    from brushwork.request import GenerationRequest

    try:
        from brushwork.models import fewstep
    except ImportError:
        return False
    return "turbo" in {f.name for f in dataclasses.fields(GenerationRequest)} and "turbo" in fewstep.PROFILES


def brushwork_fields(name: str, side: int, use_defaults: bool) -> dict:
    spec = MODELS[name]
    fields = {"prompt": PROMPT, "negative_prompt": "", "seed": SEED, "width": side, "height": side,
              "watermark": False}
    if spec["turbo"] and use_defaults:
        return {**fields, "turbo": True}  # steps, CFG, sampler, schedule: the Turbo model's defaults
    if spec["turbo"]:
        return {**fields, "steps": 1, "cfg_scale": 1.0, "sampler": "Euler a", "scheduler": "SGM Uniform"}
    return {**fields, "steps": 1, "cfg_scale": spec["cfg_scale"], "sampler": "Euler", "scheduler": "Automatic",
            **({"turbo": False} if use_defaults else {})}


def brushwork_request(name: str, side: int, use_defaults: bool, parts, decoder: str):
    from brushwork.engine.run import model_defaults
    from brushwork.request import GenerationRequest

    fields = brushwork_fields(name, side, use_defaults)
    request = GenerationRequest(**fields, vae=None if decoder == "vae" else decoder).validate()
    return model_defaults(request, parts)


def plain_pipeline(parts, vae, name: str):
    """diffusers' own pipeline over the same modules, with the scheduler the model's diffusers folder has."""
    import diffusers

    if MODELS[name]["turbo"]:  # stabilityai/sd-turbo, sdxl-turbo: Euler (a) on trailing timesteps
        scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(parts.scheduler_config,
                                                                          timestep_spacing="trailing")
    else:
        scheduler = diffusers.EulerDiscreteScheduler.from_config(parts.scheduler_config)
    if parts.family.xl:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_for(name: str, decoder: str, round_: int) -> str:
    """Each run's prompt (the same for both sides of a round): a new one for every model, decoder and round, so no
    run reads another's encoding (brushwork keeps a model's last encodings, as A1111 does; ``same_prompt_again``
    measures that apart). No brackets: A1111's emphasis would weight them, plain diffusers would not."""
    return f"{PROMPT}, {name} {decoder} take {round_}"


def run_plain(pipe, name: str, side: int, clock: ModuleClock, prompt: str = PROMPT):
    import torch

    spec = MODELS[name]
    guidance = 0.0 if spec["turbo"] else spec["cfg_scale"]
    for vae in (pipe.vae,):  # brushwork's memory modes may have switched diffusers' tiling on: plain is plain
        if hasattr(vae, "disable_tiling"):
            vae.disable_tiling()
            vae.disable_slicing()
    clock.reset()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        before = rss.peak
        image = pipe(prompt, num_inference_steps=1, guidance_scale=guidance, height=side, width=side,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    seconds = time.perf_counter() - t0
    return image, {"total_s": round(seconds, 2), "modules": clock.report(), "peak_rss_mb": rss.mb,
                   "rss_before_mb": round(before / 2**20, 1)}


def run_brushwork(parts, policy, request, clock: ModuleClock, settings):
    from brushwork.engine.run import generate

    clock.reset()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        before = rss.peak
        result = generate(parts, policy, request, model_name=parts.name, model_hash=None, memory_mode="auto",
                          settings=settings)
    seconds = time.perf_counter() - t0
    return result.images[0], {"total_s": round(seconds, 2), "modules": clock.report(), "timings": result.timings,
                              "peak_rss_mb": rss.mb, "rss_before_mb": round(before / 2**20, 1)}


# fp32 weights of each full-size model and what a run adds at most (measured: SD-Turbo 6.6 GB in all), in GB
NEEDS_GB = {"sd2": 5.2 + 1.5, "sdxl": 13.7 + 3.5}


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


_BUILT: dict = {}  # family -> (parts, tiny): SDXL-Turbo and SDXL base are the same architecture, built once


def built(name: str, arch: str):
    family = MODELS[name]["family"]
    if family not in _BUILT:
        _BUILT.clear()  # the previous family's weights go before the next one's are made
        gc.collect()
        t0 = time.perf_counter()
        _BUILT[family] = (*build(name, arch), round(time.perf_counter() - t0, 1))
    parts, tiny, seconds = _BUILT[family]
    parts.name, parts.default_size, parts.tiny_vae = f"{name}-random", (MODELS[name]["side"],) * 2, None
    return parts, tiny, seconds


def bench_model(name: str, args, use_defaults: bool, settings, store) -> dict:
    from brushwork.engine import device as device_mod
    from brushwork.models import taesd

    spec = MODELS[name]
    side = args.size or spec["side"]
    need, free = NEEDS_GB[spec["family"]], mem_available_gb()
    if args.arch == "full" and spec["family"] not in _BUILT and free < need and not args.force:
        print(f"{name}: skipped, {free:.1f} GB available and it needs ~{need} GB (--force runs it anyway)", flush=True)
        return {"skipped": f"{free:.1f} GB of memory available, ~{need} GB needed; run it when the machine is free"}
    shared = spec["family"] in _BUILT
    parts, tiny, build_s = built(name, args.arch)
    out: dict = {"family": parts.family.name, "arch": args.arch, "size": f"{side}x{side}",
                 "mem_available_gb_at_start": round(free, 1), "build_s": build_s,
                 **({"build_shared": "the same modules as the previous model's"} if shared else {}),
                 "params_m": {k: params_m(m) for k, m in {**parts.modules, "taesd": tiny.decoder}.items()}}
    from brushwork.engine import backends

    policy = device_mod.choose("cpu", "auto", unet_params=device_mod.unet_param_count(parts), backend=args.backend)
    device_mod.place(parts, policy)
    parts.backend = backends.for_model(policy, settings)  # OpenVINO: converted in the first run, cached
    out["policy"], out["policy_why"] = policy.describe(), policy.why
    # brushwork's TAESD: the original .pth layout in the library's vae-approx/, loaded as Engine loads --vae taesd
    tiny_name = taesd.name_for(parts.family.name)
    save_original_decoder(tiny, store.root / "vae-approx" / f"{tiny_name}_decoder.pth")
    print(f"{name}: {'reused' if shared else 'built in ' + str(build_s) + ' s'}, {out['params_m']}; {policy.describe()}", flush=True)

    watched = {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2, "unet": parts.unet,
               "vae_decoder": parts.vae.decoder, "taesd_decoder": tiny.decoder}
    clock = ModuleClock({k: m for k, m in watched.items() if m is not None})
    for decoder in spec["decoders"]:
        if args.decoder and ("vae" if decoder == "vae" else "tiny") not in args.decoder:
            continue
        if decoder == "vae":
            parts.tiny_vae = None
        else:
            parts.tiny_vae = taesd.for_model(taesd.requested(decoder, store), parts)
            parts.tiny_vae.to(policy.device, policy.vae_dtype)
            clock.watch("taesd_decoder", parts.tiny_vae.decoder)  # brushwork's own copy, read from the .pth
        request, notes = brushwork_request(name, side, use_defaults, parts, decoder)
        plain = plain_pipeline(parts, parts.vae if decoder == "vae" else tiny, name)
        runs: dict = {"plain": [], "brushwork": []}
        images: dict = {"plain": [], "brushwork": []}
        loads = []
        for r in range(1 + args.rounds):
            order = ("plain", "brushwork") if r % 2 == 0 else ("brushwork", "plain")
            for side_name in order:
                if args.side_only and side_name != args.side_only:
                    continue
                if side_name == "plain":
                    image, record = run_plain(plain, name, side, clock, prompt_for(name, decoder, r))
                else:
                    image, record = run_brushwork(parts, policy, dataclasses.replace(request, prompt=prompt_for(name, decoder, r)),
                                                  clock, settings)
                record["round"] = r
                record["load_average_1min_after"] = round(os.getloadavg()[0], 2)
                runs[side_name].append(record)
                images[side_name].append(image)
                print(f"{name} {decoder} round {r} {side_name}: {record['total_s']} s, peak RSS {record['peak_rss_mb']}"
                      f" MB, {record['modules']}", flush=True)
            loads.append(round(os.getloadavg()[0], 2))
        again = None
        if runs["brushwork"]:  # the last round's prompt once more: its encoding is read from the model's cache
            last = len(runs["brushwork"]) - 1
            again_image, again = run_brushwork(parts, policy, dataclasses.replace(
                request, prompt=prompt_for(name, decoder, runs["brushwork"][-1]["round"])), clock, settings)
            print(f"{name} {decoder} same prompt again brushwork: {again['total_s']} s, {again['modules']}",
                  flush=True)
        entry: dict = {
            "settings": {"brushwork": {k: getattr(request, k) for k in ("steps", "cfg_scale", "sampler", "scheduler",
                                                                        "width", "height", "vae")},
                         "plain": {"num_inference_steps": 1,
                                   "guidance_scale": 0.0 if spec["turbo"] else spec["cfg_scale"],
                                   "scheduler": type(plain.scheduler).__name__,
                                   "timestep_spacing": plain.scheduler.config.timestep_spacing,
                                   "vae": type(plain.vae).__name__}},
            "brushwork_notes": notes,
            "load_average_1min_per_round": loads,
        }
        for side_name in ("plain", "brushwork"):
            if not runs[side_name]:
                entry[side_name] = {"skipped": f"--side-only {args.side_only}"}
                continue
            first, warm = runs[side_name][0], runs[side_name][1:]
            entry[side_name] = {"first_s": first["total_s"],
                                "warm_s": round(statistics.median(w["total_s"] for w in warm), 2) if warm else None,
                                "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[side_name]), "runs": runs[side_name]}
        both = bool(runs["plain"] and runs["brushwork"])
        if both and entry["brushwork"]["warm_s"]:
            entry["brushwork"]["speedup_vs_plain_warm"] = round(entry["plain"]["warm_s"] / entry["brushwork"]["warm_s"],
                                                                2)
        if both:
            entry["pixel_diff_brushwork_vs_plain"] = pixel_diff(images["brushwork"][-1], images["plain"][-1])
        if again is not None:
            entry["brushwork"]["same_prompt_again"] = again
            entry["pixel_diff_brushwork_same_prompt_again"] = pixel_diff(images["brushwork"][last], again_image)
        out[decoder] = entry
        if args.save_images:
            for side_name in (n for n in ("plain", "brushwork") if images[n]):
                images[side_name][-1].save(Path(args.save_images) / f"{name}-{decoder}-{side_name}.png")
        del plain
    clock.remove()
    parts.tiny_vae = None
    gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append",
                    help="this model only (repeatable); default: all three, SDXL last")
    ap.add_argument("--rounds", type=int, default=1, help="warm runs per side after the first (default 1)")
    ap.add_argument("--size", type=int, default=0, help="picture side instead of each model's (512, 512, 1024)")
    ap.add_argument("--arch", choices=["full", "tiny"], default="full",
                    help="tiny: the tests' tiny models (a check of this script, not a measurement)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: what Engine picks)")
    ap.add_argument("--decoder", choices=["vae", "tiny"], action="append",
                    help="only this final decoder (repeatable): the full VAE or the model's TAESD [both]")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                    help="brushwork's CPU backend (engine/backends.py) [auto: what the engine picks here]")
    ap.add_argument("--side-only", choices=["brushwork", "plain"], default=None,
                    help="run one side only: its peak RSS is then its own (the sides share the modules)")
    ap.add_argument("--force", action="store_true", help="run a model even when free memory looks too small")
    ap.add_argument("--save-images", default="", help="a folder for the last pictures of each variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fewstep.json"))
    args = ap.parse_args(argv)

    import torch

    from brushwork.engine import device as device_mod
    from brushwork.models.store import ModelStore
    from brushwork.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    elif (threads := device_mod.cpu_threads(torch.get_num_threads())) < torch.get_num_threads():
        torch.set_num_threads(threads)  # as Engine.load does
    if args.save_images:
        Path(args.save_images).mkdir(parents=True, exist_ok=True)
    started = time.time()
    use_defaults = fewstep_defaults_available()
    names = args.only or list(MODELS)
    results: dict = {
        "benchmark": "fewstep", "machine": machine(), "sgemm_gflops_at_start": sgemm_gflops(),
        "command": " ".join(sys.argv), "prompt": PROMPT, "prompts": "per run: PROMPT + ', <model> <decoder> take <r>'",
        "seed": SEED,
        "rounds": {"first": 1, "warm": args.rounds}, "arch": args.arch,
        "turbo_settings": ("the model's few-step defaults: request turbo=True (models/fewstep.py)" if use_defaults
                           else "explicit: steps 1, CFG 1, Euler a, SGM Uniform (no turbo defaults in this tree)"),
        "watermark": "off on both sides",
        "goal": dict(GOAL),
    }
    if args.arch == "tiny" or args.size:
        results["note"] = "a check of the script (tiny models or another size), not the measurement"
    with tempfile.TemporaryDirectory(prefix="fewstep-") as home:
        settings = Settings(home=Path(home))
        store = ModelStore(settings)
        for name in names:
            results[name] = bench_model(name, args, use_defaults, settings, store)
            write_results(results, started, args.out)  # what there is so far, in case a later model runs out of RAM
    taesd = results.get("sd-turbo", {}).get("taesd")
    if taesd and args.arch == "full" and not args.size and "first_s" in taesd["brushwork"]:
        best = taesd["brushwork"]["warm_s"] or taesd["brushwork"]["first_s"]
        plain = taesd["plain"].get("warm_s") or taesd["plain"].get("first_s")
        results["goal"].update(brushwork_s=best, plain_s=plain, met=best <= GOAL["target_s"],
                               load_average_1min=taesd["load_average_1min_per_round"])
        warm = taesd["brushwork"]["runs"][1:] or taesd["brushwork"]["runs"]
        unet_s = statistics.median(r["modules"]["unet"]["s"] for r in warm)
        results["sgemm_gflops_at_end"] = sgemm_gflops()
        ceiling = (results["sgemm_gflops_at_start"]["median"] + results["sgemm_gflops_at_end"]["median"]) / 2
        # the UNet pass's rate (ov_profile.py counted 804 GFLOP in one SD 2.1 pass at 512) against what the cores
        # did in plain matrix products in the same run: how far the pass is from this machine's fp32 ceiling
        results["goal"].update(unet_pass_s=round(unet_s, 2), unet_pass_gflops=round(UNET_GFLOP / unet_s, 1),
                               unet_share_of_sgemm=round(UNET_GFLOP / unet_s / ceiling, 2))
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where OpenVINO's time goes in one UNet pass: per kind of kernel, with each kind's share of the fp32 limit.

    .venv/bin/python benchmarks/ov_profile.py                  # SD 2.1 (SD-Turbo) UNet, 512x512, batch 1
    .venv/bin/python benchmarks/ov_profile.py --unet sd15 --batch 2    # SD 1.5, one CFG step

The full-size architecture with random weights (speed does not depend on the weights' values), converted with
``ov.convert_model`` and compiled as ``engine.backends`` compiles it (fp32, latency hint), then run with
OpenVINO's ``PERF_COUNT``: the seconds of each (layer type, kernel) pair, summed over one pass. The FLOPs of the
three kinds that do the work are counted from the modules (convolutions, linear layers, attention's two
products), so each kind's GFLOP/s can be set against the CPU's fp32 limit (``--peak-gflops``: 2 AVX2 FMA units x
8 lanes x 2 x GHz x cores; 166 for the 2-core 2.6 GHz machine the speed issue measures on). What this says: how
close a kind already runs to the limit, so how much any setting of it could still win.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import add_unet_pass_options, machine, unet_pass, write_results  # noqa: E402


def flops(unet, x, t, context) -> dict[str, float]:
    """FLOPs of one pass by kind: conv, linear, attention (QK^T and AV), counted with forward hooks."""
    import torch
    from diffusers.models.attention_processor import Attention

    counts: dict[str, float] = collections.defaultdict(float)

    def conv(module, args, out):
        k = module.kernel_size[0] * module.kernel_size[1]
        counts["conv"] += 2.0 * out.numel() * module.in_channels // module.groups * k

    def linear(module, args, out):
        counts["linear"] += 2.0 * out.numel() * module.in_features

    def attention(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        q_tokens = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        kv_tokens = context.shape[1] if context is not None else q_tokens
        counts["attention"] += 2 * 2.0 * hidden.shape[0] * q_tokens * kv_tokens * module.inner_dim

    hooks = []
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        if isinstance(module, Attention):
            hooks.append(module.register_forward_hook(attention, with_kwargs=True))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=context, return_dict=False)
    for hook in hooks:
        hook.remove()
    return dict(counts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_unet_pass_options(parser, rounds=2)
    parser.add_argument("--peak-gflops", type=float, default=166.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ov_profile.json"))
    args = parser.parse_args(argv)
    import openvino as ov
    import torch

    started = time.time()
    unet, wrapped, (x, t, context) = unet_pass(args)
    work = flops(unet, x, t, context)

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(wrapped, example_input=(x, t, context))
    convert_s = time.perf_counter() - t0
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                      "PERF_COUNT": True})
    request = compiled.create_infer_request()
    feeds = [x.numpy(), t.numpy(), context.numpy()]
    request.infer(feeds)  # the first pass: memory set up
    passes = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        request.infer(feeds)
        passes.append(round(time.perf_counter() - t0, 2))
    kernels: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])
    for info in request.get_profiling_info():
        entry = kernels[(info.node_type, info.exec_type)]
        entry[0] += info.real_time.total_seconds()
        entry[1] += 1
    total = sum(v[0] for v in kernels.values())
    # which of OpenVINO's layer types do which kind of work (attention is fused into a "Subgraph" on the CPU)
    kinds = {"conv": ("Convolution",), "linear": ("FullyConnected",), "attention": ("Subgraph",
                                                                                   "ScaledDotProductAttention")}
    by_kind = {}
    for kind, types in kinds.items():
        seconds = sum(v[0] for (layer, _), v in kernels.items() if layer in types)
        gflop = work.get(kind, 0.0) / 1e9
        by_kind[kind] = {"gflop": round(gflop, 1), "s": round(seconds, 3),
                         "gflops": round(gflop / seconds, 1) if seconds else None,
                         "share_of_peak": round(gflop / seconds / args.peak_gflops, 2) if seconds else None}
    results = {"benchmark": "ov_profile", "machine": machine(), "command": " ".join(["benchmarks/ov_profile.py",
                                                                                     *(argv or sys.argv[1:])]),
               "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "openvino": ov.__version__,
               "unet": args.unet, "side": args.side, "batch": args.batch, "convert_s": round(convert_s, 1),
               "pass_s": passes, "profiled_s": round(total, 3), "peak_gflops_assumed": args.peak_gflops,
               "total_gflop": round(sum(work.values()) / 1e9, 1), "by_kind": by_kind,
               "kernels": [{"layer": layer, "kernel": kernel, "s": round(v[0], 3), "share": round(v[0] / total, 3),
                            "count": v[1]}
                           for (layer, kernel), v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]]}
    for kind, row in by_kind.items():
        print(f"{kind:10s} {row['gflop']:7.1f} GFLOP in {row['s']:6.3f} s: {row['gflops']} GFLOP/s "
              f"({row['share_of_peak']} of the limit)")
    print("passes", passes)
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One UNet pass on the CPU by each candidate backend, in one process: torch eager, OpenVINO, ONNX Runtime.

    .venv/bin/pip install onnxruntime onnx      # not a dependency: only this comparison needs them
    .venv/bin/python benchmarks/cpu_backends.py                  # SD 2.1 (SD-Turbo) UNet, 512x512, batch 1
    .venv/bin/python benchmarks/cpu_backends.py --unet sd15 --batch 2   # SD 1.5, one CFG step

The full-size architecture with random weights. OpenVINO as ``engine.backends`` runs it (``ov.convert_model``,
fp32, latency hint); ONNX Runtime on the model exported by ``torch.onnx.export`` (opset 17), its CPU execution
provider with every graph optimisation, the machine's cores as threads, and no spinning after a pass (its default
spin would slow the next backend's pass in the same process). The passes alternate between the
backends round by round, so a busy machine slows all of them alike. Each output is compared with torch's
(relative difference). The one-off costs are reported apart: conversion or export, and compilation or session
creation. torch.compile is ``benchmarks/step.py --compile``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import add_unet_pass_options, machine, unet_pass, write_results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_unet_pass_options(parser, rounds=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_backends.json"))
    args = parser.parse_args(argv)
    import torch

    started = time.time()
    _, wrapped, (x, t, context) = unet_pass(args)
    setup: dict[str, dict] = {}
    runs: dict = {}

    def torch_pass():
        with torch.inference_mode():
            return wrapped(x, t, context)

    runs["torch"] = torch_pass
    reference = torch_pass()
    feeds = [x.numpy(), t.numpy(), context.numpy()]

    import openvino as ov

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(wrapped, example_input=(x, t, context))
    t1 = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    setup["openvino"] = {"version": ov.__version__, "convert_s": round(t1 - t0, 1),
                         "compile_s": round(time.perf_counter() - t1, 1)}
    runs["openvino"] = lambda: torch.from_numpy(compiled(feeds)[0])
    del model

    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
        setup["onnxruntime"] = {"skipped": "pip install onnxruntime onnx"}
    if ort is not None:
        folder = Path(tempfile.mkdtemp(prefix="brushwork-onnx-"))
        t0 = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(wrapped, (x, t, context), str(folder / "unet.onnx"), dynamo=False, opset_version=17,
                              input_names=["sample", "timestep", "context"], output_names=["out"])
        t1 = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # its threads spin after a pass by default, and would slow the next backend's pass in this process
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(folder / "unet.onnx"), options, providers=["CPUExecutionProvider"])
        setup["onnxruntime"] = {"version": ort.__version__, "export_s": round(t1 - t0, 1),
                                "session_s": round(time.perf_counter() - t1, 1)}
        named = {"sample": feeds[0], "timestep": feeds[1], "context": feeds[2]}
        runs["onnxruntime"] = lambda: torch.from_numpy(session.run(None, named)[0])

    rel = {}
    for name, run in runs.items():  # the first pass of each: memory set up, and the output compared
        out = run()
        rel[name] = float((out.float() - reference).norm() / reference.norm())
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(round(time.perf_counter() - t0, 2))
        loads.append(round(os.getloadavg()[0], 2))
    if ort is not None:
        del session
        shutil.rmtree(folder, ignore_errors=True)  # the exported model: as large as the weights
    base = statistics.median(times["torch"])
    results = {"benchmark": "cpu_backends", "machine": machine(),
               "command": " ".join(["benchmarks/cpu_backends.py", *(argv if argv is not None else sys.argv[1:])]),
               "what": f"{args.unet} UNet, {args.side}x{args.side}, batch {args.batch}, one pass, fp32",
               "load_average_1min_per_round": loads, "setup": setup,
               "backends": {name: {"runs_s": v, "median_s": statistics.median(v),
                                   "speedup_vs_torch": round(base / statistics.median(v), 2),
                                   "rel_error_vs_torch": rel[name]} for name, v in times.items()}}
    for name, row in results["backends"].items():
        print(f"{name:12s} {row['median_s']:6.2f} s  ({row['speedup_vs_torch']}x torch)  runs {row['runs_s']}")
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

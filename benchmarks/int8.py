"""Does int8 pay on this CPU? The full-size SD 1.5 UNet on OpenVINO, fp32 against NNCF's post-training int8
quantization (weights and activations, calibrated), one CFG step at 512, and the int8 output's relative difference.

    .venv/bin/pip install nncf            # not a dependency of brushwork: only this measurement needs it
    .venv/bin/python benchmarks/int8.py --out benchmarks/results/int8.json

The fp32 IR is brushwork's own conversion (``engine.backends``) of the seeded random UNet of ``step.py``, taken from
the OpenVINO cache when ``step.py --backend openvino`` has made it, else converted here. Calibration: a few UNet
inputs at timesteps across the schedule (random latents and text embeddings: the weights are random too, so the
relative difference says how much int8 moves this network's output, not how a trained model's pictures look).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import ROOT, machine, sd15_unet, write_results  # noqa: E402


def fp32_ir(shapes: dict):
    """brushwork's OpenVINO IR of step.py's UNet (converted once, then read from the cache)."""
    import torch

    from brushwork import Settings
    from brushwork.engine.backends import OpenVinoModel

    unet = sd15_unet()
    settings = Settings.load()
    accel = OpenVinoModel(Path(settings.cache_dir) / "openvino", threads=settings.threads)
    started = time.perf_counter()
    with torch.inference_mode(), accel.unet(unet):  # one call converts (or reads) and compiles
        unet(torch.zeros(shapes["sample"]), torch.tensor(500.0), torch.zeros(shapes["encoder_hidden_states"]))
    return accel._ir["unet"], dict(accel.stats), round(time.perf_counter() - started, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, default=5, help="calibration samples (timesteps across 999..50)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.json"))
    args = ap.parse_args(argv)
    try:
        import nncf
        import numpy as np
        import openvino as ov
    except ImportError as error:
        print(f"needs OpenVINO and NNCF: .venv/bin/pip install 'brushwork[openvino]' nncf ({error})")
        return 1

    started = time.time()
    shapes = {"sample": [2, 4, 64, 64], "timestep": [2], "encoder_hidden_states": [2, 77, 768]}
    results: dict = {"benchmark": "int8", "machine": machine(), "nncf": nncf.__version__, "openvino": ov.__version__,
                     "what": "SD 1.5 UNet, 512x512, batch 2 (CFG), one step, OpenVINO CPU"}
    model, stats, first_s = fp32_ir(shapes)
    results["fp32_ir"] = {"stats": stats, "first_call_s": first_s}
    model = model.clone()
    model.reshape({k: ov.PartialShape(v) for k, v in shapes.items()})
    rng = np.random.default_rng(0)

    def inputs(t):
        return {"sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
                "timestep": np.full([2], t, np.float32),
                "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32)}

    calibration = [inputs(t) for t in np.linspace(999, 50, args.calibration).round()]
    test = inputs(500)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}

    def timed(compiled):
        runs = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            compiled(test)
            runs.append(round(time.perf_counter() - t0, 2))
        return runs

    fp32 = core.compile_model(model, "CPU", config)
    reference = fp32(test)[0]
    results["fp32"] = {"runs_s": timed(fp32)}
    del fp32
    t0 = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration), fast_bias_correction=True)
    results["int8"] = {"quantize_s": round(time.perf_counter() - t0, 1), "calibration_samples": len(calibration)}
    int8 = core.compile_model(quantized, "CPU", config)
    out = int8(test)[0]
    results["int8"]["runs_s"] = timed(int8)
    results["int8"]["rel_error_vs_fp32"] = round(float(np.linalg.norm(out - reference) / np.linalg.norm(reference)), 4)
    for name in ("fp32", "int8"):
        results[name]["median_s"] = sorted(results[name]["runs_s"])[len(results[name]["runs_s"]) // 2]
    results["int8"]["speedup_vs_fp32"] = round(results["fp32"]["median_s"] / results["int8"]["median_s"], 2)
    print({k: results[k] for k in ("fp32", "int8")}, flush=True)
    write_results(results, started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

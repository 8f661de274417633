"""Does the bundled mini model draw what its prompt says? Held-out captions, fixed seeds, pixel checker.

    .venv/bin/python benchmarks/mini_quality.py                      # 100 captions, through the engine
    .venv/bin/python benchmarks/mini_quality.py --count 200 --out benchmarks/results/mini_quality.json

The captions come from scenes whose facts (colors, kinds, positions, background) were never used in
training (``brushwork.mini.scenes.is_held_out``). Each picture is read back with
``brushwork.mini.checker`` and the JSON reports background-color, shape-color, shape-kind and
position accuracy and seconds per picture (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from brushwork.mini.evaluate import evaluate  # noqa: E402

DEFAULT_MODEL = ROOT / "src/brushwork/models/mini/mini.safetensors"


def engine_generator(model: Path, sampler: str | None, steps: int | None, guidance: float | None,
                     cfg_end: float | None = None):
    """``generate(prompt, seed)`` through brushwork's public API (the path users take), and the settings
    it runs with (what was left open filled in by the engine and the model's recommendations)."""
    from brushwork import Engine, GenerationRequest

    engine = Engine()
    asked = {"sampler": sampler, "steps": steps, "cfg_scale": guidance, "cfg_end": cfg_end}
    options = {k: v for k, v in asked.items() if v is not None}
    ran = engine.generate(GenerationRequest(prompt="warm up", model=str(model), seed=0, **options)).request

    def generate(prompt: str, seed: int):
        return engine.generate(GenerationRequest(prompt=prompt, model=str(model), seed=seed, **options)).images[0]

    return generate, {name: getattr(ran, name) for name in asked}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--sampler", default=None, help="default: the engine's default for the model")
    parser.add_argument("--steps", type=int, default=None, help="default: the engine's default")
    parser.add_argument("--guidance", type=float, default=None, help="default: the engine's default")
    parser.add_argument("--cfg-end", type=float, default=None, help="fraction of steps with CFG (default: the engine's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    generate, settings = engine_generator(args.model, args.sampler, args.steps, args.guidance, args.cfg_end)
    metrics = evaluate(generate, count=args.count)
    result = {
        "benchmark": "mini_quality",
        "model": args.model.name,
        **settings,  # as run: given on the command line, else the engine's and the model's defaults
        **metrics,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "torch": torch.__version__,
        "total_seconds": round(time.time() - start, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""The mini model's training script (``tools/train_mini.py``): a few steps of every stage give a file the engine loads.

The full run takes an hour; this runs each stage for a couple of steps on tiny batches, through ``main``.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from brushwork import Engine, GenerationRequest, Settings

ROOT = Path(__file__).resolve().parents[1]


def _train_mini():
    spec = importlib.util.spec_from_file_location("train_mini", ROOT / "tools/train_mini.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_mini"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("train_mini", None)
    return module


def test_a_few_steps_of_every_stage_give_a_file_the_engine_draws_with(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out" / "mini.safetensors"
    _train_mini().main([
        "--work", str(tmp_path / "work"), "--out", str(out), "--vae-steps", "2", "--vae-batch", "4",
        "--unet-steps", "3", "--batch", "4", "--text-warmup", "1", "--save-every", "0",
        "--eval-count", "1", "--eval-steps", "2", "--threads", "1",
    ])
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "3 steps" in card and "--unet-steps 3" in card
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["brushwork.defaults"]) == {"cfg_scale": 2.0, "cfg_end": 0.85}

    result = Engine(Settings(home=tmp_path / "home")).generate(
        GenerationRequest(prompt="a red circle on the left, on a white background", model=str(out), steps=2, seed=1)
    )
    assert np.asarray(result.images[0]).shape == (64, 64, 3)
    # what the script wrote into the file is what a request that leaves them open gets
    assert "CFG scale: 2," in result.infotexts[0] and "CFG end: 0.85," in result.infotexts[0]

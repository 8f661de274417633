"""The bundled mini model, through the public engine: pictures match their prompts, runs are reproducible.

The checker (``brushwork.mini.checker``) reads colors, kinds and positions back from the pixels.
"""

from pathlib import Path

import numpy as np
import pytest

from brushwork import Engine, GenerationRequest, Mode
from brushwork.mini import checker, scenes

MINI = Path(__file__).resolve().parents[1] / "src/brushwork/models/mini/mini.safetensors"
STEPS = 20
CFG = 7.0  # pinned, so that a change of the engine default does not move the golden values


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from brushwork import Settings

    return Engine(Settings(home=tmp_path_factory.mktemp("home")))


def _generate(engine, prompt: str, seed: int, **extra):
    request = GenerationRequest(prompt=prompt, model=str(MINI), steps=STEPS, cfg_scale=CFG, seed=seed, **extra)
    return engine.generate(request).images[0]


def test_bundled_file_is_small_and_tagged():
    from safetensors import safe_open

    assert MINI.stat().st_size <= 25_000_000
    with safe_open(str(MINI), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.parametrize(
    ("prompt", "background", "color"),
    [
        ("a yellow square on the left, on a blue background", "blue", "yellow"),
        ("a white square in the center, on a red background", "red", "white"),
        ("a orange triangle on the right, on a green background", "green", "orange"),
    ],
)
def test_picture_matches_prompt(engine, prompt, background, color):
    # Pinned cases (seed 7) where the current model is right; the broad numbers are in benchmarks/mini_quality.py.
    image = _generate(engine, prompt, seed=7)
    assert image.size == (64, 64)
    found = checker.analyze(image)
    assert found.background == background, found
    assert found.shape_of_color(color) is not None, found


def test_layout_and_kind_follow_prompt(engine):
    found = checker.analyze(_generate(engine, "a orange triangle on the right, on a green background", seed=7))
    assert found.shape_of_color("orange") == scenes.Shape("orange", "triangle", "right"), found


def test_same_seed_same_picture_golden_slice(engine):
    a = np.asarray(_generate(engine, "a blue circle on the right, on a yellow background", seed=3)) / 255.0
    b = np.asarray(_generate(engine, "a blue circle on the right, on a yellow background", seed=3)) / 255.0
    assert np.array_equal(a, b)
    golden = np.array(GOLDEN_SLICE)
    assert np.allclose(a[30:33, 46:49, 0], golden, atol=0.04), a[30:33, 46:49, 0].round(3).tolist()


def _img2img(engine, strength: float):
    from PIL import Image

    init = scenes.render(scenes.Scene("white", (scenes.Shape("red", "square", "left"),)))
    prompt = "a blue circle on the right, on a black background"
    return checker.analyze(
        _generate(engine, prompt, seed=1, mode=Mode.IMG2IMG, init_image=Image.fromarray(init), strength=strength)
    )


def test_img2img_high_strength_follows_prompt(engine):
    found = _img2img(engine, 0.9)
    assert found.background == "black" and found.shape_of_color("blue") is not None, found


@pytest.mark.xfail(strict=True, reason="known gap: the current mini model repaints the init image at low noise")
def test_img2img_low_strength_keeps_layout(engine):
    found = _img2img(engine, 0.3)
    assert found.background == "white" and found.shape_of_color("red") is not None, found
    assert found.shape_of_color("red").position == "left"


GOLDEN_SLICE = [[0.9412, 0.9294, 0.9608], [0.9373, 0.9255, 0.9608], [0.9686, 0.9529, 0.9529]]

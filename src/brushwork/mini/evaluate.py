"""Score a text-to-image function on held-out scene captions with the pixel checker.

Used by ``benchmarks/mini_quality.py`` (through the engine) and by ``tools/train_mini.py`` (on the
model being trained). Importing this module imports no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from brushwork.mini import checker, scenes

HELD_OUT_SEED = 2024


def held_out_prompts(count: int, seed: int = HELD_OUT_SEED) -> list[tuple[scenes.Scene, str]]:
    """``count`` scenes whose facts were never used for training, with their plain captions."""
    return [(scene, scene.canonical_caption()) for scene in scenes.scenes(seed, count, held_out=True)]


def evaluate(generate: Callable[[str, int], object], count: int = 100, seed: int = HELD_OUT_SEED) -> dict:
    """Generate one picture per held-out caption (``generate(prompt, seed) -> image``) and score it.

    Returns accuracies in [0, 1] (background over pictures; shape color, kind and position over
    all asked shapes) and the mean seconds per picture.
    """
    totals = {"background": 0, "color": 0, "kind": 0, "position": 0, "scene": 0}
    shapes = 0
    seconds = 0.0
    prompts = held_out_prompts(count, seed)
    for index, (scene, prompt) in enumerate(prompts):
        start = time.perf_counter()
        image = generate(prompt, seed + index)
        seconds += time.perf_counter() - start
        result = checker.score(scene, checker.analyze(image))
        totals["background"] += result.background
        totals["color"] += sum(result.colors)
        totals["kind"] += sum(result.kinds)
        totals["position"] += sum(result.positions)
        totals["scene"] += result.background and all(result.kinds) and all(result.positions)
        shapes += len(scene.shapes)
    return {
        "images": len(prompts),
        "shapes": shapes,
        "background_color_accuracy": totals["background"] / len(prompts),
        "shape_color_accuracy": totals["color"] / shapes,
        "shape_kind_accuracy": totals["kind"] / shapes,
        "position_accuracy": totals["position"] / shapes,
        "whole_scene_accuracy": totals["scene"] / len(prompts),
        "seconds_per_image": seconds / len(prompts),
    }

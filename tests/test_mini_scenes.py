"""The mini model's scene generator and pixel checker: the checker must read the generator's own pictures."""

import random

import numpy as np

from brushwork.mini import checker, scenes


def test_checker_reads_generated_scenes():
    rng = random.Random(0)
    chosen = scenes.scenes(seed=123, count=400, held_out=None)
    perfect = 0
    for scene in chosen:
        found = checker.analyze(scenes.render(scene, rng))
        result = checker.score(scene, found)
        ok = result.background and all(result.colors) and all(result.kinds) and all(result.positions)
        perfect += ok and len(found.shapes) == len(scene.shapes)
    assert perfect / len(chosen) >= 0.995


def test_scenes_are_deterministic_and_split():
    a = scenes.batch(seed=5, count=8)
    b = scenes.batch(seed=5, count=8)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (8, 64, 64, 3)
    assert not any(scenes.is_held_out(s) for s in a[2])
    held = scenes.scenes(seed=5, count=20, held_out=True)
    assert all(scenes.is_held_out(s) for s in held)
    # Roughly a tenth of all facts are held out, and the split does not depend on the caption.
    everything = scenes.scenes(seed=9, count=2000, held_out=None)
    assert 0.05 < sum(map(scenes.is_held_out, everything)) / 2000 < 0.15


def test_captions_name_every_fact_and_vary():
    rng = random.Random(1)
    scene = scenes.Scene("white", (scenes.Shape("red", "circle", "left"), scenes.Shape("blue", "square", "right")))
    assert scene.canonical_caption() == "a red circle on the left and a blue square on the right, on a white background"
    texts = {scenes.caption(scene, rng) for _ in range(50)}
    assert len(texts) > 20
    for text in texts:
        for word in ("red", "circle", "left", "blue", "square", "right", "white"):
            assert word in text


def test_checker_sees_a_wrong_picture():
    asked = scenes.Scene("white", (scenes.Shape("red", "circle", "left"),))
    drawn = scenes.Scene("black", (scenes.Shape("red", "triangle", "right"),))
    result = checker.score(asked, checker.analyze(scenes.render(drawn)))
    assert not result.background and result.colors == [True]
    assert result.kinds == [False] and result.positions == [False]

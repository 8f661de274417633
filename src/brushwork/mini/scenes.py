"""Procedural scenes for the bundled mini model: flat shapes on a plain background, with captions.

Every scene is a small set of facts (background color, one or two shapes, each with a color, a
kind and a position). The picture and the English caption are both built from those facts, so a
checker can later compare a generated picture with the facts of its prompt.

Everything here is deterministic from a seed and needs only numpy and Pillow.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 230, 20),
    "orange": (250, 140, 0),
    "purple": (140, 40, 180),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
KINDS = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
# Two-shape scenes sit side by side or one above the other.
PAIRS = (("left", "right"), ("top", "bottom"))

# Centre of each position on a 64x64 canvas (x, y); scaled for other sizes.
_CENTERS = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}

_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "to the left", "in the left half"),
    "right": ("on the right", "at the right", "on the right side", "to the right", "in the right half"),
    "top": ("at the top", "on the top", "at the top side", "near the top", "in the top half"),
    "bottom": ("at the bottom", "on the bottom", "at the bottom side", "near the bottom", "in the bottom half"),
    "center": ("in the center", "in the middle", "at the center", "in the centre", "centered"),
}


@dataclass(frozen=True)
class Shape:
    color: str
    kind: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def key(self) -> str:
        """A canonical text for the facts (the same scene always gives the same key)."""
        parts = [f"{s.color} {s.kind} {s.position}" for s in sorted(self.shapes, key=lambda s: s.position)]
        return " | ".join(parts) + f" || {self.background}"

    def canonical_caption(self) -> str:
        """The plain caption: 'a red circle on the left and a blue square on the right, on a white background'."""
        parts = [f"a {s.color} {s.kind} {_POSITION_PHRASES[s.position][0]}" for s in self.shapes]
        return " and ".join(parts) + f", on a {self.background} background"


def is_held_out(scene: Scene, fraction: float = 0.1) -> bool:
    """Whether a scene's facts belong to the held-out set (never used for training).

    The split is a hash of the canonical facts, so it is the same on every machine and in every run.
    """
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def random_scene(rng: random.Random, *, p_single: float = 0.5) -> Scene:
    """One random scene: a background and one shape (anywhere) or two (left/right or top/bottom)."""
    names = list(COLORS)
    background = rng.choice(names)
    others = [c for c in names if c != background]
    if rng.random() < p_single:
        shape = Shape(rng.choice(others), rng.choice(KINDS), rng.choice(POSITIONS))
        return Scene(background, (shape,))
    c1, c2 = rng.sample(others, 2)
    p1, p2 = rng.choice(PAIRS)
    if rng.random() < 0.5:
        p1, p2 = p2, p1
    return Scene(background, (Shape(c1, rng.choice(KINDS), p1), Shape(c2, rng.choice(KINDS), p2)))


def scenes(seed: int, count: int, *, held_out: bool | None = False, p_single: float = 0.5) -> list[Scene]:
    """``count`` scenes from ``seed``; ``held_out=False`` -> training facts only, ``True`` -> held-out only,
    ``None`` -> both."""
    rng = random.Random(seed)
    out: list[Scene] = []
    while len(out) < count:
        scene = random_scene(rng, p_single=p_single)
        if held_out is None or is_held_out(scene) == held_out:
            out.append(scene)
    return out


# ---------------------------------------------------------------------------------------------- captions


def _shape_phrase(shape: Shape, rng: random.Random) -> str:
    pos = rng.choice(_POSITION_PHRASES[shape.position])
    form = rng.randrange(4)
    if form == 0:
        return f"a {shape.color} {shape.kind} {pos}"
    if form == 1:
        return f"{pos} a {shape.color} {shape.kind}"
    if form == 2:
        return f"a {shape.kind}, {shape.color}, {pos}"
    return f"one {shape.color} {shape.kind} {pos}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A varied English caption for ``scene``: different word orders and phrasings of the same facts."""
    shapes = list(scene.shapes)
    if len(shapes) == 2 and rng.random() < 0.5:
        shapes.reverse()
    body = " and ".join(_shape_phrase(s, rng) for s in shapes)
    bg = scene.background
    form = rng.randrange(6)
    if form == 0:
        return f"{body}, on a {bg} background"
    if form == 1:
        return f"{body} on {bg}"
    if form == 2:
        return f"a {bg} background with {body}"
    if form == 3:
        return f"{body}, {bg} background"
    if form == 4:
        return f"on a {bg} background, {body}"
    return f"{body} against a plain {bg} background"


# ---------------------------------------------------------------------------------------------- pictures


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``scene`` as a ``size x size x 3`` uint8 array; ``rng`` adds small jitter of place and size."""
    from PIL import Image, ImageDraw

    scale = size / IMAGE_SIZE
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    single = len(scene.shapes) == 1
    for shape in scene.shapes:
        cx, cy = _CENTERS[shape.position]
        radius = 11.0 if single else 10.0
        if rng is not None:
            cx += rng.uniform(-3, 3)
            cy += rng.uniform(-3, 3)
            radius += rng.uniform(-1.5, 1.5)
        cx, cy, r = cx * scale, cy * scale, radius * scale
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            s = r * 0.9
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon(((cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)), fill=fill)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}; choose one of: {', '.join(KINDS)}")
    return np.asarray(image, dtype=np.uint8)


def batch(seed: int, count: int, *, held_out: bool | None = False) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` training examples from ``seed``: images (N, H, W, 3) uint8, captions, scenes."""
    rng = random.Random(seed * 7919 + 17)
    chosen = scenes(seed, count, held_out=held_out)
    images = np.stack([render(s, rng) for s in chosen])
    captions = [caption(s, rng) for s in chosen]
    return images, captions, chosen

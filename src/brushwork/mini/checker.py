"""Read a picture of flat shapes back into facts with plain pixel analysis (no model).

Steps: snap every pixel to the nearest named color; the background is the color that covers most
of the border; every other color that covers enough pixels is a shape (its largest connected
region). The kind comes from how much of its bounding box the region fills (square ~1, circle
~0.79, triangle ~0.5), the position from where its centre lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brushwork.mini.scenes import COLORS, Scene, Shape

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Found:
    """What the checker saw: the background and the shapes (largest first)."""

    background: str
    shapes: tuple[Shape, ...]

    def shape_of_color(self, color: str) -> Shape | None:
        return next((s for s in self.shapes if s.color == color), None)


def _labels(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    dist = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return dist.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a small flood fill; images are tiny)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _kind(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(height * width)
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def _position(region: np.ndarray) -> str:
    h, w = region.shape
    ys, xs = np.nonzero(region)
    # Centre of the bounding box: a triangle's mass sits low, its box does not.
    dx = (xs.min() + xs.max() + 1) / 2.0 / w - 0.5
    dy = (ys.min() + ys.max() + 1) / 2.0 / h - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def analyze(image, *, min_fraction: float = 0.02) -> Found:
    """Facts seen in ``image`` (a PIL image or an H x W x 3 array)."""
    labels = _labels(np.asarray(image))
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    found: list[tuple[int, Shape]] = []
    for index, name in enumerate(_NAMES):
        if index == background:
            continue
        region = _largest_component(labels == index)
        area = int(region.sum())
        if area < min_fraction * h * w:
            continue
        found.append((area, Shape(name, _kind(region), _position(region))))
    found.sort(key=lambda item: -item[0])
    return Found(_NAMES[background], tuple(shape for _, shape in found))


@dataclass
class Score:
    """Per-fact agreement between a scene's facts and what the checker found."""

    background: bool
    colors: list[bool]
    kinds: list[bool]
    positions: list[bool]


def score(scene: Scene, found: Found) -> Score:
    """Compare the facts of ``scene`` (what was asked) with ``found`` (what was drawn).

    A shape's color counts if a shape of that color was found; its kind and position count if that
    found shape has the asked kind / position.
    """
    colors, kinds, positions = [], [], []
    for want in scene.shapes:
        got = found.shape_of_color(want.color)
        colors.append(got is not None)
        kinds.append(got is not None and got.kind == want.kind)
        positions.append(got is not None and got.position == want.position)
    return Score(found.background == scene.background, colors, kinds, positions)

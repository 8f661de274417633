"""The annotator networks of the weighted ControlNet preprocessors, in the key layouts of lllyasviel/Annotators' files,
and the maths A1111's ControlNet extension does around them (its ``annotator/*``). ``preprocessors.py`` is the table
that names them; this module imports torch, so only a map being made imports it.

- ``ControlNetHED.pth``: lllyasviel's ControlNetHED_Apache2 (``softedge_hed``): five VGG-like blocks
  (``block{1..5}.convs.*``, max-pooled between them), each with a 1x1 ``projection`` to one channel; an RGB input in
  0-255 minus a learned ``norm``. The edge is the sigmoid of the mean of the five projections, each resized to the
  picture with ``cv2.INTER_LINEAR``.
- ``sk_model.pth`` / ``sk_model2.pth``: informative-drawings' Generator (``lineart_realistic`` / ``lineart_coarse``):
  ``model0`` (reflection pad, 7x7 conv), ``model1`` (two stride-2 convs), ``model2`` (3 residual blocks),
  ``model3`` (two transposed convs), ``model4`` (7x7 conv, sigmoid), instance norms without weights; ``x / 255`` in.
- ``netG.pth``: pix2pix's UNet generator (``lineart_anime``), 8 levels, instance norms without weights and biased
  convs; ``x / 127.5 - 1`` in at multiples of 256, ``y * 127.5 + 127.5`` out.
- ``body_pose_model.pth``: CMU's 6-stage body pose net (``openpose``), each conv named by itself (``conv1_1``,
  ``Mconv7_stage6_L2``, ...); then the annotator's ``Body`` (peaks, limbs along the part affinity fields, people)
  and ``draw_bodypose`` (the 18 parts' colours).

Sizes (channels, layers, blocks, levels) are read from the tensor shapes, so smaller nets in the same layout load too;
every file loads with ``strict=True``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

# ---- HED (ControlNetHED_Apache2) --------------------------------------------------------------------------------


class HedBlock(nn.Module):
    """3x3 convs with ReLU (max-pooled first, but for the first block), and their 1x1 projection to an edge."""

    def __init__(self, in_channels: int, channels: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(layers)])
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, h, down_sampling: bool = False):
        if down_sampling:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class ControlNetHED(nn.Module):
    def __init__(self, channels=(64, 128, 256, 512, 512), layers=(2, 2, 3, 3, 3)):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        in_channels = 3
        for i, (c, n) in enumerate(zip(channels, layers, strict=True)):
            self.add_module(f"block{i + 1}", HedBlock(in_channels, c, n))
            in_channels = c
        self.depth = len(channels)

    def forward(self, x) -> list:
        """The projections of every block (1 x 1 x H/2^i x W/2^i) of an RGB batch in 0-255."""
        h = x - self.norm
        projections = []
        for i in range(self.depth):
            h, projection = getattr(self, f"block{i + 1}")(h, down_sampling=i > 0)
            projections.append(projection)
        return projections


def build_hed(sd: dict) -> ControlNetHED:
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"block(\d+)\.convs\.0\.weight$", k))})
    channels = [sd[f"block{i}.convs.0.weight"].shape[0] for i in blocks]
    layers = [len([k for k in sd if re.match(rf"block{i}\.convs\.\d+\.weight$", k)]) for i in blocks]
    model = ControlNetHED(channels, layers)
    model.load_state_dict(sd, strict=True)
    return model


def hed_edges(model: ControlNetHED, img, safe: bool = False):
    """The soft edge map (H x W uint8) of an RGB uint8 picture, as the extension's ``apply_hed``; ``safe``: quantised
    to 0 / 127 / 255 (its ``safe_step``, for softedge_hedsafe)."""
    import cv2
    import numpy as np

    h, w = img.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(img)).float().permute(2, 0, 1)[None]
    with torch.inference_mode():
        projections = model(x)
    edges = [cv2.resize(p[0, 0].numpy().astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
             for p in projections]
    edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(edges, axis=2), axis=2).astype(np.float64)))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


# ---- lineart (informative-drawings' Generator) ------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    def __init__(self, channels: int = 64, residual_blocks: int = 3, in_channels: int = 3, out_channels: int = 1):
        super().__init__()
        c = channels
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, c, 7), nn.InstanceNorm2d(c),
                                    nn.ReLU())
        self.model1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(),
                                    nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * c),
                                    nn.ReLU())
        self.model2 = nn.Sequential(*[ResidualBlock(4 * c) for _ in range(residual_blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(2 * c),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(c), nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c, out_channels, 7), nn.Sigmoid())

    def forward(self, x):
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def build_lineart(sd: dict) -> LineartGenerator:
    first = sd["model0.1.weight"]
    blocks = len({k.split(".")[1] for k in sd if k.startswith("model2.")})
    model = LineartGenerator(first.shape[0], blocks, first.shape[1], sd["model4.1.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    return model


def lineart(model: LineartGenerator, img):
    """The line drawing (H x W uint8: dark lines on white) of an RGB uint8 picture, as the extension's
    ``LineartDetector``; the preprocessor inverts it."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(img)).float().permute(2, 0, 1)[None] / 255.0
    with torch.inference_mode():
        line = model(x)[0, 0]
    return (line.numpy() * 255.0).clip(0, 255).astype(np.uint8)


# ---- lineart_anime (pix2pix's UNet generator) -------------------------------------------------------------------


class UnetBlock(nn.Module):
    """One level of the UNet: down, the inner levels, up; its input is concatenated to its output (but for the
    outermost level). The indices of ``model`` are pix2pix's ``UnetSkipConnectionBlock``'s."""

    def __init__(self, outer: int, inner: int, in_channels: int | None = None, submodule: nn.Module | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(in_channels or outer, inner, 4, stride=2, padding=1)
        if outermost:
            layers = [down, submodule, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1),
                      nn.Tanh()]
        elif submodule is None:  # innermost
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), submodule, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        # pix2pix's LeakyReLU runs in place, so its skip carries leaky_relu(x): the same numbers once the parent's
        # up path's ReLU has run on it
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    def __init__(self, channels: int = 64, levels: int = 8, in_channels: int = 3, out_channels: int = 1):
        super().__init__()
        c = channels
        block = UnetBlock(8 * c, 8 * c)
        for _ in range(levels - 5):
            block = UnetBlock(8 * c, 8 * c, submodule=block)
        for outer in (4 * c, 2 * c, c):
            block = UnetBlock(outer, 2 * outer, submodule=block)
        self.model = UnetBlock(out_channels, c, in_channels, block, outermost=True)

    def forward(self, x):
        return self.model(x)


def build_unet(sd: dict) -> UnetGenerator:
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    first = sd["model.model.0.weight"]
    levels = len([k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]) // 2  # one down, one up each
    model = UnetGenerator(first.shape[0], levels, first.shape[1], sd["model.model.3.weight"].shape[1])
    model.load_state_dict(sd, strict=True)
    return model


def lineart_anime(model: UnetGenerator, img):
    """The anime line drawing (H x W uint8: dark lines on white) of an RGB uint8 picture, as the extension's
    ``LineartAnimeDetector``: run at the next multiples of 256 (cubic), resized back (cubic)."""
    import cv2
    import numpy as np

    h, w = img.shape[:2]
    side = 2 ** sum(1 for m in model.modules() if isinstance(m, UnetBlock))  # 256 for the real 8 levels
    hn, wn = side * int(np.ceil(h / side)), side * int(np.ceil(w / side))
    x = cv2.resize(img, (wn, hn), interpolation=cv2.INTER_CUBIC)
    x = torch.from_numpy(x).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.inference_mode():
        line = model(x)[0, 0] * 127.5 + 127.5
    return cv2.resize(line.numpy(), (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


# ---- openpose (CMU's body pose net, as lllyasviel's annotator runs it) ------------------------------------------

# body_pose_model.pth names each conv by itself (no Sequential prefix: the extension's ``util.transfer`` strips
# them); pools after conv1_2, conv2_2 and conv3_4
_POSE_BACKBONE = ("conv1_1", "conv1_2", "pool", "conv2_1", "conv2_2", "pool", "conv3_1", "conv3_2", "conv3_3",
                  "conv3_4", "pool", "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM")


def _pose_stage(stage: int, branch: int) -> tuple[str, ...]:
    if stage == 1:
        return tuple(f"conv5_{i}_CPM_L{branch}" for i in range(1, 6))
    return tuple(f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8))


class BodyPoseNet(nn.Module):
    """CMU's 6-stage body pose net: a VGG backbone, then per stage the part affinity fields (L1, 38 channels) and
    the part heatmaps (L2, 19), each stage reading the last one's with the backbone's features. Every conv but a
    stage's last is followed by a ReLU; the original's list of those without one names stage 6's L1 twice and not
    its L2, so the final heatmaps go through a ReLU too (kept: the extension's numbers)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], stages: int = 6):
        super().__init__()
        self.stages = stages
        names = [n for n in _POSE_BACKBONE if n != "pool"]
        names += [n for s in range(1, stages + 1) for b in (1, 2) for n in _pose_stage(s, b)]
        for name in names:
            out_channels, in_channels, k = shapes[name][:3]
            self.add_module(name, nn.Conv2d(in_channels, out_channels, k, padding=k // 2))

    def _run(self, x, names, last_relu: bool):
        for i, name in enumerate(names):
            if name == "pool":
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, name)(x)
            if i < len(names) - 1 or last_relu:
                x = F.relu(x)
        return x

    def forward(self, x):
        """(PAFs, heatmaps) of a BGR batch in -0.5 .. 0.5."""
        features = self._run(x, _POSE_BACKBONE, True)
        h = features
        for s in range(1, self.stages + 1):
            pafs = self._run(h, _pose_stage(s, 1), False)
            heatmaps = self._run(h, _pose_stage(s, 2), s == self.stages)
            h = torch.cat([pafs, heatmaps, features], 1)
        return pafs, heatmaps


def build_body_pose(sd: dict) -> BodyPoseNet:
    stages = max(int(m.group(1)) for k in sd if (m := re.match(r"Mconv1_stage(\d+)_L1\.weight$", k)))
    model = BodyPoseNet({k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")},
                        stages)
    own = model.state_dict()  # the extension's transfer reads only the net's own tensors: extra ones are left
    missing = sorted(set(own) - set(sd))
    if missing:
        raise KeyError(f"body_pose_model.pth lacks {', '.join(missing[:3])}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return model


def _smart_resize(x, width: int, height: int):
    """The annotator's ``smart_resize``: area when shrinking, Lanczos when growing (by the sum of the sides), one
    channel at a time past 3."""
    import cv2
    import numpy as np

    if x.ndim == 3 and x.shape[2] not in (1, 3):
        return np.stack([_smart_resize(x[:, :, i], width, height) for i in range(x.shape[2])], axis=2)
    k = float(height + width) / float(x.shape[0] + x.shape[1])
    return cv2.resize(x, (int(width), int(height)), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4)


def body_pose_maps(model: BodyPoseNet, img):
    """(heatmaps H x W x 19, PAFs H x W x 38) of an RGB uint8 picture, as the annotator's ``Body``: the BGR picture
    scaled so its height is 184 (368 x 0.5, its one scale), padded right and down to multiples of 8 with 128,
    ``x / 256 - 0.5`` in; the outputs scaled up 8 times, the padding cut, scaled to the picture."""
    import numpy as np

    stride, box = 8, 368 * 0.5
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    h, w = bgr.shape[:2]
    scale = box / h
    small = _smart_resize(bgr, w * scale, h * scale)
    sh, sw = small.shape[:2]
    pad_h, pad_w = -sh % stride, -sw % stride
    padded = np.pad(small, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=128)
    x = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None]
    with torch.inference_mode():
        pafs, heatmaps = model(x)

    def back(t):
        t = np.ascontiguousarray(t[0].permute(1, 2, 0).numpy())
        t = _smart_resize(t, t.shape[1] * stride, t.shape[0] * stride)[: sh, : sw]
        return _smart_resize(t, w, h).astype(np.float64)

    return back(heatmaps), back(pafs)


# the 19 limbs (part pairs, 1-based as the original's) and the PAF channels of each (19-based); the first 17 are drawn
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
LIMB_PAFS = ((31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22), (23, 24), (25, 26),
             (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52), (55, 56), (37, 38), (45, 46))
# RGB, one a part (and a limb)
POSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))


def _peaks(heatmaps, threshold: float = 0.1) -> list[list[tuple]]:
    """Per part (18), its peaks (x, y, score, id): local maxima of the heatmap blurred with sigma 3 (scipy's
    ``gaussian_filter``: radius 12, reflected edges) above ``threshold``, scored by the unblurred heatmap."""
    import cv2
    import numpy as np

    peaks, counter = [], 0
    for part in range(18):
        heat = heatmaps[:, :, part]
        blurred = cv2.GaussianBlur(heat, (25, 25), 3, borderType=cv2.BORDER_REFLECT)
        shifted = np.zeros((4, *blurred.shape))
        shifted[0, 1:, :], shifted[1, :-1, :] = blurred[:-1, :], blurred[1:, :]
        shifted[2, :, 1:], shifted[3, :, :-1] = blurred[:, :-1], blurred[:, 1:]
        ys, xs = np.nonzero((blurred >= shifted).all(axis=0) & (blurred > threshold))
        peaks.append([(int(x), int(y), float(heat[y, x]), counter + i)
                      for i, (x, y) in enumerate(zip(xs, ys, strict=True))])
        counter += len(xs)
    return peaks


def body_people(heatmaps, pafs) -> list[list[tuple[float, float] | None]]:
    """The people in the maps, each its 18 parts' (x, y) in pixels or None: the annotator's ``Body`` after the net
    (peaks; limbs scored along their PAF at 10 points, greedily matched; limbs joined into people; people with
    fewer than 4 parts or a mean score under 0.4 dropped)."""
    import numpy as np

    height = heatmaps.shape[0]
    peaks = _peaks(heatmaps)
    samples, threshold = 10, 0.05
    connections: list = []
    for (a, b), (pa, pb) in zip(LIMBS, LIMB_PAFS, strict=True):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            connections.append(None)
            continue
        scored = []
        for i, (xa, ya, *_) in enumerate(cand_a):
            for j, (xb, yb, *_) in enumerate(cand_b):
                vx, vy = xb - xa, yb - ya
                norm = max(0.001, math.sqrt(vx * vx + vy * vy))
                vx, vy = vx / norm, vy / norm
                xs = np.rint(np.linspace(xa, xb, num=samples)).astype(int)
                ys = np.rint(np.linspace(ya, yb, num=samples)).astype(int)
                along = pafs[ys, xs, pa - 19] * vx + pafs[ys, xs, pb - 19] * vy
                score = along.sum() / samples + min(0.5 * height / norm - 1, 0)
                if (along > threshold).sum() > 0.8 * samples and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda c: c[2], reverse=True)  # stable, as the original's sorted()
        chosen, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i not in used_a and j not in used_b:
                chosen.append((cand_a[i][3], cand_b[j][3], score))
                used_a.add(i)
                used_b.add(j)
                if len(chosen) >= min(len(cand_a), len(cand_b)):
                    break
        connections.append(chosen)

    candidates = [p for part in peaks for p in part]
    people = np.zeros((0, 20))  # per person: 18 candidate ids (-1: none), the total score, the number of parts
    for k, ((a, b), chosen) in enumerate(zip(LIMBS, connections, strict=True)):
        if chosen is None:
            continue
        ia, ib = a - 1, b - 1
        for id_a, id_b, score in chosen:
            # the original's list holds two (a third one would stop it with an IndexError)
            found = [n for n in range(len(people)) if people[n][ia] == id_a or people[n][ib] == id_b][:2]
            if len(found) == 1:
                n = found[0]
                if people[n][ib] != id_b:
                    people[n][ib] = id_b
                    people[n][-1] += 1
                    people[n][-2] += candidates[id_b][2] + score
            elif len(found) == 2:
                n1, n2 = found
                if not ((people[n1][:-2] >= 0) & (people[n2][:-2] >= 0)).any():  # two disjoint people: merged
                    people[n1][:-2] += people[n2][:-2] + 1
                    people[n1][-2:] += people[n2][-2:]
                    people[n1][-2] += score
                    people = np.delete(people, n2, 0)
                else:  # the first one takes the part (without the check above: the original's)
                    people[n1][ib] = id_b
                    people[n1][-1] += 1
                    people[n1][-2] += candidates[id_b][2] + score
            elif not found and k < 17:
                row = -1 * np.ones(20)
                row[ia], row[ib] = id_a, id_b
                row[-1] = 2
                row[-2] = candidates[id_a][2] + candidates[id_b][2] + score
                people = np.vstack([people, row])
    keep = [p for p in people if p[-1] >= 4 and p[-2] / p[-1] >= 0.4]
    return [[None if int(i) == -1 else candidates[int(i)][:2] for i in p[:18]] for p in keep]


def draw_bodies(people, height: int, width: int):
    """The pose map: on black, each limb an ellipse (half its width 4 pixels) in its colour at 60 %, each part a disc
    of radius 4 in its colour (the annotator's ``draw_bodypose``, from the parts' coordinates as fractions of the picture)."""
    import cv2
    import numpy as np

    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        parts = [None if p is None else (p[0] / float(width), p[1] / float(height)) for p in person]
        for (a, b), colour in zip(LIMBS[:17], POSE_COLOURS, strict=False):
            if parts[a - 1] is None or parts[b - 1] is None:
                continue
            ys = np.array([parts[a - 1][0], parts[b - 1][0]]) * float(width)
            xs = np.array([parts[a - 1][1], parts[b - 1][1]]) * float(height)
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), 4), int(angle), 0,
                                       360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in colour])
        for part, colour in zip(parts, POSE_COLOURS, strict=True):
            if part is not None:
                cv2.circle(canvas, (int(part[0] * width), int(part[1] * height)), 4, colour, thickness=-1)
    return canvas

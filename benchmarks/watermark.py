"""Invisible watermark benchmark: detection rates, false positives, PSNR and speed.

    .venv/bin/python benchmarks/watermark.py            # our mark + SD marks, ~1 min on one core
    .venv/bin/python benchmarks/watermark.py --compare  # also plain invisible-watermark dwtDct / dwtDctSvd
    .venv/bin/python benchmarks/watermark.py --sweep    # also candidate coefficient sets and steps

No model weights are needed: the images are procedural but varied like generated ones (gradients,
flat colours with shapes, noise textures, fractal "natural" images, landscapes, very bright and very
dark images with clipped areas), in the sizes we produce: 512x512, 768x768, 256x384, 384x256, odd
multiples of 8 (504x376, 640x448), and 64x64 (the bundled mini model) reported separately.

Each image is marked, saved as PNG, JPEG q90 and JPEG q75 (Pillow defaults: 4:2:0 chroma), reopened
and checked. False positives are counted on the unmarked originals (as PNG and JPEG q90), on
images carrying an SD mark instead, and the SD detectors are checked on images carrying ours.
Writes the JSON report to stdout and to benchmarks/results/watermark.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from brushwork.output import watermark as wm  # noqa: E402

MAIN_SIZES = [(512, 512), (512, 512), (768, 768), (256, 384), (384, 256), (504, 376), (512, 512), (640, 448)]
SMALL_SIZES = [(64, 64)]


# --- procedural images ---------------------------------------------------------------------------


def _colour(rng) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _fractal(rng, h: int, w: int, beta: float) -> np.ndarray:
    """1/f^beta noise in [0, 1]: clouds, terrain, foliage-like textures."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(h, w))
    field -= field.min()
    return field / max(field.max(), 1e-9)


def _palette(rng, t: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a random 3-stop colour ramp."""
    stops = np.stack([_colour(rng) for _ in range(3)])
    t = t[..., None]
    low = stops[0] * (1 - 2 * t) + stops[1] * (2 * t)
    high = stops[1] * (2 - 2 * t) + stops[2] * (2 * t - 1)
    return np.where(t < 0.5, low, high)


def gradient(rng, h, w):
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    a, b = _colour(rng), _colour(rng)
    return a * (1 - t[..., None]) + b * t[..., None]


def radial(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    t = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / math.hypot(h, w)
    return _palette(rng, np.clip(t * rng.uniform(1, 2), 0, 1))


def shapes(rng, h, w):
    """Flat shapes; often on pure white or pure black, like the bundled mini model's pictures."""
    background = [(255, 255, 255), (0, 0, 0), tuple(int(c) for c in _colour(rng))][rng.integers(0, 3)]
    base = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(base)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = rng.uniform(-0.2, 1, 2) * (w, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        fill = tuple(int(c) for c in _colour(rng))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            pts = [tuple(rng.uniform(0, 1, 2) * (w, h)) for _ in range(3)]
            draw.polygon(pts, fill=fill)
    return np.asarray(base, dtype=np.float64)


def noise_texture(rng, h, w):
    import cv2

    sigma = float(rng.choice([0.0, 1.0, 3.0, 8.0]))
    noise = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
    if sigma:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
        noise = (noise - noise.mean()) * (60 / max(noise.std(), 1e-6)) + 128
    return noise.astype(np.float64)


def natural(rng, h, w):
    t = _fractal(rng, h, w, beta=rng.uniform(2.0, 3.2))
    detail = _fractal(rng, h, w, beta=1.5)
    return _palette(rng, t) + (detail[..., None] - 0.5) * 40


def landscape(rng, h, w):
    sky = gradient(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    ridge = _fractal(rng, 1, w * 4, beta=2.5)[0, ::4] * h * 0.5 + h * 0.35
    ground = natural(rng, h, w) * 0.7
    img = np.where((yy > ridge[None, :])[..., None], ground, sky)
    cy, cx, r = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.9) * w, rng.uniform(0.03, 0.08) * w
    sun = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img[sun] = (255, 240, 200)
    return img


def high_key(rng, h, w):
    """Bright, mostly near-white images with clipped highlights (snow, studio backdrops)."""
    return natural(rng, h, w) * 0.3 + 200 + 40 * _fractal(rng, h, w, 2.5)[..., None]


def low_key(rng, h, w):
    """Dark, night-like images with crushed blacks."""
    return natural(rng, h, w) * 0.35 - 30


def pattern(rng, h, w):
    """Stripes, checkers and grids with periods near the watermark block sizes (hard for periodic decoders)."""
    yy, xx = np.mgrid[0:h, 0:w]
    period = float(rng.choice([4, 8, 12, 16, 24, 32, 64]))
    kind = rng.integers(0, 3)
    if kind == 0:
        t = (xx // (period / 2)) % 2
    elif kind == 1:
        t = ((xx // period) + (yy // period)) % 2
    else:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / period)
    a, b = _colour(rng), _colour(rng)
    return a * (1 - t[..., None]) + b * t[..., None]


GENERATORS = [gradient, radial, shapes, noise_texture, natural, landscape, high_key, low_key, pattern]


def make_images(seed: int = 0, per_kind: int = 8, small_per_kind: int = 3):
    """(name, group, PIL RGB image) for every benchmark image; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    images = []
    for gen in GENERATORS:
        for i in range(per_kind):
            w, h = MAIN_SIZES[i % len(MAIN_SIZES)]
            arr = np.clip(np.rint(gen(rng, h, w)), 0, 255).astype(np.uint8)
            images.append((f"{gen.__name__}-{i}-{w}x{h}", "main", Image.fromarray(arr, "RGB")))
        for i in range(small_per_kind):
            w, h = SMALL_SIZES[i % len(SMALL_SIZES)]
            arr = np.clip(np.rint(gen(rng, h, w)), 0, 255).astype(np.uint8)
            images.append((f"{gen.__name__}-small{i}-{w}x{h}", "small", Image.fromarray(arr, "RGB")))
    return images


# --- helpers -------------------------------------------------------------------------------------


def reencode(image: Image.Image, fmt: str, quality: int | None = None) -> Image.Image:
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as reopened:
        return reopened.convert("RGB")


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def rate(hits: list[bool]) -> dict:
    return {"rate": round(sum(hits) / len(hits), 4) if hits else None, "hits": sum(hits), "n": len(hits)}


VARIANTS = [("png", "PNG", None), ("jpeg90", "JPEG", 90), ("jpeg75", "JPEG", 75)]


# --- our mark ------------------------------------------------------------------------------------


def bench_ours(images) -> dict:
    groups: dict[str, dict] = {}
    failures = []
    for name, group, img in images:
        g = groups.setdefault(
            group,
            {
                "sizes": set(),
                "psnr": [],
                "max_abs": [],
                "embed_ms": [],
                "detect_ms": [],
                **{v: [] for v, _, _ in VARIANTS},
                "fp_png": [],
                "fp_jpeg90": [],
                "z_unmarked": [],
                "z_marked_jpeg90": [],
            },
        )
        g["sizes"].add(f"{img.width}x{img.height}")
        t0 = time.perf_counter()
        marked = wm.embed(img)
        g["embed_ms"].append((time.perf_counter() - t0) * 1000)
        g["psnr"].append(psnr(img, marked))
        diff = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(marked, dtype=np.int16))
        g["max_abs"].append(int(diff.max()))
        for variant, fmt, quality in VARIANTS:
            saved = reencode(marked, fmt, quality)
            t0 = time.perf_counter()
            det = wm.detect(saved)
            if variant == "png":
                g["detect_ms"].append((time.perf_counter() - t0) * 1000)
            ok = det.found and det.kind == wm.DEFAULT_TAG
            g[variant].append(ok)
            if variant == "jpeg90":
                g["z_marked_jpeg90"].append(det.z or 0.0)
            if not ok and variant != "jpeg75":
                failures.append(
                    {
                        "image": name,
                        "variant": variant,
                        "z": det.z,
                        "bit_errors": det.bit_errors,
                        "bits": det.bits,
                        "kind": det.kind,
                    }
                )
        for variant, fmt, quality in VARIANTS[:2]:
            det = wm.detect(reencode(img, fmt, quality))
            g[f"fp_{variant}"].append(det.found)
            if variant == "png":
                g["z_unmarked"].append(det.z or 0.0)
            if det.found:
                failures.append({"image": name, "variant": f"unmarked-{variant}", "kind": det.kind, "z": det.z})

    report = {}
    for group, g in groups.items():
        report[group] = {
            "images": len(g["psnr"]),
            "sizes": sorted(g["sizes"]),
            "detected_after_png": rate(g["png"]),
            "detected_after_jpeg90": rate(g["jpeg90"]),
            "detected_after_jpeg75": rate(g["jpeg75"]),
            "false_positives_unmarked_png": rate(g["fp_png"]),
            "false_positives_unmarked_jpeg90": rate(g["fp_jpeg90"]),
            "psnr_db": {"mean": round(statistics.fmean(g["psnr"]), 2), "min": round(min(g["psnr"]), 2)},
            "max_abs_pixel_change": max(g["max_abs"]),
            "z_unmarked_png": {
                "mean": round(statistics.fmean(g["z_unmarked"]), 2),
                "std": round(statistics.pstdev(g["z_unmarked"]), 2),
                "max": round(max(g["z_unmarked"]), 2),
            },
            "z_marked_jpeg90_min": round(min(g["z_marked_jpeg90"]), 2),
            "embed_ms_mean": round(statistics.fmean(g["embed_ms"]), 2),
            "detect_ms_mean_marked_png": round(statistics.fmean(g["detect_ms"]), 2),
        }
    report["z_threshold"] = wm._Z_THRESHOLD
    report["failures"] = failures
    return report


def time_512(repeats: int = 20) -> dict:
    rng = np.random.default_rng(1)
    img = Image.fromarray(np.clip(np.rint(natural(rng, 512, 512)), 0, 255).astype(np.uint8), "RGB")
    wm.embed(img)  # warm up imports
    t0 = time.perf_counter()
    for _ in range(repeats):
        marked = wm.embed(img)
    embed_ms = (time.perf_counter() - t0) * 1000 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        wm.detect(marked)
    detect_ours_ms = (time.perf_counter() - t0) * 1000 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        wm.detect(img)  # unmarked: ours, then both SD decodes
    detect_full_ms = (time.perf_counter() - t0) * 1000 / repeats
    return {
        "embed_ms_512": round(embed_ms, 2),
        "detect_ms_512_marked": round(detect_ours_ms, 2),
        "detect_ms_512_unmarked_incl_sd_decodes": round(detect_full_ms, 2),
    }


# --- Stable Diffusion marks ----------------------------------------------------------------------


def sd_encode(image: Image.Image, payload: bytes, method: str = "dwtDct") -> Image.Image:
    """What the official SD scripts do (scripts/txt2img.py put_watermark)."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    bgr = encoder.encode(bgr, method)
    return Image.fromarray(bgr[:, :, ::-1].copy(), "RGB")


def bench_sd(images) -> dict:
    big = [(n, img) for n, group, img in images if img.width * img.height >= 256 * 256]
    out: dict = {}
    for kind in ("StableDiffusionV1", "SDV2"):
        png, jpeg90, wrong, errors = [], [], [], []
        for name, img in big:
            marked = sd_encode(img, kind.encode())
            errors.append(wm._sd_bit_errors(np.asarray(reencode(marked, "PNG")))[kind])
            det = wm.detect(reencode(marked, "PNG"))
            png.append(det.found and det.kind == kind)
            if det.found and det.kind != kind:
                wrong.append({"image": name, "detected_as": det.kind})
            det90 = wm.detect(reencode(marked, "JPEG", 90))
            jpeg90.append(det90.found and det90.kind == kind)
        out[kind] = {
            "recognised_after_png": rate(png),
            "recognised_after_jpeg90 (info)": rate(jpeg90),
            "recognised_as_another_kind": wrong,
            "max_bit_errors_accepted": wm._SD_MARKS[kind][1],
            "bit_errors_when_marked_png_sorted": sorted(errors),
        }
    # SD detectors on images without an SD mark: unmarked originals and images carrying ours.
    # (an image with the other SD mark counts too: SDV2 read as StableDiffusionV1 and the reverse).
    errs: dict[str, list[int]] = {k: [] for k in wm._SD_MARKS}
    fp_unmarked, fp_ours = [], []
    for _name, img in big:
        for source, bucket in ((img, fp_unmarked), (wm.embed(img), fp_ours)):
            e = wm._sd_bit_errors(np.asarray(reencode(source, "PNG")))
            for k, v in e.items():
                errs[k].append(v)
            bucket.append(any(e[k] <= wm._SD_MARKS[k][1] for k in e))
        for kind, other in (("StableDiffusionV1", "SDV2"), ("SDV2", "StableDiffusionV1")):
            e = wm._sd_bit_errors(np.asarray(reencode(sd_encode(img, kind.encode()), "PNG")))
            errs[other].append(e[other])
    out["sd_false_positives_on_unmarked_png"] = rate(fp_unmarked)
    out["sd_false_positives_on_ours_png"] = rate(fp_ours)
    out["sd_bit_errors_without_that_mark_lowest"] = {k: sorted(v)[:8] for k, v in errs.items()}
    return out


# --- plain invisible-watermark, for comparison ---------------------------------------------------


def bench_plain(images, method: str) -> dict:
    """invisible-watermark with a 'brushwork' byte payload: exact payload, and <= 10% bit errors."""
    import cv2
    from imwatermark import WatermarkDecoder

    payload = b"brushwork"
    want = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    big = [(n, img) for n, group, img in images if group == "main"]
    res: dict[str, list[bool]] = {}
    ps = []
    for _name, img in big:
        marked = sd_encode(img, payload, method)
        ps.append(psnr(img, marked))
        for variant, fmt, quality in VARIANTS:
            bgr = cv2.cvtColor(np.asarray(reencode(marked, fmt, quality)), cv2.COLOR_RGB2BGR)
            got = WatermarkDecoder("bytes", len(want)).decode(bgr, method)
            errors = int((np.unpackbits(np.frombuffer(got, dtype=np.uint8)) != want).sum())
            res.setdefault(f"exact_{variant}", []).append(errors == 0)
            res.setdefault(f"le10pct_bit_errors_{variant}", []).append(errors <= len(want) // 10)
    out = {k: rate(v) for k, v in res.items()}
    out["psnr_db_mean"] = round(statistics.fmean(ps), 2)
    out["note"] = "no image below 256x256 can be marked at all (the library refuses)"
    return out


SWEEP_SETS = {
    "low7": ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1)),
    "mid8": ((1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2), (0, 3), (3, 0)),
    "mid9": ((2, 2), (1, 3), (3, 1), (0, 3), (3, 0), (2, 1), (1, 2), (2, 3), (3, 2)),
    "low3": ((0, 1), (1, 0), (1, 1)),
}


def sweep(seed: int) -> list[dict]:
    """PSNR against the weakest detection (lowest z) for candidate coefficient sets and steps."""
    images = make_images(seed + 1, per_kind=2, small_per_kind=3)
    rows = []
    for set_name, coeffs in SWEEP_SETS.items():
        for step in (8.0, 10.0, 12.0):
            per_group: dict[str, dict[str, list[float]]] = {}
            for _name, group, img in images:
                rgb = np.asarray(img, dtype=np.float64)
                marked = wm._embed_array(rgb, wm.DEFAULT_TAG, coeffs, step)
                r = per_group.setdefault(group, {"psnr": [], "png": [], "jpeg90": [], "jpeg75": [], "unmarked": []})
                r["psnr"].append(psnr(img, Image.fromarray(marked)))
                for variant, fmt, quality in VARIANTS:
                    saved = np.asarray(reencode(Image.fromarray(marked), fmt, quality), dtype=np.float64)
                    r[variant].append(wm._ours(saved, wm.DEFAULT_TAG, coeffs, step).z)
                r["unmarked"].append(wm._ours(rgb, wm.DEFAULT_TAG, coeffs, step).z)
            row = {"coeffs": set_name, "step": step}
            for group, r in per_group.items():
                row[group] = {
                    "psnr_mean": round(statistics.fmean(r["psnr"]), 2),
                    **{f"z_min_{v}": round(min(r[v]), 1) for v, _, _ in VARIANTS},
                    "z_max_unmarked": round(max(r["unmarked"]), 1),
                }
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=8, help="main-size images per generator (8 kinds)")
    parser.add_argument("--compare", action="store_true", help="also measure plain dwtDct and dwtDctSvd")
    parser.add_argument("--sweep", action="store_true", help="also compare coefficient sets and steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "watermark.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    images = make_images(args.seed, per_kind=args.per_kind)
    report = {
        "benchmark": "watermark",
        "command": "python benchmarks/watermark.py"
        + (" --compare" if args.compare else "")
        + (" --sweep" if args.sweep else ""),
        "method": "brushwork: keyed dithered QIM on luma 8x8 DCT coefficients "
        f"{list(wm._COEFFS)}, step {wm._STEP}, correlation z >= {wm._Z_THRESHOLD}",
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "images": {
            "main": sum(g == "main" for _, g, _ in images),
            "small": sum(g == "small" for _, g, _ in images),
            "kinds": [g.__name__ for g in GENERATORS],
            "seed": args.seed,
        },
        "ours": bench_ours(images),
        "speed": time_512(),
        "sd_marks": bench_sd(images),
    }
    if args.compare:
        report["plain_invisible_watermark"] = {m: bench_plain(images, m) for m in ("dwtDct", "dwtDctSvd")}
    if args.sweep:
        report["sweep"] = {
            "chosen": {"coeffs": [list(c) for c in wm._COEFFS], "step": wm._STEP},
            "z_threshold": wm._Z_THRESHOLD,
            "rows": sweep(args.seed),
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()

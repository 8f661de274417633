"""Invisible watermark: ours survives PNG and JPEG q90, unmarked images stay clean, SD marks are recognised."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from brushwork.output import watermark as wm


def natural(seed: int, h: int, w: int) -> Image.Image:
    """Smooth 1/f noise in colour: a stand-in for a generated picture."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**1.3
        spectrum[0, 0] = 0
        c = np.fft.irfft2(spectrum, s=(h, w))
        channels.append((c - c.min()) / (np.ptp(c) or 1.0))
    return Image.fromarray((np.stack(channels, -1) * 200 + 25).astype(np.uint8), "RGB")


def shapes_on_white(h: int = 64, w: int = 64) -> Image.Image:
    """Like the mini model's pictures: flat shapes on a pure white background."""
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 10, 28, 34), fill=(230, 25, 25))
    draw.rectangle((36, 12, 58, 34), fill=(30, 60, 230))
    return image


def saved(image: Image.Image, fmt: str = "PNG", **kwargs) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = ((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean()
    return 10 * np.log10(255.0**2 / mse)


def sd_mark(image: Image.Image, payload: bytes) -> Image.Image:
    """Exactly what the official SD v1/v2 scripts do (put_watermark with dwtDct)."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    bgr = encoder.encode(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR), "dwtDct")
    return Image.fromarray(bgr[:, :, ::-1].copy(), "RGB")


@pytest.mark.parametrize(
    "image",
    [natural(1, 512, 512), natural(2, 376, 504), natural(3, 64, 64), shapes_on_white()],
    ids=["512x512", "504x376", "64x64", "64x64-white"],
)
def test_png_round_trip_detects_ours_and_changes_little(image):
    marked = wm.embed(image)
    assert marked.size == image.size and marked.mode == "RGB"
    assert psnr(image, marked) > 44
    result = wm.detect(saved(marked))
    assert result.found and result.kind == "brushwork"
    assert result.confidence > 0.8 and result.z >= wm._Z_THRESHOLD
    assert result.summary().startswith("brushwork watermark")
    assert not wm.detect(saved(image)).found


def test_jpeg_q90_of_marked_512_is_detected():
    marked = wm.embed(natural(4, 512, 512))
    result = wm.detect(saved(marked, "JPEG", quality=90))
    assert result.found and result.kind == "brushwork"


def test_unmarked_images_are_not_detected():
    for seed, (h, w) in enumerate([(512, 512), (256, 384), (64, 64)]):
        for image in (natural(10 + seed, h, w), saved(natural(10 + seed, h, w), "JPEG", quality=90)):
            result = wm.detect(image)
            assert not result.found and result.kind is None
            assert abs(result.z) < 4  # chance level: z is about N(0, 1) without the mark


def test_flat_image_is_not_detected():
    # A flat image decodes to the same value everywhere; the keyed dither keeps that at chance.
    assert not wm.detect(Image.new("RGB", (512, 512), (128, 128, 128))).found


def test_another_tag_is_not_ours_but_can_be_asked_for():
    marked = saved(wm.embed(natural(5, 256, 256), tag="someone-else"))
    assert not wm.detect(marked).found
    result = wm.detect(marked, tags=("brushwork", "someone-else"))
    assert result.found and result.kind == "someone-else"


@pytest.mark.parametrize("payload", [b"StableDiffusionV1", b"SDV2"])
def test_sd_marks_are_recognised(payload):
    result = wm.detect(saved(sd_mark(natural(6, 512, 512), payload)))
    assert result.found and result.kind == payload.decode()
    assert result.bits == len(payload) * 8


def test_ours_is_not_mistaken_for_sd_and_sd_not_for_ours():
    image = natural(7, 512, 512)
    assert wm.detect(saved(wm.embed(image))).kind == "brushwork"
    assert wm.detect(saved(sd_mark(image, b"StableDiffusionV1"))).kind == "StableDiffusionV1"


def test_too_small_images_are_left_alone_and_reported_honestly():
    tiny = natural(8, 24, 24)
    marked = wm.embed(tiny)
    assert np.array_equal(np.asarray(marked), np.asarray(tiny))
    result = wm.detect(marked)
    assert not result.found and "too small" in result.note and "too small" in result.summary()
    assert "JPEG" in wm.detect(natural(8, 40, 40)).note  # carries a mark, but JPEG may have lost it
    assert wm.detect(natural(8, 64, 64)).note == ""


def test_rgba_keeps_alpha_and_odd_border_is_untouched():
    image = natural(9, 100, 130).convert("RGBA")
    image.putalpha(Image.new("L", image.size, 200))
    marked = wm.embed(image)
    assert marked.mode == "RGBA" and marked.getchannel("A").getextrema() == (200, 200)
    before, after = np.asarray(image), np.asarray(marked)
    assert np.array_equal(before[96:], after[96:]) and np.array_equal(before[:, 128:], after[:, 128:])
    assert wm.detect(marked).found


def test_detect_files(tmp_path):
    ours, plain = tmp_path / "ours.png", tmp_path / "plain.jpg"
    wm.embed(natural(11, 128, 128)).save(ours)
    natural(11, 128, 128).save(plain, quality=90)
    results = wm.detect_files([ours, plain])
    assert [(p.name, d.found) for p, d in results] == [("ours.png", True), ("plain.jpg", False)]


def test_importing_the_module_imports_nothing_heavy():
    code = (
        "import sys, brushwork.output.watermark; "
        "print([m for m in ('numpy', 'cv2', 'imwatermark', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

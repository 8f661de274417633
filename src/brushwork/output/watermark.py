"""Invisible watermark: embed ours in every output image, and detect ours and Stable Diffusion's.

Our mark ("brushwork", or any tag) is a keyed, dithered quantization-index-modulation (QIM) mark
on the luma channel, in the same 8x8 DCT blocks that JPEG uses:

- every full 8x8 block of the image carries ``len(_COEFFS)`` bits, one in each of eight low-to-mid
  frequency DCT coefficients of luma Y (BT.601, as in JPEG); a coefficient is moved to the nearest
  point of a lattice of step ``_STEP`` shifted by a keyed dither and by half a step for a 1 bit;
- the bits and dithers are a pseudo-random sequence seeded by the tag (SHA-256 of key + tag), so the
  payload is spread over the whole image with massive redundancy, and on an unmarked image each
  coefficient agrees with the sequence by pure chance (the dither makes that exact, even for a flat
  image);
- detection correlates the soft decisions (cos of the lattice phase) with the expected bits; the sum
  has a known distribution on unmarked images (mean 0, variance n/2), so the z-score maps directly
  to a false-positive probability. ``found`` needs z >= ``_Z_THRESHOLD``: about 1e-9 by chance under
  the normal approximation, and at most exp(-9) ~ 1e-4 by Hoeffding's bound even for the smallest
  images (each term lies in [-1, 1]).

The change to luma is added equally to R, G and B, so colour is untouched. JPEG at quality 90 moves
these coefficients by about 1.6 at most (its quantization steps there are 2 to 3.2), less than the quarter
step (2.5) that would flip a bit; rounding to 8 bits moves them by about 0.3. The coefficients and
the step were chosen with ``benchmarks/watermark.py --sweep`` (PSNR against the detection margin
after JPEG q90/q75 on 64x64 images, the hardest case).

Why not plain invisible-watermark dwtDct: it needs at least 256x256 pixels, casts floats into uint8
without rounding or clipping, only uses the U channel, hides bits in the largest AC coefficient
of each block (whose position can change under the mark itself), and compares a decoded payload bit
for bit, so a single flipped bit out of 72 loses it. ``benchmarks/watermark.py`` measures both.

Limits: the mark survives lossless saves and JPEG re-encoding at the same size, not crops, resizes or
rotations (the block grid must stay where it was). Areas that are pure black or pure white cannot
carry it (luma cannot move past 0 or 255); it is still found as long as enough of the image is not
saturated (64x64 shapes on pure white: z ~20 as PNG, ~12 after JPEG q90, threshold 6). Shifting such
blocks away from 0/255 would double that margin but grey pure white by ~2 levels (PSNR 50 -> 40 dB on a
white-background image), so pure white and black are left pure.

Small images: below ``MIN_SIDE`` x ``MIN_SIDE`` pixels (16 full blocks) an image is too small to carry
the mark reliably: ``embed`` returns it unchanged and ``detect`` says so in ``Detection.note`` instead
of guessing. From 32x32 the mark survives lossless saves; a JPEG q90 copy keeps it reliably from
``JPEG_SAFE_SIDE`` (48x48; measured 36/36 there, 33/36 at 32x32 and 40x40), and ``detect`` says so in
the note when it finds nothing in an image smaller than that.

Stable Diffusion's own marks ("StableDiffusionV1" from the SD 1.x scripts, "SDV2" from the SD 2.x
scripts) are plain invisible-watermark dwtDct payloads; they are read with that library and accepted
with a bit-error threshold (see ``_SD_MARKS``).

Numpy, OpenCV and invisible-watermark are imported inside the functions, never at module import.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

DEFAULT_TAG = "brushwork"
_KEY = b"brushwork-watermark-v1:"

# Positions (row, col) in the 8x8 DCT block that carry bits: low-to-mid frequencies (finer grain than
# (0, 1)/(1, 0)), where JPEG's quantization steps are 2 to 3.2 at quality 90 and 5 to 8 at quality 75.
_COEFFS: tuple[tuple[int, int], ...] = ((1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2), (0, 3), (3, 0))
_STEP = 10.0
_BLOCK = 8
_Z_THRESHOLD = 6.0
MIN_BLOCKS = 16
MIN_SIDE = 32  # 32x32 pixels = 16 blocks
JPEG_SAFE_SIDE = 48

# Stable Diffusion's dwtDct payloads: name -> (bytes, maximum bit errors to accept).
# A random bit string passes with probability P(Bin(136, 1/2) <= 40) ~ 1e-6 and
# P(Bin(32, 1/2) <= 5) ~ 6e-5; on the benchmark's unmarked and brushwork-marked images the fewest
# bit errors seen were far above these (see "sd_marks" in benchmarks/results/watermark.json).
_SD_MARKS: dict[str, tuple[bytes, int]] = {
    "StableDiffusionV1": (b"StableDiffusionV1", 40),
    "SDV2": (b"SDV2", 5),
}
_SD_MIN_PIXELS = 256 * 256  # invisible-watermark refuses anything smaller


@dataclass(frozen=True)
class Detection:
    """What ``detect`` found in one image.

    found: the image carries a mark we recognise.
    kind: "brushwork" (or the tag that matched), "StableDiffusionV1", "SDV2", or None.
    confidence: for our mark, the fraction of the image's bits that agree with the mark (0.5 is
        chance, 1.0 is a pristine mark); for an SD mark, the fraction of payload bits decoded right.
    bit_errors / bits: the hard bit errors out of the bits compared, for the kind reported (for a
        negative answer: for our mark).
    z: our mark's correlation score in standard deviations (about 0 on unmarked images).
    note: why an answer could not be given (image too small), else "".
    """

    found: bool
    kind: str | None
    confidence: float
    bit_errors: int | None = None
    bits: int | None = None
    z: float | None = None
    note: str = ""

    def summary(self) -> str:
        """One line for people, e.g. for ``brushwork watermark detect``."""
        if self.found and self.z is not None:
            return f"{self.kind} watermark (z={self.z:.1f}, {self.confidence:.1%} of {self.bits} bits agree)"
        if self.found:
            return f"{self.kind} watermark (dwtDct, {self.bit_errors} of {self.bits} payload bits wrong)"
        return f"no known watermark ({self.note})" if self.note else "no known watermark"


# --- keyed sequence and transform ----------------------------------------------------------------


def _sequence(tag: str, blocks_y: int, blocks_x: int, ncoeffs: int):
    """The keyed bits (0/1) and dithers (in [0, 1)) for every carrying coefficient of the image."""
    import numpy as np

    if not tag:
        raise ValueError("the watermark tag must be a non-empty string")
    seed = int.from_bytes(hashlib.sha256(_KEY + tag.encode("utf-8")).digest()[:16], "big")
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = (blocks_y, blocks_x, ncoeffs)
    bits = rng.integers(0, 2, size=shape).astype(np.float64)
    dither = rng.random(size=shape)
    return bits, dither


def _dct_matrix():
    import numpy as np

    n = _BLOCK
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0, :] = np.sqrt(1.0 / n)
    return m


def _low_dct_rows(coeff_positions):
    """The first k rows of the DCT matrix, enough for every position used (k x k of the 8 x 8)."""
    k = 1 + max(max(r, c) for r, c in coeff_positions)
    return _dct_matrix()[:k]


def _luma(rgb):
    """BT.601 luma as float64, the Y that JPEG encodes."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _blocks(plane, blocks_y: int, blocks_x: int):
    """(H, W) -> (blocks_y, blocks_x, 8, 8) view of the full blocks."""
    b = _BLOCK
    return plane[: blocks_y * b, : blocks_x * b].reshape(blocks_y, b, blocks_x, b).swapaxes(1, 2)


def _rgb_array(image: Image.Image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.float64)


# --- our mark ------------------------------------------------------------------------------------


def embed(image: Image.Image, tag: str = DEFAULT_TAG) -> Image.Image:
    """Return a copy of ``image`` carrying the invisible mark for ``tag``; same size.

    RGB in, RGB out; RGBA keeps its alpha; any other mode is converted to RGB first. The change is a
    luma ripple of about one grey level (PSNR ~48 dB, see ``benchmarks/results/watermark.json``).
    Images smaller than ``MIN_SIDE`` x ``MIN_SIDE`` pixels cannot carry the mark reliably and are
    returned unchanged (as an RGB copy); ``detect`` reports them as too small rather than guessing.
    Only full 8x8 blocks carry the mark, so a border narrower than 8 pixels is left as it was.
    """
    import numpy as np
    from PIL import Image

    rgb = _rgb_array(image)
    marked = _embed_array(rgb, tag, _COEFFS, _STEP)
    out = Image.fromarray(rgb.astype(np.uint8) if marked is None else marked, "RGB")
    if image.mode == "RGBA":
        out.putalpha(image.getchannel("A"))
    return out


def _embed_array(rgb, tag: str, coeff_positions, step: float):
    """(H, W, 3) float RGB -> marked uint8 RGB, or None when the image is too small."""
    import numpy as np

    h, w = rgb.shape[:2]
    by, bx = h // _BLOCK, w // _BLOCK
    if by * bx < MIN_BLOCKS:
        return None
    bits, dither = _sequence(tag, by, bx, len(coeff_positions))
    d = _low_dct_rows(coeff_positions)
    coeffs = d @ _blocks(_luma(rgb), by, bx) @ d.T  # (by, bx, k, k): only the low k x k we use
    rows = np.array([r for r, _ in coeff_positions])
    cols = np.array([c for _, c in coeff_positions])
    current = coeffs[:, :, rows, cols]
    offset = dither + bits / 2.0
    target = (np.round(current / step - offset) + offset) * step
    delta_coeffs = np.zeros_like(coeffs)
    delta_coeffs[:, :, rows, cols] = target - current
    delta_blocks = d.T @ delta_coeffs @ d  # back to pixels, (by, bx, 8, 8)
    delta = np.zeros((h, w))
    delta[: by * _BLOCK, : bx * _BLOCK] = delta_blocks.swapaxes(1, 2).reshape(by * _BLOCK, bx * _BLOCK)
    # The same amount on R, G and B moves luma by exactly that amount and leaves chroma alone.
    return np.clip(np.rint(rgb + delta[..., None]), 0, 255).astype(np.uint8)


def _ours(rgb, tag: str, coeff_positions=_COEFFS, step: float = _STEP) -> Detection:
    import numpy as np

    h, w = rgb.shape[:2]
    by, bx = h // _BLOCK, w // _BLOCK
    if by * bx < MIN_BLOCKS:
        return Detection(
            False,
            None,
            0.0,
            note=f"image is {w}x{h}, too small to carry the watermark reliably (needs {MIN_SIDE}x{MIN_SIDE})",
        )
    bits, dither = _sequence(tag, by, bx, len(coeff_positions))
    d = _low_dct_rows(coeff_positions)
    coeffs = d @ _blocks(_luma(rgb), by, bx) @ d.T
    rows = np.array([r for r, _ in coeff_positions])
    cols = np.array([c for _, c in coeff_positions])
    phase = coeffs[:, :, rows, cols] / step - dither  # a 0 bit sits at integers, a 1 bit at halves
    soft = np.cos(2 * np.pi * phase)  # +1 for a clean 0 bit, -1 for a clean 1 bit
    expected_sign = 1.0 - 2.0 * bits
    n = soft.size
    z = float((soft * expected_sign).sum() / np.sqrt(n / 2.0))
    errors = int(((soft < 0) != (bits > 0.5)).sum())
    found = z >= _Z_THRESHOLD
    note = ""
    if not found and min(h, w) < JPEG_SAFE_SIDE:
        note = (
            f"image is {w}x{h}: big enough to carry the watermark, but below {JPEG_SAFE_SIDE}x{JPEG_SAFE_SIDE} "
            "a JPEG copy may have lost it"
        )
    return Detection(
        found=found,
        kind=tag if found else None,
        confidence=1.0 - errors / n,
        bit_errors=errors,
        bits=n,
        z=round(z, 2),
        note=note,
    )


# --- Stable Diffusion's marks --------------------------------------------------------------------


def _sd_bit_errors(rgb_uint8) -> dict[str, int]:
    """Bit errors of the plain dwtDct decode against each known SD payload."""
    import cv2
    import numpy as np
    from imwatermark import WatermarkDecoder

    bgr = cv2.cvtColor(rgb_uint8, cv2.COLOR_RGB2BGR)
    result = {}
    for name, (payload, _) in _SD_MARKS.items():
        nbits = len(payload) * 8
        decoded = WatermarkDecoder("bytes", nbits).decode(bgr, "dwtDct")
        got = np.unpackbits(np.frombuffer(decoded, dtype=np.uint8))
        want = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
        result[name] = int((got != want).sum())
    return result


def detect(image: Image.Image, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> Detection:
    """Say whether ``image`` carries our mark (for any of ``tags``) or a Stable Diffusion one.

    Our mark is checked first; SD marks only when ours is absent and the image is at least
    256x256 (invisible-watermark's own minimum; SD never wrote smaller images).
    """
    import numpy as np

    rgb = _rgb_array(image)
    best: Detection | None = None
    for tag in tags:
        found = _ours(rgb, tag)
        if found.found:
            return found
        if best is None or (found.z or 0.0) > (best.z or 0.0):
            best = found
    assert best is not None, "detect needs at least one tag"
    h, w = rgb.shape[:2]
    if h * w >= _SD_MIN_PIXELS:
        errors = _sd_bit_errors(rgb.astype(np.uint8))
        # An SD v2 mark read as v1 can come near the v1 threshold (both are ASCII: every 8th bit is 0),
        # so among the kinds that pass, report the one decoded with the smallest fraction of errors.
        passing = [
            (errors[name] / (len(payload) * 8), name)
            for name, (payload, max_errors) in _SD_MARKS.items()
            if errors[name] <= max_errors
        ]
        if passing:
            _, name = min(passing)
            nbits = len(_SD_MARKS[name][0]) * 8
            return Detection(True, name, 1.0 - errors[name] / nbits, bit_errors=errors[name], bits=nbits)
    return best


def detect_files(paths, tags: tuple[str, ...] = (DEFAULT_TAG,)) -> list[tuple[Path, Detection]]:
    """``detect`` for image files, in order; for ``brushwork watermark detect IMAGE...``.

    Unreadable files raise ``InvalidRequest`` naming the file (from ``open_image_file``).
    """
    from .images import open_image_file

    return [(Path(p), detect(open_image_file(p), tags=tags)) for p in paths]

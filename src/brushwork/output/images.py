"""Opening images from users safely: size limits, decompression bombs, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

from ..errors import InvalidRequest

DEFAULT_MAX_PIXELS = 4096 * 4096


HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # 16-bit and float greys: depth maps (MiDaS writes them)


def open_image_bytes(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, high_depth: bool = False):
    """Decode image bytes into an RGB(A) PIL image, refusing non-images and decompression bombs. ``high_depth``:
    a 16-bit or float grey image stays so (a depth map keeps its precision)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as probe:
            w, h = probe.size
            if w * h > max_pixels:
                raise InvalidRequest(
                    f"the image is {w}x{h} pixels, over the limit of {max_pixels} pixels; make it smaller"
                )
            probe.load()
            image = probe.copy()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest("the image is too large to decode safely (decompression bomb); make it smaller") from None
    except Exception:  # PIL raises many kinds for a broken file; all mean the same to the user
        raise InvalidRequest("the file is not an image that can be read (PNG, JPEG or WEBP expected)") from None
    if image.mode not in ("RGB", "RGBA", "L") and not (high_depth and image.mode in HIGH_DEPTH_MODES):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def open_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, high_depth: bool = False):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"image file not found: {path}") from None
    except OSError as err:
        raise InvalidRequest(f"cannot read image {path}: {err.strerror}") from err
    try:
        return open_image_bytes(raw, max_pixels, high_depth=high_depth)
    except InvalidRequest as err:
        raise InvalidRequest(f"{path}: {err}") from err

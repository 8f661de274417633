"""Writing results: PNGs with the ``parameters`` chunk, grids, names that never overwrite, atomic writes."""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from pathlib import Path

_NUMBERED = re.compile(r"^(\d{5})-")


def encode_png(image, infotext: str | None = None) -> bytes:
    """PNG bytes with the A1111 ``parameters`` tEXt chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_infotext(path_or_image) -> str | None:
    """The ``parameters`` text of a PNG (or JPEG/WEBP EXIF UserComment), or None."""
    from PIL import Image

    image = path_or_image if hasattr(path_or_image, "info") else Image.open(path_or_image)
    text = image.info.get("parameters")
    if text:
        return text
    exif = image.getexif().get_ifd(0x8769) if hasattr(image, "getexif") else {}
    comment = exif.get(0x9286) if exif else None  # UserComment
    if isinstance(comment, bytes):
        body = comment[8:] if comment[:8] in (b"UNICODE\0", b"ASCII\0\0\0") else comment
        enc = "utf-16-be" if comment[:8] == b"UNICODE\0" else "utf-8"
        return body.decode(enc, errors="replace").strip("\0") or None
    return comment or None


def write_atomic(data: bytes, folder: Path, stem_for) -> Path:
    """Write ``data`` as ``folder/stem_for(n)`` with the next free number n; never overwrite, never half-write."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        n = next_number(folder)
        while True:
            final = folder / stem_for(n)
            try:
                os.link(tmp, final)  # fails if the name exists: a concurrent writer took it
                break
            except FileExistsError:
                n += 1
    finally:
        os.unlink(tmp)
    return final


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def make_grid(images: list, rows: int | None = None):
    from PIL import Image

    n = len(images)
    cols = math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows)
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def save_result(result, outdir: str | Path, *, grid: bool = True, grid_rows: int | None = None) -> list[Path]:
    """Save every image of a result (and a grid of them when there is more than one)."""
    outdir = Path(outdir)
    mode = result.request.mode.value
    folder = outdir / mode
    paths = []
    for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
        data = encode_png(image, text)
        paths.append(write_atomic(data, folder, lambda n, s=seed: f"{n:05d}-{s}.png"))
    if grid and len(result.images) > 1:
        data = encode_png(make_grid(result.images, grid_rows), result.infotexts[0])
        paths.append(write_atomic(data, outdir / f"{mode}-grids", lambda n: f"{n:05d}-grid.png"))
    return paths

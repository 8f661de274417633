"""Writing results: PNGs with the ``parameters`` chunk, grids, names that never overwrite, atomic writes."""

from __future__ import annotations

import io
import math
import os
import re
import stat
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
    final, tmp = write_linked(data, folder, stem_for)
    os.unlink(tmp)
    return final


def write_linked(data: bytes, folder: Path, stem_for, *, tag: str | None = None) -> tuple[Path, Path]:
    """As ``write_atomic``, but the temporary file is kept, a second (hard) link to the final file: returns
    ``(final, tmp)`` and the caller unlinks ``tmp``. Until then ``tmp`` says the file is not yet on record:
    named ``.tmp-<tag>-*.png`` with a ``tag`` (a job id), see ``JOURNAL`` and ``clean_journal``."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{tag}-" if tag else ".tmp-", suffix=".png")
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
        _fsync_dir(folder)
    except BaseException:
        os.unlink(tmp)
        raise
    return final, Path(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make the new names in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TMP_GLOB = ".tmp-*.png"
JOURNAL = re.compile(r"^\.tmp-([0-9a-f]{32})-[^/]*\.png$")  # the job id that wrote it (write_linked's tag)


def clean_journal(outdir: str | Path, job_done, *, stale_after: float = 3600.0) -> dict[str, int]:
    """Undo what a killed writer left in ``outdir`` (before anything writes there again).

    A ``.tmp-<job id>-*.png`` is a picture of that job not yet on record (``write_linked``): when
    ``job_done(job_id)`` is False (the job runs again) the final file(s) it is linked to in the same
    folder are removed with it, so the rerun does not leave a second copy; when True (the job was
    recorded, only the unlink was lost) or None (unknown job) only the tmp goes. Any other
    ``.tmp-*.png`` (the command line's) is removed once older than ``stale_after`` seconds.
    Returns the counts removed: ``{"tmps": ..., "images": ...}``.
    """
    import time

    outdir = Path(outdir)
    removed = {"tmps": 0, "images": 0}
    if not outdir.is_dir():
        return removed
    now = time.time()
    for tmp in sorted(outdir.rglob(TMP_GLOB)):
        try:
            st = tmp.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        m = JOURNAL.match(tmp.name)
        if m is None:
            if now - st.st_mtime > stale_after:
                tmp.unlink(missing_ok=True)
                removed["tmps"] += 1
            continue
        if st.st_nlink > 1 and job_done(m.group(1)) is False:
            removed["images"] += remove_linked(tmp, st)
        tmp.unlink(missing_ok=True)
        removed["tmps"] += 1
    return removed


def remove_linked(tmp: Path, st=None) -> int:
    """Remove the other names of the file the journal link ``tmp`` is (its final picture(s) in the same folder,
    the same inode); ``tmp`` itself stays. Returns how many went."""
    st = st or tmp.lstat()
    removed = 0
    for other in tmp.parent.iterdir():
        if other == tmp:
            continue
        try:
            ost = other.lstat()
        except FileNotFoundError:
            continue
        if (ost.st_ino, ost.st_dev) == (st.st_ino, st.st_dev):
            other.unlink(missing_ok=True)
            removed += 1
    return removed


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
    """Save every image of a result (and a grid of them when there is more than one); with the request's
    ``save_depth``, the depth map it used too, beside the first picture (``<picture>-depth.png``)."""
    paths = [final for final, _ in _save(result, outdir, grid, grid_rows, None)]
    depth = getattr(result, "extras", {}).get("depth_map")
    if getattr(result.request, "save_depth", False) and depth is not None and paths:
        paths.append(save_beside(paths[0], "depth", encode_png(depth)))
    return paths


def save_beside(picture: Path, tag: str, data: bytes) -> Path:
    """``data`` as ``<picture's stem>-<tag>.png`` in its folder, written whole (a tmp file, then a link that fails
    rather than overwrite)."""
    final = picture.with_name(f"{picture.stem}-{tag}.png")
    fd, tmp = tempfile.mkstemp(dir=picture.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, final)
    finally:
        os.unlink(tmp)
    return final


def save_result_linked(result, outdir: str | Path, tag: str, *, grid: bool = False, grid_rows: int | None = None,
                       unique: str | None = None) -> list[tuple[Path, Path]]:
    """As ``save_result``, but each file keeps its ``.tmp-<tag>-*.png`` link (``write_linked``): returns
    ``(final, tmp)`` pairs; the caller unlinks the tmps once the files are on record. ``unique``: a last part of
    every name (``00012-1234-<unique>.png``), where folders numbered apart meet (``output/bucket.py``)."""
    return _save(result, outdir, grid, grid_rows, tag, unique)


def _save(result, outdir, grid, grid_rows, tag, unique=None) -> list[tuple[Path, Path]]:
    outdir = Path(outdir)
    mode = result.request.mode.value
    folder = outdir / mode
    written: list[tuple[Path, Path]] = []
    end = f"-{unique}" if unique else ""

    def write(data, where, stem_for):
        if tag is None:
            final = write_atomic(data, where, stem_for)
            written.append((final, final))
        else:
            written.append(write_linked(data, where, stem_for, tag=tag))

    try:
        for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
            write(encode_png(image, text), folder, lambda n, s=seed: f"{n:05d}-{s}{end}.png")
        if grid and len(result.images) > 1:
            data = encode_png(make_grid(result.images, grid_rows), result.infotexts[0])
            write(data, outdir / f"{mode}-grids", lambda n: f"{n:05d}-grid{end}.png")
    except BaseException:
        if tag is not None:  # not on record: nothing of a half-saved result stays behind
            for final, tmp in written:
                final.unlink(missing_ok=True)
                tmp.unlink(missing_ok=True)
        raise
    return written

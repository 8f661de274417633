"""outpaint: a bigger canvas, painted at its new borders, as an inpaint request (no mode of its own).

The canvas grows by ``left``/``right``/``top``/``bottom`` pixels (rounded up to a multiple of 8 on the right and
bottom); the new border is white in the mask, its pixels stretched from the picture's edges, and the request
inpaints it with ``inpainting_fill="fill"`` and a mask blur of 8. Imports no torch.
"""

from __future__ import annotations

import dataclasses

from ...request import GenerationRequest, InvalidRequest, Mode

OUTPAINT_MASK_BLUR = 8
MAX_BORDER = 2048


def outpaint_canvas(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0):
    """(canvas, mask): the picture on a canvas grown by these borders (to a multiple of 8), the border filled
    by stretching the picture's edge pixels, and the mask white exactly on the new pixels."""
    import numpy as np
    from PIL import Image

    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BORDER:
            raise InvalidRequest(f"outpaint {name} must be a whole number of pixels from 0 to {MAX_BORDER}, "
                                 f"got {value!r}")
    if not (left or right or top or bottom):
        raise InvalidRequest("outpaint needs a border to paint: give --left, --right, --top and/or --bottom pixels")
    image = image.convert("RGB")
    w, h = image.size
    right += -(w + left + right) % 8
    bottom += -(h + top + bottom) % 8
    arr = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(arr.shape[:2], 255, np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(arr), Image.fromarray(mask)


def outpaint_request(request: GenerationRequest, left: int = 0, right: int = 0, top: int = 0,
                     bottom: int = 0) -> GenerationRequest:
    """The inpaint request that outpaints ``request.init_image`` by these borders (its other fields kept)."""
    if request.init_image is None:
        raise InvalidRequest("outpaint needs an init image (--init-img)")
    canvas, mask = outpaint_canvas(request.init_image, left, right, top, bottom)
    return dataclasses.replace(request, mode=Mode.INPAINT, init_image=canvas, mask_image=mask,
                               width=canvas.width, height=canvas.height, mask_blur=OUTPAINT_MASK_BLUR,
                               inpainting_fill="fill", inpaint_full_res=False, inpainting_mask_invert=False)

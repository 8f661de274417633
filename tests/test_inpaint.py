"""Inpainting and outpainting: the overlay keeps the original outside the mask, 9-channel models match plain
diffusers, only masked, invert, outpaint, infotext, CLI and sdapi."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode
from brushwork.engine.tasks.inpaint import blurred, fill, latent_mask, mask_from, overlay


def _init(size=32):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _mask(size=32):
    m = np.zeros((size, size), np.uint8)
    m[8:20, 10:22] = 255
    return Image.fromarray(m)


def req(tiny, family="sd1", **kw):
    base = dict(prompt="a red circle", mode=Mode.INPAINT, model=str(tiny[family]["safetensors"]), steps=3, seed=7,
                init_image=_init(), mask_image=_mask(), watermark=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(image):
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_outside_the_blurred_mask_is_the_original_exactly(tiny, engine, family):
    result = engine.generate(req(tiny, family))
    out, init = px(result.images[0]), px(_init())
    outside = np.asarray(blurred(_mask(), 4)) == 0
    assert outside.sum() > 100
    assert np.array_equal(out[outside], init[outside])
    assert np.abs(out - init)[np.asarray(_mask()) == 255].mean() > 5
    assert "Mask blur: 4" in result.infotexts[0] and "Denoising strength: 0.75" in result.infotexts[0]


def test_the_9_channel_result_is_plain_diffusers_overlaid(tiny, engine):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline

    from brushwork.engine.prompts import encode
    from brushwork.models.load import load_single_file

    result = engine.generate(req(tiny, "sd1-inpaint", sampler="Euler a", cfg_scale=7.0, mask_blur=0))
    parts = load_single_file(tiny["sd1-inpaint"]["safetensors"])
    pipe = StableDiffusionInpaintPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = encode(parts.text_encoder, parts.tokenizer, "a red circle", "")
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=[_init()],
                      mask_image=[latent_mask(_mask(), 32, 32, factor)], height=32, width=32, strength=0.75,
                      num_inference_steps=3, guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(7)],
                      ).images[0]
    expected = overlay(_init(), theirs, _mask().point(lambda v: min(255, 2 * v)))
    assert np.abs(px(result.images[0]) - px(expected)).max() == 0


def test_only_masked_keeps_the_size_and_the_outside(tiny, engine):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    m = np.zeros((48, 64), np.uint8)
    m[20:30, 40:52] = 255
    result = engine.generate(req(tiny, "sd1-inpaint", init_image=init, mask_image=Image.fromarray(m), width=32,
                                 height=32, inpaint_full_res=True, inpaint_full_res_padding=4))
    assert result.images[0].size == (64, 48)
    outside = np.asarray(blurred(Image.fromarray(m), 4)) == 0
    assert np.array_equal(px(result.images[0])[outside], px(init)[outside])
    assert np.abs(px(result.images[0]) - px(init))[m == 255].mean() > 5
    assert "Inpaint area: Only masked, Masked area padding: 4" in result.infotexts[0]


def test_invert_repaints_the_black_part(tiny, engine):
    result = engine.generate(req(tiny, inpainting_mask_invert=True, mask_blur=0))
    out, init = px(result.images[0]), px(_init())
    inside = np.asarray(_mask()) == 255
    assert np.array_equal(out[inside], init[inside])
    assert np.abs(out - init)[~inside].mean() > 5
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]


def test_fill_keeps_unmasked_pixels_and_alpha_masks_use_alpha():
    filled = fill(_init(), _mask())
    keep = np.asarray(_mask()) == 0
    assert np.array_equal(px(filled)[keep], px(_init())[keep])
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 16, 32))
    assert np.asarray(mask_from(rgba))[:, :16].min() == 255 and np.asarray(mask_from(rgba))[:, 16:].max() == 0


def test_outpaint_grows_the_canvas_and_keeps_the_middle(tiny, engine):
    from brushwork.engine.tasks.outpaint import outpaint_request

    base = GenerationRequest(prompt="a field", model=str(tiny["sd1"]["safetensors"]), steps=3, seed=3,
                             init_image=_init(64), strength=0.8, watermark=False)
    request = outpaint_request(base, left=8, right=5, top=0, bottom=8)
    assert (request.width, request.height) == (80, 72)  # 64 + 13 -> 80, 64 + 8 -> 72
    assert request.inpainting_fill == "fill" and request.mask_blur == 8
    result = engine.generate(request.validate())
    out, init = px(result.images[0]), px(_init(64))
    assert out.shape == (72, 80, 3)
    assert np.array_equal(out[28:36, 36:44], init[28:36, 28:36])  # far from the borders: untouched
    assert np.abs(out[:64, :8] - init[:, :1]).mean() > 5  # the new left border was painted
    assert "Masked content: fill" in result.infotexts[0]


def test_infotext_round_trip(tiny, engine):
    from brushwork.output.infotext import request_from_infotext

    result = engine.generate(req(tiny, inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_fill="fill",
                                 mask_blur=2, inpainting_mask_invert=True, strength=0.6))
    back = request_from_infotext(result.infotexts[0])
    assert back["inpaint_full_res"] is True and back["inpaint_full_res_padding"] == 8
    assert back["inpainting_fill"] == "fill" and back["mask_blur"] == 2 and back["strength"] == 0.6
    assert back["inpainting_mask_invert"] is True


def test_refusals_are_one_line(tiny, engine):
    with pytest.raises(InvalidRequest, match="inpainting fill"):
        req(tiny, inpainting_fill="sparkles").validate()
    with pytest.raises(InvalidRequest, match="later version"):
        engine.generate(req(tiny, inpainting_fill="latent noise"))
    with pytest.raises(InvalidRequest, match="inpaint"):
        engine.generate(GenerationRequest(prompt="x", model=str(tiny["sd1-inpaint"]["safetensors"]), steps=1,
                                          width=32, height=32))


def test_cli_missing_mask_is_one_line(tmp_path):
    from click.testing import CliRunner

    from brushwork.cli import main

    _init().save(tmp_path / "in.png")
    res = CliRunner().invoke(main, ["inpaint", "a cat", "--init-img", str(tmp_path / "in.png")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: inpaint needs a mask image (--mask)")


def _b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_sdapi_img2img_with_a_mask_inpaints(tiny, tmp_path):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from serverkit import make_home, make_settings

    settings = make_settings(make_home(tmp_path / "srv", tiny["sd1"]["safetensors"], "tiny"), watermark=False)
    with TestClient(create_app(Engine(settings), settings)) as client:
        body = {"prompt": "a cat", "init_images": [_b64(_init())], "mask": _b64(_mask()), "steps": 3, "seed": 5,
                "width": 32, "height": 32, "inpainting_fill": 0, "inpaint_full_res": False, "mask_blur": 0}
        res = client.post("/sdapi/v1/img2img", json=body)
        assert res.status_code == 200, res.text
        out = px(Image.open(io.BytesIO(base64.b64decode(res.json()["images"][0]))).convert("RGB"))
        outside = np.asarray(_mask()) == 0
        assert np.array_equal(out[outside], px(_init())[outside])
        assert "Masked content: fill" in res.json()["info"]
        bad = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 7})
        assert bad.status_code >= 400 and "inpainting_fill" in bad.text


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_cfg_that_ends_early_inpaints_too(tiny, engine, family):
    """The inpainting pipeline doubles its mask (and masked latents) for CFG: when CFG ends, they halve too."""
    early = engine.generate(req(tiny, family, cfg_end=0.5, steps=4, batch_size=2))
    every = engine.generate(req(tiny, family, steps=4, batch_size=2))
    outside = np.asarray(blurred(_mask(), 4)) == 0
    for image in early.images:
        assert np.array_equal(px(image)[outside], px(_init())[outside])
    assert not np.array_equal(px(early.images[0]), px(every.images[0]))
    assert "CFG end: 0.5" in early.infotexts[0]

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


def test_the_watermark_marks_the_repainted_area_and_keeps_the_rest_exact(tiny, engine):
    big = np.zeros((64, 64), np.uint8)
    big[8:56, 8:56] = 255
    plain = engine.generate(req(tiny, init_image=_init(64), mask_image=Image.fromarray(big), width=64, height=64))
    marked = engine.generate(req(tiny, init_image=_init(64), mask_image=Image.fromarray(big), width=64, height=64,
                                 watermark=True))
    out, init = px(marked.images[0]), px(_init(64))
    outside = np.asarray(blurred(Image.fromarray(big), 4)) == 0
    assert np.array_equal(out[outside], init[outside])  # the watermark did not touch the kept pixels
    assert not np.array_equal(out, px(plain.images[0]))  # but it is in the repainted area


@pytest.mark.parametrize("family", ["sd1-inpaint", "sd2-inpaint"])
def test_the_9_channel_result_is_plain_diffusers_overlaid(tiny, engine, family):
    """SD1 inpainting (CLIP) and SD2 inpainting (OpenCLIP, linear projections) single files, in the original
    layout: the engine's pixels are plain diffusers' on the same weights, noise drawn on the CPU, seed + i."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline

    from brushwork.engine.prompts import encode
    from brushwork.models.load import load_single_file

    result = engine.generate(req(tiny, family, sampler="Euler a", cfg_scale=7.0, mask_blur=0, batch_size=2))
    parts = load_single_file(tiny[family]["safetensors"])
    assert parts.unet.config.in_channels == 9
    assert parts.unet.config.use_linear_projection is (family == "sd2-inpaint")
    pipe = StableDiffusionInpaintPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = encode(parts.text_encoder, parts.tokenizer, "a red circle", "")
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=cond.repeat(2, 1, 1), negative_prompt_embeds=uncond.repeat(2, 1, 1),
                      image=[_init()] * 2, mask_image=[latent_mask(_mask(), 32, 32, factor)] * 2, height=32,
                      width=32, strength=0.75, num_inference_steps=3, guidance_scale=7.0,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 8)]).images
    assert result.seeds == [7, 8]
    for ours, plain in zip(result.images, theirs, strict=True):
        expected = overlay(_init(), plain, _mask().point(lambda v: min(255, 2 * v)))
        assert np.abs(px(ours) - px(expected)).max() == 0
    assert not np.array_equal(px(result.images[0]), px(result.images[1]))


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
        for number, name in ((2, "latent noise"), (3, "latent nothing")):  # A1111's numbering
            res = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": number})
            assert res.status_code == 200, res.text
            out = px(Image.open(io.BytesIO(base64.b64decode(res.json()["images"][0]))).convert("RGB"))
            assert np.array_equal(out[outside], px(_init())[outside])
            assert f"Masked content: {name}" in res.json()["info"]
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


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_latent_noise_and_latent_nothing_repaint_only_the_mask(tiny, engine, family):
    original = engine.generate(req(tiny, family))
    noise = engine.generate(req(tiny, family, inpainting_fill="latent noise"))
    nothing = engine.generate(req(tiny, family, inpainting_fill="latent nothing"))
    again = engine.generate(req(tiny, family, inpainting_fill="latent noise"))
    init = px(_init())
    outside = np.asarray(blurred(_mask(), 4)) == 0
    inside = np.asarray(_mask()) == 255
    for result in (noise, nothing):
        out = px(result.images[0])
        assert np.array_equal(out[outside], init[outside])
        assert np.abs(out - px(original.images[0]))[inside].mean() > 2
    assert np.abs(px(noise.images[0]) - px(nothing.images[0]))[inside].mean() > 2
    assert np.array_equal(px(noise.images[0]), px(again.images[0]))
    assert "Masked content: latent noise" in noise.infotexts[0]
    assert "Masked content: latent nothing" in nothing.infotexts[0]


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_the_latent_route_with_the_latents_left_alone_is_original(tiny, engine, monkeypatch, family):
    """The latent fills encode the original themselves and hand the pipeline latents: with the fill made a
    no-op, that route gives "original"'s pixels exactly (same encoding, same draws from each generator)."""
    from brushwork.engine.tasks import inpaint

    original = engine.generate(req(tiny, family, sampler="Euler a", batch_size=2))
    monkeypatch.setattr(inpaint, "fill_latents", lambda latents, mask, fill_mode, noise=None: latents)
    untouched = engine.generate(req(tiny, family, sampler="Euler a", batch_size=2, inpainting_fill="latent noise"))
    for a, b in zip(original.images, untouched.images, strict=True):
        assert np.array_equal(px(a), px(b))


def test_latent_noise_is_each_seeds_cpu_noise_in_the_latent_mask(tiny, engine, monkeypatch):
    import torch

    from brushwork.engine.tasks import inpaint

    real, seen = inpaint.fill_latents, []

    def spy(latents, mask, fill_mode, noise=None):
        out = real(latents, mask, fill_mode, noise)
        seen.append((latents.clone(), mask.clone(), fill_mode, noise.clone(), out.clone()))
        return out

    monkeypatch.setattr(inpaint, "fill_latents", spy)
    engine.generate(req(tiny, inpainting_fill="latent noise", batch_size=2, mask_blur=0))
    (latents, mask, fill_mode, noise, out), = seen
    side = latents.shape[-1]  # the tiny VAE halves: 32 px -> 16 latent cells
    assert fill_mode == "latent noise" and latents.shape == noise.shape == (2, 4, side, side)
    for i, seed in enumerate((7, 8)):  # A1111's create_random_tensors: randn from each image's seed, on the CPU
        cpu = torch.randn((4, side, side), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(noise[i], cpu)
    cells = np.asarray(latent_mask(_mask(), 32, 32, 32 // side).resize((side, side), Image.Resampling.NEAREST))
    cells = torch.from_numpy(cells == 255)
    assert torch.equal(mask[0, 0], cells.float()) and 0 < cells.sum() < side * side
    assert torch.equal(out[:, :, ~cells], latents[:, :, ~cells])
    assert torch.equal(out[:, :, cells], noise[:, :, cells])
    nothing = real(latents, mask, "latent nothing")
    assert torch.equal(nothing[:, :, ~cells], latents[:, :, ~cells]) and nothing[:, :, cells].abs().max() == 0


@pytest.mark.parametrize("fill_mode", ["latent noise", "latent nothing"])
def test_latent_fills_round_trip_through_the_infotext(tiny, engine, fill_mode):
    from brushwork.output.infotext import request_from_infotext

    result = engine.generate(req(tiny, inpainting_fill=fill_mode, mask_blur=0, steps=1, strength=1.0))
    assert f"Masked content: {fill_mode}," in result.infotexts[0]
    back = request_from_infotext(result.infotexts[0])
    assert back["inpainting_fill"] == fill_mode and back["inpaint_full_res"] is False
    assert GenerationRequest(**{**back, "model": str(tiny["sd1"]["safetensors"]), "init_image": _init(),
                                "mask_image": _mask(), "mode": Mode.INPAINT}).validate().inpainting_fill == fill_mode

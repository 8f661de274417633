"""SDXL base, refiner and inpainting: detection from the keys, loading offline (single file and diffusers folder),
pixels equal to plain diffusers' SDXL pipelines, A1111's conditioning (two encoders, pooled text, an empty negative
prompt as zeros, long prompts), the refiner's switch, and the front ends (CLI, /sdapi, infotext)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode
from brushwork.errors import ModelError

SIZE = 64  # latents 32x32: the tiny UNet's three levels divide it


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """Tiny SDXL models in the real layouts: base / refiner / inpainting single files, base and refiner folders."""
    from tinymodels import save_xl_diffusers, save_xl_single

    root = tmp_path_factory.mktemp("xl")
    return {"base": save_xl_single(root / "tiny-xl.safetensors"),
            "ckpt": save_xl_single(root / "tiny-xl.ckpt"),
            "refiner": save_xl_single(root / "tiny-xl-refiner.safetensors", seed=1, refiner=True),
            "inpaint": save_xl_single(root / "tiny-xl-inpaint.safetensors", seed=2, in_channels=9),
            "folder": save_xl_diffusers(root / "tiny-xl-diffusers"),
            "refiner_folder": save_xl_diffusers(root / "tiny-xl-refiner-diffusers", seed=1, refiner=True)}


def req(model, **kw):
    base = dict(prompt="a red circle", model=str(model), steps=3, seed=7, width=SIZE, height=SIZE, watermark=False,
                cfg_scale=7.0)
    base.update(kw)
    return GenerationRequest(**base)


def px(image):
    return np.asarray(image.convert("RGB")).astype(int)


def _init(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _noise(seeds):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return gens, torch.stack([torch.randn((4, SIZE // 2, SIZE // 2), generator=g) for g in gens])


# ---- detection and loading -----------------------------------------------------------------------------------


def test_each_sdxl_layout_is_its_own_family_read_from_the_keys(xl):
    from brushwork.models.detect import detect
    from brushwork.models.families import FAMILIES
    from brushwork.models.load import read_shapes
    from brushwork.models.store import family_of_path
    from tinymodels import build_xl_components

    for row in FAMILIES:
        assert [f.name for f in FAMILIES if f.matches(row.text_encoder, row.unet_in_channels)] == [row.name]
    expected = {"base": "sdxl", "ckpt": "sdxl", "refiner": "sdxl-refiner", "inpaint": "sdxl-inpaint",
                "folder": "sdxl", "refiner_folder": "sdxl-refiner"}
    assert {kind: family_of_path(xl[kind]) for kind in expected} == expected
    found = detect(read_shapes(xl["base"])[0], "tiny-xl")
    unet = build_xl_components()[0].config
    for key in ("transformer_layers_per_block", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "cross_attention_dim", "attention_head_dim", "block_out_channels", "down_block_types"):
        assert list(np.atleast_1d(found.unet[key])) == list(np.atleast_1d(unet[key])), key
    assert found.unet["addition_embed_type"] == "text_time"
    assert found.text_encoder_2["num_hidden_layers"] == 3  # every bigG layer: the pooled text comes from the last
    assert found.text_encoder_2["projection_dim"] == 16 and found.vae["scaling_factor"] == 0.13025
    refiner = detect(read_shapes(xl["refiner"])[0], "tiny-xl-refiner")
    assert refiner.text_encoder == {} and refiner.unet["projection_class_embeddings_input_dim"] == 16 + 5 * 8


def test_single_files_and_folders_load_with_no_network_at_all(xl, monkeypatch):
    """diffusers' own single-file loader turns local_files_only off and downloads configs when it lacks one; ours
    reads every architecture from the weights and ships the rest, so a machine with no network loads SDXL."""
    from brushwork.models.load import load_diffusers_folder, load_single_file

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for kind, family, has_clip_l in (("base", "sdxl", True), ("ckpt", "sdxl", True),
                                     ("refiner", "sdxl-refiner", False), ("folder", "sdxl", True),
                                     ("refiner_folder", "sdxl-refiner", False)):
        load = load_diffusers_folder if xl[kind].is_dir() else load_single_file
        parts = load(xl[kind])
        assert parts.family.name == family
        assert (parts.text_encoder is not None) == has_clip_l and parts.text_encoder_2 is not None
        assert parts.vae.config.scaling_factor == 0.13025
        assert parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert load_single_file(xl["base"]).default_size == (1024, 1024)


def test_a_truncated_sdxl_file_names_what_is_missing(tmp_path, xl):
    from safetensors.torch import load_file, save_file

    from brushwork.models.load import load_single_file

    sd = load_file(str(xl["base"]))
    broken = tmp_path / "no-bigG.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.1.")}, str(broken))
    with pytest.raises(ModelError, match="OpenCLIP bigG"):
        load_single_file(broken)


# ---- the conditioning -------------------------------------------------------------------------------------------


def test_the_conditioning_is_diffusers_and_a1111s(xl):
    """Plain prompts: exactly diffusers' encode_prompt (both encoders' penultimate layers side by side, bigG's pooled
    text); an empty negative prompt is zeros (A1111's and diffusers' SDXL), another is not; a prompt over 75 tokens
    is two chunks for both encoders; emphasis weights the embeddings, never the pooled text."""
    from brushwork.engine.prompts import encode_xl
    from tinymodels import xl_pipeline

    pipe = xl_pipeline()
    encoders = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
    theirs = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True, negative_prompt=None)
    ours = encode_xl(encoders, "a red circle", "")
    for a, b in zip(theirs, ours, strict=True):
        assert torch.equal(a, b)
    assert not ours[1].any() and not ours[3].any()
    _, neg, _, neg_pooled = encode_xl(encoders, "a red circle", "blurry")
    assert neg.abs().sum() > 0 and neg_pooled.abs().sum() > 0
    long = encode_xl(encoders, ", ".join(["a red circle"] * 30), "")
    assert long[0].shape == (1, 154, 64) and long[1].shape == (1, 154, 64) and long[2].shape == (1, 16)
    weighted = encode_xl(encoders, "a (red:1.5) circle", "")
    assert not torch.equal(weighted[0], ours[0]) and torch.equal(weighted[2], ours[2])


# ---- parity with plain diffusers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "folder"])
def test_txt2img_is_plain_diffusers_sdxl(xl, engine, kind):
    """Batch of 2, seeds 7 and 8 on CPU generators, DDIM: the pixels of StableDiffusionXLPipeline on the same
    weights (an empty negative prompt: diffusers' None, zeros)."""
    from diffusers import DDIMScheduler

    from tinymodels import xl_pipeline

    result = engine.generate(req(xl[kind], sampler="DDIM", batch_size=2))
    pipe = xl_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    gens, latents = _noise((7, 8))
    theirs = pipe(prompt="a red circle", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=7.0,
                  latents=latents, height=SIZE, width=SIZE, generator=gens).images
    assert result.seeds == [7, 8]
    for ours, plain in zip(result.images, theirs, strict=True):
        assert np.array_equal(px(ours), px(plain))
    assert not np.array_equal(px(result.images[0]), px(result.images[1]))
    assert "Sampler: DDIM" in result.infotexts[0] and f"Size: {SIZE}x{SIZE}" in result.infotexts[0]


def test_img2img_is_plain_diffusers_sdxl(xl, engine):
    from diffusers import EulerAncestralDiscreteScheduler

    from brushwork.engine.prompts import encode_xl
    from tinymodels import xl_pipeline

    result = engine.generate(req(xl["base"], mode=Mode.IMG2IMG, init_image=_init(), strength=0.6,
                                 negative_prompt="blue"))
    base = xl_pipeline()
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pos, neg, pooled, neg_pooled = encode_xl([(pipe.text_encoder, pipe.tokenizer),
                                              (pipe.text_encoder_2, pipe.tokenizer_2)], "a red circle", "blue")
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=neg_pooled, image=_init(), strength=0.6, num_inference_steps=3,
                  guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(7)]).images
    assert np.array_equal(px(result.images[0]), px(theirs[0]))
    assert "Denoising strength: 0.6" in result.infotexts[0]


@pytest.mark.parametrize("kind", ["inpaint", "base"])
def test_sdxl_inpainting_keeps_the_outside_and_repaints_the_mask(xl, engine, kind):
    """SDXL inpainting (9 channels) and the base model (4, latent masking) through the inpaint task."""
    from brushwork.engine.tasks.inpaint import blurred

    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    result = engine.generate(req(xl[kind], mode=Mode.INPAINT, init_image=_init(), mask_image=Image.fromarray(mask)))
    out, init = px(result.images[0]), px(_init())
    outside = np.asarray(blurred(Image.fromarray(mask), 4)) == 0
    assert np.array_equal(out[outside], init[outside])
    assert np.abs(out - init)[mask == 255].mean() > 5


def test_the_sdxl_hires_fix_doubles_the_picture(xl, engine):
    result = engine.generate(req(xl["base"], steps=2, hires_scale=2.0, hires_steps=1, width=32, height=32))
    assert result.images[0].size == (64, 64) and "Hires upscale: 2" in result.infotexts[0]


# ---- the refiner --------------------------------------------------------------------------------------------------


def _run_with_previews(engine, request):
    previews = []
    result = engine.generate(request, progress=lambda info: previews.append((info.step, info.total,
                                                                             px(info.preview))),
                             want_previews=True)
    return result, previews


def test_the_refiner_changes_the_picture_after_the_switch_step_only(xl, engine):
    """4 Euler steps, switch at 0.5: the latents after steps 1-2 are the model's alone (the same as without a
    refiner), steps 3-4 are the refiner's; progress counts 4 steps in all; switch at 1 is no refiner."""
    plain, before = _run_with_previews(engine, req(xl["base"], steps=4, sampler="Euler"))
    refined, after = _run_with_previews(engine, req(xl["base"], steps=4, sampler="Euler", refiner=str(xl["refiner"]),
                                                    refiner_switch_at=0.5))
    assert [(s, t) for s, t, _ in after] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [np.array_equal(a[2], b[2]) for a, b in zip(before, after, strict=True)] == [True, True, False, False]
    assert not np.array_equal(px(plain.images[0]), px(refined.images[0]))
    text = refined.infotexts[0]
    assert "Refiner: tiny-xl-refiner [" in text and "Refiner switch at: 0.5" in text
    never = engine.generate(req(xl["base"], steps=4, sampler="Euler", refiner=str(xl["refiner"]),
                                refiner_switch_at=1.0))
    assert np.array_equal(px(never.images[0]), px(plain.images[0])) and "Refiner" not in never.infotexts[0]


def test_the_refiner_is_plain_diffusers_ensemble_of_experts(xl, engine):
    """diffusers' base with denoising_end, then its refiner img2img with denoising_start, on the same weights."""
    from diffusers import EulerDiscreteScheduler

    from tinymodels import xl_pipeline

    result = engine.generate(req(xl["base"], steps=4, sampler="Euler", refiner=str(xl["refiner_folder"]),
                                 refiner_switch_at=0.5))
    base, refiner = xl_pipeline(), xl_pipeline(seed=1, refiner=True)
    for pipe in (base, refiner):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gens, latents = _noise((7,))
    half = base(prompt="a red circle", num_inference_steps=4, guidance_scale=7.0, latents=latents, height=SIZE,
                width=SIZE, generator=gens, denoising_end=0.5, output_type="latent").images
    theirs = refiner(prompt="a red circle", image=half, num_inference_steps=4, guidance_scale=7.0,
                     denoising_start=0.5, generator=gens).images
    assert np.array_equal(px(result.images[0]), px(theirs[0]))


def test_refiner_mistakes_are_one_clear_line(xl, tiny, engine):
    with pytest.raises(InvalidRequest, match="SDXL refiner: it finishes another model's picture"):
        engine.generate(req(xl["refiner"]))
    with pytest.raises(ModelError, match="a refiner takes over from an SDXL model"):
        engine.generate(req(tiny["sd1"]["safetensors"], width=32, height=32, refiner=str(xl["refiner"])))
    with pytest.raises(ModelError, match="is not an SDXL model"):
        engine.generate(req(xl["base"], refiner=str(tiny["sd1"]["safetensors"])))
    with pytest.raises(InvalidRequest, match="refiner switch at must be above 0"):
        req(xl["base"], refiner=str(xl["refiner"]), refiner_switch_at=0).validate()
    with pytest.raises(InvalidRequest, match="hires fix runs without it"):
        engine.generate(req(xl["base"], width=32, height=32, hires_scale=2.0, refiner=str(xl["refiner"])))
    # img2img on the refiner alone is what A1111 users do with it
    result = engine.generate(req(xl["refiner"], mode=Mode.IMG2IMG, init_image=_init(), strength=0.3, steps=4))
    assert result.images[0].size == (SIZE, SIZE)


def test_the_refiner_round_trips_through_the_infotext(xl, engine):
    from brushwork.output.infotext import request_from_infotext

    result = engine.generate(req(xl["base"], steps=2, refiner=str(xl["refiner"]), refiner_switch_at=0.5))
    again = request_from_infotext(result.infotexts[0])
    assert again["refiner"].startswith("tiny-xl-refiner [") and again["refiner_switch_at"] == 0.5


def test_sdapi_and_the_cli_take_the_refiner(xl, tmp_path):
    import shutil

    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from brushwork import cli
    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from serverkit import decode_png, make_settings

    models = tmp_path / "models"
    models.mkdir()
    for kind in ("base", "refiner"):
        shutil.copyfile(xl[kind], models / xl[kind].name)
    paths = {"home": tmp_path / "home", "models": models, "outputs": tmp_path / "outputs"}
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as client:
        body = {"prompt": "a red circle", "steps": 2, "width": SIZE, "height": SIZE, "seed": 3,
                "override_settings": {"sd_model_checkpoint": "tiny-xl"},
                "refiner_checkpoint": "tiny-xl-refiner", "refiner_switch_at": 0.5}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert "Refiner switch at: 0.5" in decode_png(r.json()["images"][0]).info["parameters"]
        assert "Refiner: tiny-xl-refiner [" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "no-such-refiner"})
        assert r.status_code in (400, 404, 422) and "unknown model 'no-such-refiner'" in r.text
    out = tmp_path / "cli-out"
    run = CliRunner().invoke(cli.main, ["txt2img", "a red circle", "--model", str(xl["base"]), "--refiner",
                                        str(xl["refiner"]), "--refiner-switch-at", "0.5", "--steps", "2", "-W",
                                        str(SIZE), "-H", str(SIZE), "--seed", "1", "--outdir", str(out), "--quiet"])
    assert run.exit_code == 0, run.output
    png = next(out.rglob("*.png"))
    assert "Refiner switch at: 0.5" in Image.open(png).info["parameters"]


def test_an_sdxl_turbo_file_gets_the_few_step_defaults(tmp_path, engine):
    """SDXL-Turbo has SDXL's keys; its modelspec says turbo: 1 step, no CFG, 512x512, Euler a, as issue 14 asks."""
    from tinymodels import save_xl_single

    path = save_xl_single(tmp_path / "tiny-xl-turbo.safetensors",
                          metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/turbo"})
    result = engine.generate(GenerationRequest(prompt="a red circle", model=str(path), seed=1, watermark=False))
    assert result.images[0].size == (512, 512)
    text = result.infotexts[0]
    assert "Steps: 1," in text and "CFG scale: 1," in text and "Sampler: Euler a" in text
    assert any("Turbo" in note for note in result.notes)

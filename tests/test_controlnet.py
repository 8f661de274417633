"""ControlNet: tiny ControlNets in the original ``control_model.*`` layout (and bare, diffusers-named, diffusers folder)
loaded from the library's controlnet/ folder; pixels equal plain diffusers' ControlNet pipelines on the same weights
(one unit, several, guess mode, SDXL); weight 0 is no ControlNet; guidance end changes only the late steps; the
built-in preprocessors are the extension's (canny = cv2.Canny 100/200); the CLI, the native API and A1111's
ControlNet extension API (alwayson_scripts, /controlnet/*) drive it, and malformed units are 4xx."""

from __future__ import annotations

import base64
import functools
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode
from brushwork.errors import ModelError
from brushwork.request import ControlUnit

SIZE = 32  # latents 16x16 (the tiny VAE halves)
MAP = 64  # the preprocessors' tests: the smallest processor_res the extension's slider has
STEPS = 3
PROMPT = "a red circle"


def perturbed(model, seed: int, scale: float = 0.05):
    """A ControlNet made from a UNet starts with zero convolutions (it adds nothing): every tensor is moved, so that
    a mapping mistake anywhere changes the picture."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _unet(xl: bool = False):
    from tinymodels import build_components, build_xl_components

    return build_xl_components()[0] if xl else build_components("sd1")[0]


@functools.lru_cache(maxsize=None)
def build_controlnet(seed: int = 0):
    """A ControlNet of the tiny SD 1.x UNet (tinymodels), its conditioning embedding one stride-2 deep (the tiny VAE
    halves, where SD's divides by 8). Made once per seed: the tests only read it."""
    from diffusers import ControlNetModel

    return perturbed(ControlNetModel.from_unet(_unet(), conditioning_embedding_out_channels=(16, 32)), 100 + seed)


@functools.lru_cache(maxsize=None)
def build_xl_controlnet(seed: int = 0):
    from diffusers import ControlNetModel

    return perturbed(ControlNetModel.from_unet(_unet(True), conditioning_embedding_out_channels=(16, 32)), 200 + seed)


def save_original(model, path, *, prefix=True):
    from safetensors.torch import save_file

    from brushwork.models.convert import controlnet_to_original

    sd = controlnet_to_original(model.state_dict(), model.config, prefix="control_model." if prefix else "")
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A library: the tiny SD 1.x and SDXL models, and ControlNets in every format in its controlnet/ folder."""
    from safetensors.torch import save_file

    from tinymodels import save_single, save_xl_single

    root = tmp_path_factory.mktemp("cn")
    models = root / "home" / "models"
    cn = models / "controlnet"
    cn.mkdir(parents=True)
    save_single(models / "tiny.safetensors", "sd1")
    save_xl_single(models / "tiny-xl.safetensors")
    save_original(build_controlnet(0), cn / "tiny_canny.safetensors")
    (cn / "sub").mkdir()
    save_original(build_controlnet(1), cn / "sub" / "tiny_second.pth", prefix=False)  # bare keys, a pickle
    save_file({k: v.contiguous() for k, v in build_controlnet(2).state_dict().items()},
              str(cn / "tiny_diffusers_named.safetensors"))
    build_controlnet(3).save_pretrained(cn / "tiny_folder")
    save_original(build_xl_controlnet(0), cn / "tiny_xl_canny.safetensors")
    return {"home": root / "home", "models": models, "cn": cn}


@pytest.fixture(scope="module")
def engine(lib):
    from brushwork import Engine, Settings

    return Engine(Settings(home=lib["home"]))


def control_picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    """Blocks of colour (edges for canny), not noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((size // 8, size // 8, 1), np.uint8)))


def req(model="tiny", units=(), **kw):
    base = dict(prompt=PROMPT, model=model, steps=STEPS, seed=7, width=SIZE, height=SIZE, watermark=False,
                cfg_scale=7.0, sampler="DDIM", controlnet=list(units))
    base.update(kw)
    return GenerationRequest(**base)


def unit(model="tiny_canny", **kw):
    return ControlUnit(model=model, image=control_picture(kw.pop("picture", 0)), **kw)


def px(image):
    return np.asarray(image.convert("RGB")).astype(int)


def plain_pipe(engine, controlnet, *, xl=False):
    """Plain diffusers' ControlNet pipeline over the engine's loaded components and the same scheduler. The
    ControlNets are the ones brushwork loaded (their tensors are diffusers' own: test_every_format_loads_back_...;
    a fresh ControlNetModel of the same tensors can differ in the last bit of a float, e.g. by memory alignment)."""
    import diffusers

    from brushwork.engine.samplers import build_scheduler

    parts = engine._loaded.parts
    scheduler = build_scheduler(parts.scheduler_config, "DDIM", "Automatic")
    if xl:
        pipe = diffusers.StableDiffusionXLControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, controlnet=controlnet,
            scheduler=scheduler, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(engine, controlnet, image, seeds=(7,), xl=False, **kw):
    """diffusers' pictures for the seeds (CPU noise, seed + i), with the prompt embeddings brushwork reads."""
    from brushwork.engine.prompts import encode, encode_xl

    pipe = plain_pipe(engine, controlnet, xl=xl)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = torch.stack([torch.randn((4, SIZE // 2, SIZE // 2), generator=g) for g in gens])
    if xl:
        pos, neg, pooled, neg_pooled = encode_xl([(pipe.text_encoder, pipe.tokenizer),
                                                  (pipe.text_encoder_2, pipe.tokenizer_2)], PROMPT, "")
        embeds = dict(pooled_prompt_embeds=pooled.repeat(len(seeds), 1),
                      negative_pooled_prompt_embeds=neg_pooled.repeat(len(seeds), 1))
    else:
        pos, neg = encode(pipe.text_encoder, pipe.tokenizer, PROMPT, "")
        embeds = {}
    with torch.inference_mode():
        return pipe(prompt_embeds=pos.repeat(len(seeds), 1, 1), negative_prompt_embeds=neg.repeat(len(seeds), 1, 1),
                    image=image, num_inference_steps=STEPS, guidance_scale=7.0, latents=latents, generator=gens,
                    height=SIZE, width=SIZE, **embeds, **kw).images


def loaded(engine, name):
    """The ControlNetModel brushwork loaded from the library file ``name``."""
    library = engine.controlnets
    return library.load(library.find(name), engine._loaded.parts, engine._loaded.policy)[0]


# ---- the library and loading ------------------------------------------------------------------------------------


def test_controlnets_are_listed_by_a1111_title_and_are_never_checkpoints(engine, lib):
    from brushwork.models.store import legacy_hash

    files = engine.controlnets.files()
    names = [f.name for f in files]
    assert names == ["tiny_canny", "tiny_diffusers_named", "tiny_folder", "tiny_second", "tiny_xl_canny"]
    canny = files[0]
    assert canny.title == f"tiny_canny [{legacy_hash(lib['cn'] / 'tiny_canny.safetensors')}]"
    for spelling in (canny.title, "tiny_canny", "TINY_CANNY", "tiny_canny.safetensors", "tiny_canny [00000000]"):
        assert engine.controlnets.find(spelling).path == canny.path
    assert engine.controlnets.find("tiny_folder").format == "diffusers"
    assert {e.name for e in engine.store.scan() if not e.bundled} == {"tiny", "tiny-xl"}
    with pytest.raises(ModelError, match="not found in .*controlnet.*has: tiny_canny"):
        engine.controlnets.find("nope")


@pytest.mark.parametrize("name, seed", [("tiny_canny", 0), ("tiny_second", 1), ("tiny_diffusers_named", 2),
                                        ("tiny_folder", 3)])
def test_every_format_loads_back_the_same_tensors_and_architecture(engine, name, seed):
    """The original layout (prefixed .safetensors, bare .pth), a diffusers-named single file and a folder: the
    architecture read from the shapes and every tensor as diffusers has it."""
    engine.load(req())
    ours = loaded(engine, name)
    theirs = build_controlnet(seed)
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "conditioning_embedding_out_channels", "use_linear_projection"):
        assert list(np.atleast_1d(ours.config[key])) == list(np.atleast_1d(theirs.config[key])), key
    mine, want = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == want.keys()
    assert all(torch.equal(mine[k], want[k]) for k in want)


def test_a_controlnet_for_another_family_is_refused_in_one_line(engine):
    with pytest.raises(ModelError, match=r"tiny_xl_canny is a ControlNet for SDXL .*tiny is Stable Diffusion 1\.x"):
        engine.generate(req(units=[unit("tiny_xl_canny")]))
    with pytest.raises(ModelError, match=r"tiny_canny is a ControlNet for .*tiny-xl is Stable Diffusion XL"):
        engine.generate(req("tiny-xl", units=[unit("tiny_canny")]))


def test_a_checkpoint_or_other_file_is_not_a_controlnet(engine, lib, tmp_path):
    from brushwork.models.controlnets import to_diffusers

    with pytest.raises(ModelError, match="Stable Diffusion checkpoint, not a ControlNet"):
        to_diffusers({"model.diffusion_model.input_blocks.0.0.weight": (1,)}, "x")
    with pytest.raises(ModelError, match="not a ControlNet I know"):
        to_diffusers({"lora_unet_down.weight": (1,)}, "x")


# ---- pictures: plain diffusers' ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, seed", [("tiny_canny", 0), ("tiny_folder", 3)])
def test_txt2img_with_a_unit_is_plain_diffusers_controlnet(engine, name, seed):
    """A batch of 2 (seeds 7, 8): the pixels of StableDiffusionControlNetPipeline on the same weights."""
    result = engine.generate(req(units=[unit(name)], batch_size=2))
    theirs = plain(engine, loaded(engine, name), control_picture(), seeds=(7, 8))
    for ours, want in zip(result.images, theirs, strict=True):
        assert np.array_equal(px(ours), px(want))
    without = engine.generate(req(batch_size=2))
    assert not np.array_equal(px(without.images[0]), px(result.images[0]))


def test_weight_zero_is_exactly_no_controlnet(engine):
    without = engine.generate(req())
    zero = engine.generate(req(units=[unit(weight=0)]))
    assert np.array_equal(px(zero.images[0]), px(without.images[0]))
    assert "Weight: 0.0" in zero.infotexts[0]


def test_two_units_are_diffusers_multicontrolnet_with_their_own_weights_and_ends(engine):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    units = [unit(weight=0.7), unit("tiny_second", picture=1, weight=1.3, guidance_end=0.5)]
    result = engine.generate(req(units=units))
    theirs = plain(engine, MultiControlNetModel([loaded(engine, "tiny_canny"), loaded(engine, "tiny_second")]),
                   [control_picture(0), control_picture(1)], controlnet_conditioning_scale=[0.7, 1.3],
                   control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 0.5])
    assert np.array_equal(px(result.images[0]), px(theirs[0]))
    assert 'ControlNet 1: "Module: none, Model: tiny_second [' in result.infotexts[0]


def test_guidance_end_changes_only_the_late_steps(engine):
    """Stopped after 2 of 4 steps, guidance end 0.5 and 1 are the same picture; finished, they differ."""
    from brushwork.engine.tasks import RunControl

    def stopped_after_two(units):
        interrupt = threading.Event()

        def progress(info):
            if info.step == 1:
                interrupt.set()  # checked at the next step's end: stops after step 2

        result = engine.generate(req(units=units, steps=4), control=RunControl(progress=progress,
                                                                               interrupt=interrupt))
        assert result.interrupted
        return px(result.images[0])

    early, full = [unit(guidance_end=0.5)], [unit()]
    assert np.array_equal(stopped_after_two(early), stopped_after_two(full))
    assert not np.array_equal(px(engine.generate(req(units=early, steps=4)).images[0]),
                              px(engine.generate(req(units=full, steps=4)).images[0]))


def test_controlnet_is_more_important_is_diffusers_guess_mode(engine):
    """Every unit in "ControlNet is more important": diffusers' guess mode exactly. Mixed with a Balanced unit (here
    at weight 0) the unit's forward does the same per unit: the same picture up to rounding."""
    result = engine.generate(req(units=[unit(control_mode="ControlNet is more important")]))
    theirs = plain(engine, loaded(engine, "tiny_canny"), control_picture(), guess_mode=True)
    assert np.array_equal(px(result.images[0]), px(theirs[0]))
    assert "Control Mode: ControlNet is more important" in result.infotexts[0]
    mixed = engine.generate(req(units=[unit(control_mode=2), unit("tiny_second", weight=0)]))
    assert np.abs(px(mixed.images[0]) - px(result.images[0])).max() <= 1
    balanced = engine.generate(req(units=[unit()]))
    assert not np.array_equal(px(balanced.images[0]), px(result.images[0]))


def test_my_prompt_is_more_important_scales_the_residuals_softly(engine):
    """The extension's soft injection, weight * 0.825 ** (12 - i): diffusers' ControlNet guess-mode scales, for the
    prompt and the negative prompt alike."""
    from brushwork.engine.controlnet import PROMPT_MODE, Controls, _soft_forward

    engine.load(req())
    model = loaded(engine, "tiny_canny")
    sample = torch.randn(2, 4, 8, 8)
    args = dict(timestep=torch.tensor(10), encoder_hidden_states=torch.randn(2, 77, 32),
                controlnet_cond=torch.rand(2, 3, 16, 16), conditioning_scale=0.8, return_dict=False)

    class Pipe:
        do_classifier_free_guidance = True

    with torch.inference_mode():
        plain_down, _ = model(sample, **args)
        soft_down, _ = _soft_forward(model, False, Pipe())(sample, **args)
        scales = torch.logspace(-1, 0, len(plain_down) + 1)
        for i, (p, s) in enumerate(zip(plain_down, soft_down, strict=True)):
            assert torch.allclose(s, p * scales[i], atol=1e-6)
        assert abs(scales[0].item() - 0.825 ** 12) < 2e-3
        cond_down, cond_mid = _soft_forward(model, True, Pipe())(sample, **args)
        assert not cond_down[0][0].any() and not cond_mid[0].any() and cond_down[0][1].any()
    result = engine.generate(req(units=[unit(control_mode=PROMPT_MODE)]))
    balanced = engine.generate(req(units=[unit()]))
    assert not np.array_equal(px(result.images[0]), px(balanced.images[0]))
    assert Controls.__name__ and "Control Mode: My prompt is more important" in result.infotexts[0]


def test_sdxl_controlnet_loads_and_is_plain_diffusers(engine):
    result = engine.generate(req("tiny-xl", units=[unit("tiny_xl_canny")]))
    theirs = plain(engine, loaded(engine, "tiny_xl_canny"), control_picture(), xl=True)
    assert np.array_equal(px(result.images[0]), px(theirs[0]))
    assert loaded(engine, "tiny_xl_canny").config.addition_embed_type == "text_time"
    img2img = engine.generate(req("tiny-xl", mode=Mode.IMG2IMG, init_image=control_picture(5), strength=0.7,
                                  units=[ControlUnit(model="tiny_xl_canny", module="invert")]))
    assert img2img.images[0].size == (SIZE, SIZE) and "ControlNet 0" in img2img.infotexts[0]


def test_img2img_and_inpaint_take_units_and_a_unit_without_a_picture_follows_the_init_image(engine):
    init = control_picture(5)
    given = engine.generate(req(mode=Mode.IMG2IMG, init_image=init, strength=0.7,
                                units=[ControlUnit(model="tiny_canny", image=init)]))
    implicit = engine.generate(req(mode=Mode.IMG2IMG, init_image=init, strength=0.7,
                                   units=[ControlUnit(model="tiny_canny")]))
    assert np.array_equal(px(given.images[0]), px(implicit.images[0]))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    painted = engine.generate(req(mode=Mode.INPAINT, init_image=init, mask_image=Image.fromarray(mask), mask_blur=0,
                                  units=[ControlUnit(model="tiny_canny", module="invert")]))
    out = px(painted.images[0])
    assert np.array_equal(out[mask == 0], px(init)[mask == 0])
    assert np.abs(out - px(init))[mask == 255].mean() > 5
    with pytest.raises(InvalidRequest, match="ControlNet unit 0 has no picture"):
        engine.generate(req(units=[ControlUnit(model="tiny_canny")]))


def test_the_hires_fix_gets_the_map_at_its_size(engine):
    result = engine.generate(req(units=[unit()], width=SIZE // 2, height=SIZE // 2, hires_scale=2,
                                 hires_strength=0.5, steps=2))
    assert result.images[0].size == (SIZE, SIZE)
    assert [m.size for m in result.extras["controlnet_maps"]] == [(SIZE, SIZE)]


def test_combinations_that_cannot_work_are_refused(engine):
    with pytest.raises(InvalidRequest, match="fast mode"):
        engine.generate(req(units=[unit()], fast=3))
    with pytest.raises(InvalidRequest, match="depth2img runs without it"):
        req(units=[unit()], mode=Mode.DEPTH2IMG, init_image=control_picture()).validate()
    with pytest.raises(InvalidRequest, match="needs model weights .*dpt_hybrid-midas-501f0c75.pt.*lllyasviel"):
        engine.generate(req(units=[unit(module="depth_midas")]))


# ---- the preprocessors -------------------------------------------------------------------------------------------


def test_canny_is_cv2_canny_with_the_extensions_thresholds():
    import cv2

    from brushwork.engine import preprocessors

    picture = control_picture(3, MAP)
    rgb = np.asarray(picture)
    for u in (ControlUnit(model="x", module="canny", processor_res=MAP), ControlUnit(model="x", module="canny",
                                                                                     pixel_perfect=True)):
        ours = np.asarray(preprocessors.control_map(u.validate(), picture, MAP, MAP))
        assert np.array_equal(ours, np.stack([cv2.Canny(rgb, 100, 200)] * 3, axis=2))
    custom = preprocessors.control_map(ControlUnit(model="x", module="canny", processor_res=MAP, threshold_a=10,
                                                   threshold_b=20).validate(), picture, MAP, MAP)
    assert np.array_equal(np.asarray(custom)[..., 0], cv2.Canny(rgb, 10, 20))
    assert np.array_equal(np.asarray(preprocessors.control_map(ControlUnit(model="x", module="invert").validate(),
                                                               picture, MAP, MAP)), 255 - rgb)


def test_the_other_built_in_preprocessors_follow_the_extension():
    import cv2

    from brushwork.engine import preprocessors

    picture = control_picture(4, MAP)
    rgb = np.asarray(picture)

    def run(module, **kw):
        return np.asarray(preprocessors.control_map(ControlUnit(model="x", module=module, processor_res=MAP,
                                                                **kw).validate(), picture, MAP, MAP))

    assert np.array_equal(run("blur"), cv2.GaussianBlur(rgb, (0, 0), 9.0))
    flat = np.asarray(preprocessors.control_map(ControlUnit(model="x", module="scribble_xdog").validate(),
                                                Image.new("RGB", (MAP, MAP), (90, 90, 90)), MAP, MAP))
    assert not flat.any()  # no edges, no lines
    lines = run("scribble_xdog")
    assert set(np.unique(lines)) == {0, 255} and (run("scribble_xdog", threshold_a=8) > 0).sum() > (lines > 0).sum()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (MAP, MAP, 3), dtype=np.uint8))
    tiled = np.asarray(preprocessors.control_map(ControlUnit(model="x", module="tile_resample", threshold_a=2)
                                                 .validate(), noise, MAP, MAP))
    assert tiled.shape == rgb.shape and not np.array_equal(tiled, np.asarray(noise))
    assert np.array_equal(run("tile_resample"), rgb) and np.array_equal(run("none"), rgb)


def test_depth_midas_runs_the_annotator_file_when_it_is_in_the_library(tmp_path):
    """The extension's dpt_hybrid-midas-501f0c75.pt (MiDaS's own names, no prefix) in annotators/: its DPT-Hybrid's
    depth at processor_res, (d - min) / (max - min) * 255 as a grey picture; without the file, the one-line error."""
    from brushwork.engine import preprocessors
    from brushwork.engine.tasks.depth2img import predict_depth
    from brushwork.models.dpt import to_original
    from tinymodels import build_dpt_hybrid

    picture = control_picture(5, 96).resize((120, 96))  # 5:4: processor_res 64 -> 80x64, padded to 128x64
    assert preprocessors.find("depth", tmp_path).run is None
    with pytest.raises(InvalidRequest, match="needs model weights .*dpt_hybrid-midas-501f0c75.pt.*lllyasviel.*"
                                             "annotators"):
        preprocessors.detect(preprocessors.find("depth_midas", tmp_path), picture, MAP)

    dpt = build_dpt_hybrid(seed=3)
    sd = to_original(dpt.state_dict(), prefix="")
    sd["pretrained.model.head.weight"], sd["pretrained.model.head.bias"] = torch.randn(10, 32), torch.zeros(10)
    (tmp_path / "Annotators" / "midas").mkdir(parents=True)
    path = tmp_path / "Annotators" / "midas" / "dpt_hybrid-midas-501f0c75.pt"
    torch.save(sd, path)
    found = preprocessors.find("depth_midas", tmp_path)
    assert found.run is not None and not found.model_free and preprocessors.annotator_file(found, tmp_path) == path
    ours = preprocessors.detect(found, picture, MAP)
    assert ours.shape == (64, 80, 3) and (ours[..., 0] == ours[..., 2]).all()

    padded, remove_pad = preprocessors.resize_with_pad(preprocessors.hwc3(picture), MAP)
    with torch.inference_mode():
        depth = predict_depth(dpt, torch.from_numpy(padded).float().permute(2, 0, 1)[None] / 127.5 - 1.0)[0]
    depth = remove_pad(((depth - depth.min()) / (depth.max() - depth.min())).numpy())
    assert ours.min() == 0 and ours.max() >= 250  # the whole range, as the extension's
    assert np.abs(ours[..., 0].astype(float) - depth * 255).max() <= 1.0
    assert preprocessors.midas_model(path) is preprocessors.midas_model(path)  # loaded once
    fitted = preprocessors.control_map(ControlUnit(model="x", module="depth_midas", processor_res=MAP).validate(),
                                       picture, SIZE, SIZE, tmp_path)
    assert fitted.size == (SIZE, SIZE)


def test_resize_modes_and_pixel_perfect_are_the_extensions():
    from brushwork.engine import preprocessors

    wide = Image.fromarray(np.kron(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), np.ones((32, 32, 1), np.uint8)))
    u = ControlUnit(model="x", module="none")
    crop = np.asarray(preprocessors.control_map(dataclass_replace(u, resize_mode="Crop and Resize"), wide, 32, 32))
    assert crop.shape == (32, 32, 3) and crop[:, :16, 0].min() == 255 and crop[:, 16:, 2].min() == 255
    fill = np.asarray(preprocessors.control_map(dataclass_replace(u, resize_mode=2), wide, 32, 32))
    assert fill.shape == (32, 32, 3) and fill[16, 2].tolist() == [255, 0, 0]  # the middle band is the picture
    stretch = np.asarray(preprocessors.control_map(dataclass_replace(u, resize_mode="Just Resize"), wide, 32, 64))
    assert stretch.shape == (64, 32, 3)
    rgb = np.zeros((300, 400, 3), np.uint8)
    assert preprocessors.pixel_perfect_resolution(rgb, 512, 512, "Crop and Resize") == 512
    assert preprocessors.pixel_perfect_resolution(rgb, 512, 512, "Resize and Fill") == 384


def dataclass_replace(u, **kw):
    import dataclasses

    return dataclasses.replace(u, **kw).validate()


@pytest.mark.parametrize("fields, words", [
    ({"module": "sobel"}, "unknown ControlNet preprocessor"),
    ({"weight": 3}, "weight must be between 0 and 2"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance start 0.8 is after guidance end"),
    ({"control_mode": "Louder"}, "unknown ControlNet unit 0 control mode"),
    ({"resize_mode": 7}, "resize mode"),
    ({"module": "canny", "threshold_a": 999}, "threshold_a .* must be from 1 to 255"),
    ({"processor_res": 10}, "processor_res must be a whole number from 64"),
    ({"model": ""}, "names no ControlNet model"),
])
def test_a_bad_unit_is_one_line(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        ControlUnit(**{"model": "x", **fields}).validate(0)


def test_the_infotext_is_the_extensions(engine):
    from brushwork.engine.controlnet import parse_unit_text
    from brushwork.output.infotext import parse_infotext

    result = engine.generate(req(units=[unit(module="canny")]))
    title = engine.controlnets.find("tiny_canny").title
    expected = (f"Module: canny, Model: {title}, Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, "
                "Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, "
                "Pixel Perfect: False, Control Mode: Balanced")
    assert f'ControlNet 0: "{expected}"' in result.infotexts[0]
    read = parse_infotext(result.infotexts[0])["ControlNet 0"]
    assert read == expected
    assert parse_unit_text(read) == {"module": "canny", "model": title, "weight": 1.0, "resize_mode": "Crop and Resize",
                                     "processor_res": 512, "threshold_a": 100.0, "threshold_b": 200.0,
                                     "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
                                     "control_mode": "Balanced"}


# ---- front ends ------------------------------------------------------------------------------------------------


def test_the_cli_pairs_units_by_position(lib, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from brushwork.cli import main

    monkeypatch.setenv("BRUSHWORK_MODELS_DIR", str(lib["models"]))
    control_picture(0).save(tmp_path / "a.png")
    control_picture(1).save(tmp_path / "b.png")
    base = ["txt2img", PROMPT, "--model", "tiny", "-W", SIZE, "-H", SIZE, "--steps", 2, "--seed", 3, "--quiet",
            "--outdir", tmp_path / "out", "--no-watermark"]
    run = CliRunner().invoke(main, [str(a) for a in base + [
        "--control", tmp_path / "a.png", "--control", tmp_path / "b.png", "--control-model", "tiny_canny",
        "--control-model", lib["cn"] / "sub" / "tiny_second.pth", "--control-preprocessor", "canny",
        "--control-weight", 0.5, "--control-weight", 1.2, "--control-end", 0.8, "--control-mode", "prompt"]])
    assert run.exit_code == 0, run.output
    text = Image.open(run.output.strip().splitlines()[-1]).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in text and "Weight: 0.5" in text
    assert "ControlNet 1" in text and "Weight: 1.2" in text and "Guidance End: 0.8" in text
    assert "Control Mode: My prompt is more important" in text
    bad = CliRunner().invoke(main, [str(a) for a in base + [
        "--control", tmp_path / "a.png", "--control", tmp_path / "b.png", "--control-model", "tiny_canny",
        "--control-weight", 1, "--control-weight", 1, "--control-weight", 1]])
    assert bad.exit_code == 1 and "--control-weight is given 3 times for 2 ControlNet units" in bad.output
    nomodel = CliRunner().invoke(main, [str(a) for a in base + ["--control-weight", 1]])
    assert nomodel.exit_code == 1 and "--control IMAGE --control-model NAME" in nomodel.output


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def client(engine, lib):
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app

    app = create_app(engine, engine.settings)
    with TestClient(app) as c:
        yield c


SDAPI = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": 2, "seed": 4, "sampler_name": "DDIM",
         "override_settings": {"sd_model_checkpoint": "tiny"}}


def test_the_a1111_extensions_units_drive_sdapi_txt2img(client, engine):
    cn_unit = {"enabled": True, "module": "canny", "model": engine.controlnets.find("tiny_canny").title,
               "weight": 0.9, "image": b64(control_picture()), "resize_mode": 1, "processor_res": 64,
               "threshold_a": 100, "threshold_b": 200, "guidance_start": 0, "guidance_end": 1, "control_mode": 0,
               "pixel_perfect": False, "low_vram": False}
    empty = {"enabled": False, "module": "none", "model": "None", "image": None}
    r = client.post("/sdapi/v1/txt2img", json={**SDAPI, "alwayson_scripts": {"ControlNet": {"args": [cn_unit, empty]}}})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in image.info["parameters"]
    assert "ControlNet 1" not in image.info["parameters"]
    ours = engine.generate(req(units=[ControlUnit(model="tiny_canny", image=control_picture(), module="canny",
                                                  weight=0.9, processor_res=64)], steps=2, seed=4,
                               watermark=engine.settings.watermark))  # /sdapi: the server's setting
    assert np.array_equal(px(image), px(ours.images[0]))
    legacy = {"input_image": b64(control_picture()), "model": "tiny_canny", "module": "none", "guessmode": True,
              "guidance": 0.5, "lowvram": True}
    r = client.post("/sdapi/v1/txt2img", json={**SDAPI, "alwayson_scripts": {"controlnet": {"args": [legacy]}}})
    assert r.status_code == 200, r.text
    text = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).info["parameters"]
    assert "Guidance End: 0.5" in text and "Control Mode: ControlNet is more important" in text


def test_sdapi_img2img_unit_with_an_image_and_mask_object(client):
    init = b64(control_picture(2))
    unit_ = {"model": "tiny_canny", "module": "invert", "image": {"image": b64(control_picture()), "mask": None}}
    r = client.post("/sdapi/v1/img2img", json={**SDAPI, "init_images": [init], "denoising_strength": 0.6,
                                               "alwayson_scripts": {"controlnet": {"args": [unit_]}}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("scripts, status, words", [
    ({"controlnet": {"args": "x"}}, 422, "must be a list"),
    ({"controlnet": {"args": [5]}}, 422, "must be an object"),
    ({"controlnet": {"args": [{"enabled": True, "model": "None", "image": "x"}]}}, 422, "names no model"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "module": "sobel", "image": "AAAA"}]}}, 422,
     "unknown ControlNet preprocessor"),
    ({"controlnet": {"args": [{"model": "nope", "image": "IMAGE"}]}}, 400, "ControlNet model 'nope' not found"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "image": "IMAGE", "weight": 5}]}}, 400, "weight"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "image": "not base64!"}]}}, 400, "not valid base64"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "image": "IMAGE", "advanced_weighting": [1] * 13}]}}, 422,
     "advanced_weighting"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "image": "IMAGE", "module": "openpose"}]}}, 400,
     "body_pose_model.pth"),
    ({"controlnet": {"args": [{"model": "tiny_canny"}]}}, 400, "has no picture"),
    ({"controlnet": {"args": [{"model": "tiny_canny", "image": "IMAGE", "control_mode": "louder"}]}}, 400,
     "control mode"),
    ({"controlnet": {"args": [{"model": "tiny_xl_canny", "image": "IMAGE"}]}}, 400, "ControlNet for SDXL"),
    ({"adetailer": {"args": []}}, 422, "adetailer not found"),
])
def test_malformed_units_are_4xx_with_a_message(client, scripts, status, words):
    text = json.dumps(scripts).replace('"IMAGE"', json.dumps(b64(control_picture())))
    r = client.post("/sdapi/v1/txt2img", json={**SDAPI, "alwayson_scripts": json.loads(text)})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_the_extensions_routes(client, engine):
    from brushwork.engine import preprocessors

    assert client.get("/controlnet/version").json() == {"version": 2}
    titles = client.get("/controlnet/model_list").json()["model_list"]
    assert titles == [f.title for f in engine.controlnets.files()] and titles[0].startswith("tiny_canny [")
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:3] == ["none", "canny", "invert"]
    assert modules["module_detail"]["canny"]["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1,
                                                               "max": 255, "step": 1.0}
    assert not modules["module_detail"]["depth_midas"]["model_free"]
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliases
    picture = control_picture(3, MAP)
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64(picture)],
                                                "controlnet_processor_res": MAP})
    assert r.status_code == 200 and r.json()["info"] == "Success"
    detected = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    assert np.array_equal(detected, preprocessors.detect(preprocessors.find("canny"), picture, MAP))
    assert client.post("/controlnet/detect", json={"controlnet_module": "sobel",
                                                   "controlnet_input_images": [b64(picture)]}).status_code == 422
    assert client.post("/controlnet/detect", json={"controlnet_module": "canny"}).json()["detail"] == \
        "No image selected"
    assert client.post("/controlnet/detect", json={"controlnet_module": "depth_midas",
                                                   "controlnet_input_images": [b64(picture)]}).status_code == 422


def test_the_native_api_takes_units_and_lists_the_job_without_the_pictures(client):
    from serverkit import wait_done

    body = {"prompt": PROMPT, "model": "tiny", "width": SIZE, "height": SIZE, "steps": 2, "seed": 4,
            "controlnet": [{"model": "tiny_canny", "image": b64(control_picture()), "weight": 0.5}]}
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "done", job
    assert job["request"]["controlnet"][0]["image"] == "<image>" and job["request"]["controlnet"][0]["weight"] == 0.5
    assert "ControlNet 0" in job["result"]["images"][0]["infotext"]
    assert job["result"]["extras"]["controlnet_maps"][0].startswith("data:image/png;base64,")
    bad = client.post("/api/v1/jobs", json={**body, "controlnet": [{"model": "tiny_canny", "wieght": 1}]})
    assert bad.status_code == 422

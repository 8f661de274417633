"""The SD 2 x4 upscaler: detected from its keys, loaded from the original single file and a diffusers folder, the
same pixels as plain diffusers' StableDiffusionUpscalePipeline, 4x outputs at any size, tiles without seams, no
CFG for an empty prompt, and the CLI / native API / infotext around it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode

STEPS = 3


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    """The tiny x4 upscaler (same weights) as .safetensors and .ckpt in the original layout, and as a folder."""
    from tinymodels import save_upscaler_diffusers, save_upscaler_single

    root = tmp_path_factory.mktemp("x4")
    return {"safetensors": save_upscaler_single(root / "tiny-x4.safetensors"),
            "ckpt": save_upscaler_single(root / "tiny-x4.ckpt"),
            "diffusers": save_upscaler_diffusers(root / "tiny-x4-diffusers")}


def picture(width=32, height=24, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def smooth(size=48):
    """Gentle gradients, where a seam would show."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = [128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), 128 + 60 * np.sin((x + y) / 11)]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


def req(x4, fmt="safetensors", **kw):
    base = dict(mode=Mode.UPSCALE, model=str(x4[fmt]), init_image=picture(), steps=STEPS, seed=7, watermark=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(image):
    return np.asarray(image).astype(int)


# ---- detection and loading --------------------------------------------------------------------------------


def test_the_single_file_is_detected_from_its_keys_and_loads_every_tensor(x4):
    import torch

    from brushwork.models.detect import detect, family_name
    from brushwork.models.load import load_single_file, read_shapes
    from tinymodels import build_upscaler_components

    shapes, _, _ = read_shapes(x4["safetensors"])
    assert "model.diffusion_model.label_emb.weight" in shapes  # the original layout's class embedding
    assert family_name(shapes) == "sd2-x4-upscaler"
    det = detect(shapes)
    assert det.unet["in_channels"] == 7 and det.unet["num_class_embeds"] == 1000
    assert det.unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert det.unet["only_cross_attention"][1:] == [True, False]  # read from attn1's key width
    assert det.vae["scaling_factor"] == 0.08333 and len(det.vae["block_out_channels"]) == 3

    parts = load_single_file(x4["safetensors"])
    assert parts.family.name == "sd2-x4-upscaler" and parts.prediction == "v"
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    assert parts.pipeline_config["max_noise_level"] == 350
    assert parts.vae.config.scaling_factor == 0.08333  # before any pipeline (which would force it) sees the VAE
    for ours, built in zip((parts.unet, parts.vae, parts.text_encoder), build_upscaler_components(), strict=True):
        theirs = built.state_dict()
        mine = ours.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in theirs.items()), type(ours).__name__


def test_the_full_size_layout_gives_the_hub_config(tmp_path):
    """x4-upscaler-ema.ckpt's shapes (the real architecture, built on the meta device from the shipped configs and
    written in the original layout) detect as the hub's unet / vae configs."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from brushwork.models.convert import to_original_state_dict
    from brushwork.models.detect import detect
    from brushwork.models.families import FAMILY_BY_NAME, shipped_config

    family = FAMILY_BY_NAME["sd2-x4-upscaler"]
    unet_config, vae_config = shipped_config(family, "unet"), shipped_config(family, "vae")
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        te_config = {k: v for k, v in shipped_config(family, "text_encoder").items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    sd = to_original_state_dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_kind="openclip")
    det = detect({k: tuple(v.shape) for k, v in sd.items()})
    assert det.family is family
    for key in ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                "num_class_embeds", "sample_size"):
        assert det.unet[key] == unet_config[key], key
    # the first level has no attention; the deepest is as wide as the text (1024), so the shipped config says
    assert det.unet["only_cross_attention"][1:] == unet_config["only_cross_attention"][1:]
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor", "sample_size"):
        assert det.vae[key] == vae_config[key], key
    assert det.text_encoder["num_hidden_layers"] == 23 and det.text_encoder["hidden_size"] == 1024


# ---- the same pixels as plain diffusers ----------------------------------------------------------------------

# The real model's schedules, written out here rather than read from the package: a wrong beta, prediction type
# or low-res schedule in the shipped configs gives a plausible but different picture, and fails the test.
SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
LOW_RES = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=True,
               variance_type="fixed_small")


def plain(parts, prompt, images, seeds, *, scheduler=SCHEDULER, low_res=LOW_RES, guidance=9.0, noise_level=20,
          steps=STEPS):
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from brushwork.engine.prompts import encode

    pipe = StableDiffusionUpscalePipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        low_res_scheduler=DDPMScheduler(**low_res), scheduler=DDIMScheduler(**scheduler), max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = encode(parts.text_encoder, parts.tokenizer, prompt, "")
    n = len(seeds)
    with torch.inference_mode():
        return pipe(prompt_embeds=cond.repeat(n, 1, 1), negative_prompt_embeds=uncond.repeat(n, 1, 1),
                    image=images, num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images


def test_the_pixels_are_plain_diffusers_and_each_schedule_setting_is_pinned(x4, engine):
    from brushwork.models.load import load_single_file

    result = engine.generate(req(x4, prompt="a cat", sampler="DDIM", cfg_scale=9.0, batch_size=2, noise_level=30))
    assert result.seeds == [7, 8] and result.images[0].size == (128, 96)
    parts = load_single_file(x4["safetensors"])
    theirs = plain(parts, "a cat", [picture()] * 2, [7, 8], noise_level=30)
    for ours, expected in zip(result.images, theirs, strict=True):
        assert np.abs(px(ours) - px(expected)).max() == 0
    assert np.abs(px(result.images[0]) - px(result.images[1])).mean() > 1  # seed + i: different pictures
    # what a wrong config would have given: each setting changes the picture, so the equality above pins it
    wrong = {"eps prediction": dict(scheduler={**SCHEDULER, "prediction_type": "epsilon"}),
             "SD's betas": dict(scheduler={**SCHEDULER, "beta_start": 0.00085, "beta_end": 0.012}),
             "low-res betas": dict(low_res={**LOW_RES, "beta_start": 0.00085, "beta_end": 0.012}),
             "noise level": dict(noise_level=20)}
    for what, change in wrong.items():
        other = plain(parts, "a cat", [picture()], [7], **change)[0]
        assert np.abs(px(other) - px(result.images[0])).mean() > 0.5, what


@pytest.mark.parametrize("fmt", ["ckpt", "diffusers"])
def test_the_folder_and_the_ckpt_give_the_single_files_picture(x4, engine, fmt):
    a = engine.generate(req(x4, "safetensors", prompt="a dog", cfg_scale=5.0, sampler="Euler"))
    b = engine.generate(req(x4, fmt, prompt="a dog", cfg_scale=5.0, sampler="Euler"))
    assert np.array_equal(px(a.images[0]), px(b.images[0]))


def test_an_empty_prompt_runs_without_cfg_and_gives_the_cfg_picture(x4, engine):
    """Empty prompt and negative: CFG's two halves are the same text, so one UNet pass a step gives the same
    prediction as two."""
    from brushwork.models.load import load_single_file

    calls = []
    engine.generate(req(x4))  # loads the model
    unet = engine._loaded.parts.unet
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = engine.generate(req(x4, sampler="DDIM", cfg_scale=9.0))
    finally:
        handle.remove()
    assert calls == [1] * STEPS  # one image, one pass a step
    theirs = plain(load_single_file(x4["safetensors"]), "", [picture()], [7])[0]  # with CFG 9: two passes
    assert np.abs(px(result.images[0]) - px(theirs)).max() <= 1


# ---- sizes and tiles ----------------------------------------------------------------------------------------


def test_any_input_size_comes_out_exactly_four_times_larger(x4, engine):
    odd = picture(41, 30)
    result = engine.generate(req(x4, init_image=odd))
    assert result.images[0].size == (164, 120)
    assert "Size: 164x120" in result.infotexts[0]
    tiled = engine.generate(req(x4, init_image=odd, tile_size=32, tile_overlap=8))
    assert tiled.images[0].size == (164, 120)


def test_spans_cover_the_side_with_tiles_of_the_tile_size():
    from brushwork.engine.tiles import grid, spans

    assert spans(100, 128, 32) == [(0, 100)]
    assert spans(48, 32, 8) == [(0, 32), (16, 48)]
    for length, tile, overlap in ((200, 64, 16), (1024, 128, 32), (136, 128, 32)):
        s = spans(length, tile, overlap)
        assert s[0][0] == 0 and s[-1][1] == length and all(e - b == tile for b, e in s)
        assert all(a[1] - b[0] >= overlap for a, b in zip(s, s[1:], strict=False))  # at least the overlap
    # fit (the upscaler models' tiles): as few tiles, each just large enough, so fewer pixels run twice
    assert spans(1024, 512, 32, fit=True) == [(0, 363), (330, 693), (661, 1024)]
    assert spans(100, 128, 32, fit=True) == [(0, 100)] and spans(96, 48, 32, fit=True) == spans(96, 48, 32)
    weights = sum_windows(grid(40, 72, 32, 8))
    assert weights.min() > 0  # every pixel covered, with weight


def sum_windows(tiles):
    import torch

    h = max(t[1] for t in tiles)
    w = max(t[3] for t in tiles)
    total = torch.zeros(h, w)
    for y0, y1, x0, x1, window in tiles:
        total[y0:y1, x0:x1] += window
    return total


def test_tiles_of_a_pointwise_model_give_its_whole_output():
    """The blend is a weighted mean: for a model that looks at each pixel alone, tiles change nothing."""
    import torch

    from brushwork.engine.tiles import tiled_unet

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(7, 4, 1)

        def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True):
            return (self.conv(sample) * timestep,)

    model = Pointwise()
    sample = torch.randn(2, 7, 40, 72)
    with torch.no_grad():
        whole = model(sample, 3.0)[0]
        seen = []
        model.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
        with tiled_unet(model, 32, 8):
            tiled = model(sample, 3.0, None, class_labels=None, return_dict=False)[0]
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert len(seen) == 2 * 3 and all(max(s) <= 32 for s in seen)  # 2 x 3 tiles, none larger than the tile
    assert "forward" not in model.__dict__  # undone


def test_tiled_is_close_to_whole_and_shows_no_seam(x4, engine):
    """A 48x48 input in 2x2 tiles of 32 (overlap 8) against the whole: close (far closer than another seed), and
    the error in the blended bands is the error elsewhere. Without overlap the tile edges show: the check can
    fail."""
    from brushwork.engine.tiles import spans

    def run(**kw):
        return px(engine.generate(req(x4, init_image=smooth(), steps=4, **kw)).images[0]).astype(float)

    whole = run()
    other_seed = np.abs(run(seed=8) - whole).mean()

    def errors(overlap):
        tiled = run(tile_size=32, tile_overlap=overlap)
        assert tiled.shape == (192, 192, 3)
        err = np.abs(tiled - whole).mean(-1)
        band = np.zeros(192, bool)
        for start, _ in spans(48, 32, overlap)[1:]:  # where the second tile begins: the blend (or the cut)
            band[4 * start - 2:4 * (start + overlap) + 2] = True
        in_band = band[:, None] | band[None, :]
        return err.mean(), err[in_band].mean(), err[~in_band].mean()

    mean, band, rest = errors(8)
    assert mean < 0.5 * other_seed
    assert band < 1.2 * rest  # measured: 1.05
    _, cut_band, cut_rest = errors(0)
    assert cut_band > 1.3 * cut_rest  # hard tile edges: a seam (measured: 1.46)


def test_memory_is_bounded_by_the_tile(x4, engine):
    """No UNet call and no VAE decode sees more than one tile of latents."""
    engine.generate(req(x4))
    parts = engine._loaded.parts
    unet_sizes, vae_sizes = [], []
    hooks = [parts.unet.conv_in.register_forward_pre_hook(lambda m, args: unet_sizes.append(tuple(args[0].shape[-2:]))),
             parts.vae.decoder.register_forward_pre_hook(lambda m, args: vae_sizes.append(tuple(args[0].shape[-2:])))]
    try:
        result = engine.generate(req(x4, init_image=picture(72, 40), tile_size=32, tile_overlap=8, steps=2))
    finally:
        for h in hooks:
            h.remove()
    assert result.images[0].size == (288, 160)
    assert len(unet_sizes) == 2 * 2 * 3 and max(max(s) for s in unet_sizes) == 32  # 2 steps x 2 x 3 tiles
    assert len(vae_sizes) == 6 and max(max(s) for s in vae_sizes) == 32


def _limit(module, side: int, error=None):
    """A device that fits calls of ``module`` on at most ``side`` x ``side`` latents: larger ones raise out of
    memory (as tests/test_memory.py, through a real hook on the engine's own model). Returns (handle, sizes seen)."""
    import torch

    seen = []

    def hook(_module, args):
        seen.append(tuple(args[0].shape[-2:]))
        if max(args[0].shape[-2:]) > side:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return module.register_forward_pre_hook(hook), seen


def test_out_of_memory_halves_the_unet_tile_down_to_what_fits(x4, engine):
    """64x64 latents in tiles of 128 (whole): out of memory, again in 64 (whole), then in 32 (overlap 32 -> 16 -> 8):
    the picture of tiles of 32 asked for, with the same seeds, and a note saying so. In a fixed memory mode too (the
    ladder is not needed: the tile is what bounds the memory)."""
    image = smooth(64)
    expected = engine.generate(req(x4, init_image=image, steps=2, tile_size=32, tile_overlap=8))
    handle, seen = _limit(engine._loaded.parts.unet.conv_in, 32)
    try:
        result = engine.generate(req(x4, init_image=image, steps=2, memory="high"))
    finally:
        handle.remove()
    assert seen[:2] == [(64, 64), (64, 64)] and max(max(s) for s in seen[2:]) == 32
    assert np.array_equal(px(result.images[0]), px(expected.images[0]))
    assert result.notes == ["out of memory in tiles of 128 latent pixels (overlap 32); ran in tiles of 32 "
                            "(overlap 8) with the same seeds, which changes the picture a little"]
    assert engine.generate(req(x4, init_image=image, steps=1)).notes == []  # the next run starts from its own tile


def test_out_of_memory_in_the_decode_halves_the_vae_tile(x4, engine):
    engine.generate(req(x4, steps=1))
    handle, seen = _limit(engine._loaded.parts.vae.decoder, 32, RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    try:
        result = engine.generate(req(x4, init_image=smooth(48), steps=1, tile_size=64, tile_overlap=16))
    finally:
        handle.remove()
    assert seen[0] == (48, 48) and len(seen) == 1 + 4 and max(max(s) for s in seen[1:]) == 32  # 2x2 tiles of 32
    assert result.images[0].size == (192, 192)
    assert "ran in tiles of 32 (overlap 8)" in result.notes[0]


def test_out_of_memory_at_the_smallest_tile_goes_on_to_the_memory_ladder(x4, engine):
    engine.generate(req(x4, steps=1))
    handle, seen = _limit(engine._loaded.parts.unet, 0)  # nothing fits
    try:
        with pytest.raises(InvalidRequest, match="out of memory in memory mode medium; try a smaller size"):
            engine.generate(req(x4, init_image=smooth(64), steps=1, tile_size=64, tile_overlap=16))
        # tiles of 64, of 32 (the smallest), then the ladder's next mode (on a CPU the last) with tiles of 32
        assert len(seen) == 3
        seen.clear()
        handle.remove()
        handle, seen = _limit(engine._loaded.parts.unet, 0, ValueError("a bug"))
        with pytest.raises(ValueError, match="a bug"):  # other errors are not retried
            engine.generate(req(x4, init_image=smooth(64), steps=1))
        assert len(seen) == 1
    finally:
        handle.remove()


# ---- requests, errors, front ends --------------------------------------------------------------------------


def test_the_infotext_carries_the_upscale_settings_back(x4, engine):
    from brushwork.output.infotext import request_from_infotext

    result = engine.generate(req(x4, noise_level=40, tile_size=64, tile_overlap=16))
    text = result.infotexts[0]
    assert "Noise level: 40, Tile size: 64, Tile overlap: 16" in text
    back = request_from_infotext(text)
    assert (back["noise_level"], back["tile_size"], back["tile_overlap"]) == (40, 64, 16)


@pytest.mark.parametrize(("change", "message"), [
    ({"tile_size": 100}, "multiple of 8; use 96 or 104"),
    ({"tile_size": 64, "tile_overlap": 33}, "at most half the tile size"),
    ({"noise_level": 351}, "noise level must be between 0 and 350"),
    ({"init_image": picture(1100, 30)}, "over the limit of 4096 pixels a side"),
    ({"init_image": None}, "needs an init image"),
])
def test_bad_upscale_requests_say_what_to_change(x4, change, message):
    with pytest.raises(InvalidRequest, match=message):
        req(x4, **change).validate()


def test_the_x4_model_refuses_txt2img_and_a_plain_model_refuses_upscale(x4, engine, tiny):
    with pytest.raises(InvalidRequest, match="is an upscaler"):
        engine.generate(GenerationRequest(prompt="a cat", model=str(x4["safetensors"]), steps=2, width=32, height=32))
    with pytest.raises(InvalidRequest, match="is not an upscaler"):
        engine.generate(req(x4, model=str(tiny["sd1"]["safetensors"])))


def test_the_cli_upscales_with_the_model_and_with_a_plain_upscaler(x4, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from brushwork import cli

    picture(20, 16).save(tmp_path / "small.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, ["upscale", str(tmp_path / "small.png"), "--model", str(x4["safetensors"]),
                                           "--steps", "2", "--seed", "3", "--tile", "64", "--overlap", "16",
                                           "--noise-level", "25", "--outdir", str(out), "-q", "--no-watermark"])
    assert result.exit_code == 0, result.output
    image = Image.open(result.stdout.split()[0])
    assert image.size == (80, 64)
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras" in image.info["parameters"]
    assert "Noise level: 25, Tile size: 64, Tile overlap: 16" in image.info["parameters"]

    result = CliRunner().invoke(cli.main, ["upscale", str(tmp_path / "small.png"), "--upscaler", "Lanczos",
                                           "--scale", "2", "--outdir", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert Image.open(result.stdout.split()[0]).size == (40, 32)

    seen = []
    monkeypatch.setattr(cli, "_run_one", lambda engine, settings, request, o: seen.append(request))
    for flags in ([], ["--plain-defaults"], ["--plain-defaults", "--steps", "10"], ["--sampler", "Euler a"]):
        assert CliRunner().invoke(cli.main, ["upscale", str(tmp_path / "small.png"), *flags]).exit_code == 0
    assert [(r.sampler, r.scheduler, r.steps, r.cfg_scale) for r in seen] == [
        ("DPM++ 2M", "Karras", 20, 9.0), ("DDIM", "Automatic", 75, 9.0), ("DDIM", "Automatic", 10, 9.0),
        ("Euler a", "Automatic", 20, 9.0)]


def test_the_native_api_runs_an_upscale_job(x4, tmp_path):
    import io

    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from serverkit import make_home, make_settings, png_b64, wait_done

    paths = make_home(tmp_path, x4["safetensors"], "tiny-x4")
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as client:
        r = client.post("/api/v1/jobs", json={"mode": "upscale", "model": "tiny-x4", "init_image": png_b64((24, 16)),
                                              "steps": 2, "seed": 4, "noise_level": 10, "tile_size": 64})
        assert r.status_code == 202, r.text
        job = wait_done(client, r.json()["id"])
        assert job["status"] == "done", job["error"]
        png = client.get(job["result"]["images"][0]["url"])
        image = Image.open(io.BytesIO(png.content))
        assert image.size == (96, 64) and "Noise level: 10, Tile size: 64" in image.info["parameters"]
        bad = client.post("/api/v1/jobs", json={"mode": "upscale", "init_image": png_b64((24, 16)), "tile_size": 30})
        assert bad.status_code in (400, 422) and "tile size" in bad.text

"""depth2img on SD 2 depth: detection, the single file's MiDaS estimator converted to transformers' DPT-Hybrid,
MiDaS's input transform, pixels equal to plain diffusers' StableDiffusionDepth2ImgPipeline (a given depth map and
the estimator), a flat depth map, the CLI (--depth-map, --save-depth), txt2img refused, /sdapi img2img and the
native API."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    """Tiny SD 2 depth models: the single file with its estimator (.safetensors, .ckpt), one without, a folder."""
    from tinymodels import save_depth_diffusers, save_depth_single

    root = tmp_path_factory.mktemp("depth")
    return {"safetensors": save_depth_single(root / "tiny-depth.safetensors"),
            "ckpt": save_depth_single(root / "tiny-depth.ckpt"),
            "bare": save_depth_single(root / "tiny-depth-bare.safetensors", estimator=False),
            "diffusers": save_depth_diffusers(root / "tiny-depth-diffusers")}


def _init(size=(32, 32), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _gradient(size=32):
    """A depth map: near (white) at the top, far at the bottom."""
    return Image.fromarray(np.repeat(np.linspace(255, 0, size).astype(np.uint8)[:, None], size, axis=1))


def req(model, **kw):
    base = dict(prompt="a stone statue", mode=Mode.DEPTH2IMG, model=model and str(model), steps=3, seed=7, init_image=_init(),
                watermark=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(image):
    return np.asarray(image.convert("RGB")).astype(int)


def _plain_pipe(parts, depth_estimator=None, feature_extractor=None):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(parts.scheduler_config),
        depth_estimator=depth_estimator, feature_extractor=feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain(pipe, parts, seeds, **kw):
    import torch

    from brushwork.engine.prompts import encode

    cond, uncond = encode(parts.text_encoder, parts.tokenizer, "a stone statue", "")
    n = len(seeds)
    with torch.inference_mode():
        return pipe(prompt_embeds=cond.repeat(n, 1, 1), negative_prompt_embeds=uncond.repeat(n, 1, 1), image=_init(),
                    strength=0.75, num_inference_steps=3, guidance_scale=7.0,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **kw).images


# ---- detection and the estimator's weights -----------------------------------------------------------------


def test_a_depth_checkpoint_is_one_family_and_no_two_rows_match_one_checkpoint(depth):
    from brushwork.models.detect import detect
    from brushwork.models.families import FAMILIES
    from brushwork.models.load import read_shapes
    from brushwork.models.store import family_of_path

    for row in FAMILIES:  # each row's signature is its own
        assert [f.name for f in FAMILIES if f.matches(row.text_encoder, row.unet_in_channels)] == [row.name]
    for kind in ("safetensors", "ckpt", "bare", "diffusers"):
        assert family_of_path(depth[kind]) == "sd2-depth"
    shapes = read_shapes(depth["safetensors"])[0]
    found = detect(shapes, "tiny-depth")
    assert found.family.name == "sd2-depth" and found.unet["in_channels"] == 5 and found.unet["out_channels"] == 4
    assert found.depth_estimator["is_hybrid"] and found.depth_estimator["image_size"] == 64
    assert detect(read_shapes(depth["bare"])[0]).depth_estimator is None


def test_the_single_files_estimator_converts_strictly_into_dpt_hybrid(depth):
    import torch

    from brushwork.errors import ModelError
    from brushwork.models import dpt
    from brushwork.models.load import load_diffusers_folder, load_single_file, load_state_dict
    from tinymodels import build_dpt_hybrid

    sd = load_state_dict(depth["safetensors"])
    assert "depth_model.model.pretrained.model.blocks.0.attn.qkv.weight" in sd  # MiDaS's names, not transformers'
    config = dpt.config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    model = dpt.build(sd, config)  # no missing, unexpected or misshapen tensor (it raises otherwise)
    expected = build_dpt_hybrid().state_dict()
    ours = model.state_dict()
    assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in expected)
    folder = load_diffusers_folder(depth["diffusers"]).depth_estimator.state_dict()
    single = load_single_file(depth["ckpt"]).depth_estimator.state_dict()
    assert all(torch.equal(folder[k], expected[k]) and torch.equal(single[k], expected[k]) for k in expected)
    with pytest.raises(ModelError, match="depth_model.model.pretrained.extra.weight"):
        dpt.build({**sd, "depth_model.model.pretrained.extra.weight": torch.zeros(1)}, config)
    missing = {k: v for k, v in sd.items() if "refinenet2.out_conv" not in k}
    with pytest.raises(ModelError, match="missing"):
        dpt.build(missing, config)


def test_the_official_layout_reads_as_intel_dpt_hybrid_midas():
    """Full-size shapes (no weights): ViT-B/16 on BiT [3, 4, 9], neck [256, 512, 768, 768] -> the shipped config."""
    import accelerate
    from transformers import DPTConfig, DPTForDepthEstimation

    from brushwork.models import dpt

    with accelerate.init_empty_weights():
        model = DPTForDepthEstimation(DPTConfig(**dpt.shipped_config()))
    original = dpt.to_original(model.state_dict())
    assert "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in original  # what A1111 detects by
    assert "depth_model.model.scratch.refinenet4.resConfUnit1.conv1.weight" in original
    config = dpt.config_from_shapes({k: tuple(v.shape) for k, v in original.items()})
    assert config == dpt.shipped_config()
    assert config["hidden_size"] == 768 and config["neck_hidden_sizes"] == [256, 512, 768, 768]
    assert config["backbone_config"]["depths"] == [3, 4, 9] and config["image_size"] == 384


# ---- MiDaS's transform and the estimator at any size --------------------------------------------------------


def test_midas_input_is_the_originals_transform():
    from brushwork.engine.tasks.depth2img import midas_input, midas_size

    assert midas_size(512, 512) == (384, 384)
    assert midas_size(512, 768) == (384, 576)  # larger than 384: the short side gets 384
    assert midas_size(1024, 512) == (768, 384)
    assert midas_size(256, 512) == (192, 384)  # smaller: scaled as little as possible (the long side to 384)
    assert midas_size(600, 400) == (576, 384)  # 384 x 1.5 = 576; sides are multiples of 32
    image = _init((96, 64))
    x = midas_input(image, 64)
    assert tuple(x.shape) == (1, 3, 64, 96) and -1.2 < float(x.min()) < -0.5 and 0.5 < float(x.max()) < 1.2
    cv2 = pytest.importorskip("cv2")  # the original resizes with cv2's INTER_CUBIC
    for picture, net in ((image, 128), (_init((200, 150)), 64)):  # up and down, by fractions
        w, h = midas_size(picture.width, picture.height, net)
        theirs = cv2.resize(np.asarray(picture, dtype=np.float32) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
        ours = midas_input(picture, net)[0].permute(1, 2, 0).numpy() * 0.5 + 0.5
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4


def test_the_estimator_runs_at_any_multiple_of_32_as_at_its_own_size(depth):
    import torch

    from brushwork.engine.tasks.depth2img import predict_depth
    from tinymodels import build_dpt_hybrid

    model = build_dpt_hybrid()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        plain = model(pixel_values=x).predicted_depth
        model.config.image_size = 32  # forces the any-size path on the model's own size
        ours = predict_depth(model, x)
        assert torch.equal(ours, plain)
        assert tuple(predict_depth(model, torch.randn(1, 3, 64, 96)).shape) == (1, 64, 96)


# ---- parity with plain diffusers ------------------------------------------------------------------------------


def test_a_given_depth_map_gives_plain_diffusers_pixels(depth, engine):
    """The single file, a depth map picture, a batch of 2: the pixels are diffusers' StableDiffusionDepth2ImgPipeline
    given that map (as a (1, H, W) tensor of its grey levels), seeds 7 and 8 on CPU generators."""
    import torch

    from brushwork.models.load import load_single_file

    result = engine.generate(req(depth["safetensors"], depth_map=_gradient(), batch_size=2, cfg_scale=7.0))
    parts = load_single_file(depth["safetensors"])
    grey = torch.from_numpy(np.asarray(_gradient(), dtype=np.float32) / 255.0)[None]
    theirs = _plain(_plain_pipe(parts), parts, (7, 8), depth_map=grey)
    assert result.seeds == [7, 8]
    for ours, plain in zip(result.images, theirs, strict=True):
        assert np.array_equal(px(ours), px(plain))
    assert not np.array_equal(px(result.images[0]), px(result.images[1]))
    assert "Denoising strength: 0.75" in result.infotexts[0]


@pytest.mark.filterwarnings("ignore:In CPU autocast")  # diffusers asks for an fp32 autocast on the CPU
def test_the_estimated_depth_gives_plain_diffusers_pixels(depth, engine):
    """The diffusers folder's estimator: diffusers' pipeline running the same estimator on MiDaS's input (its
    feature extractor here returns that) gives the same pixels; so does the single file, whose weights are the
    folder's."""
    from types import SimpleNamespace

    from brushwork.engine.tasks.depth2img import midas_input
    from brushwork.models.load import load_diffusers_folder

    parts = load_diffusers_folder(depth["diffusers"])

    def midas(images, return_tensors):
        return SimpleNamespace(pixel_values=midas_input(images[0], parts.depth_estimator.config.image_size))

    theirs = _plain(_plain_pipe(parts, parts.depth_estimator, midas), parts, (7,))
    for kind in ("diffusers", "safetensors"):
        ours = engine.generate(req(depth[kind], cfg_scale=7.0, width=32, height=32))
        assert np.array_equal(px(ours.images[0]), px(theirs[0])), kind
    depth_map = np.asarray(ours.extras["depth_map"])
    assert depth_map.shape == (16, 16) and depth_map.min() == 0 and depth_map.max() == 255


def test_a_flat_depth_map_gives_a_finite_picture_not_nan(depth, engine):
    import torch

    from brushwork.models.load import load_single_file

    flat = Image.new("L", (32, 32), 128)
    result = engine.generate(req(depth["bare"], depth_map=flat))
    out = px(result.images[0])
    assert out.std() > 1  # a picture, not a black (NaN) one
    assert np.asarray(result.extras["depth_map"]).max() == 0  # -1 everywhere, as the original's epsilon gives
    parts = load_single_file(depth["bare"])  # plain diffusers divides by zero there
    pipe = _plain_pipe(parts)
    map_ = pipe.prepare_depth_map(_init(), torch.full((1, 32, 32), 0.5), 1, False, torch.float32, torch.device("cpu"))
    assert torch.isnan(map_).all()


def test_img2img_on_a_depth_model_is_depth2img_and_cfg_end_halves_the_depth_too(depth, engine):
    as_img2img = engine.generate(req(depth["safetensors"], mode=Mode.IMG2IMG, depth_map=_gradient()))
    as_depth = engine.generate(req(depth["safetensors"], depth_map=_gradient()))
    assert np.array_equal(px(as_img2img.images[0]), px(as_depth.images[0]))
    early = engine.generate(req(depth["safetensors"], depth_map=_gradient(), cfg_end=0.5, steps=4))
    every = engine.generate(req(depth["safetensors"], depth_map=_gradient(), steps=4))
    assert not np.array_equal(px(early.images[0]), px(every.images[0]))
    kept = engine.generate(req(depth["safetensors"], depth_map=_gradient(), strength=0.0))
    assert np.array_equal(px(kept.images[0]), px(_init()))  # strength 0: the init image, as img2img


def test_refusals_are_one_line(depth, engine):
    with pytest.raises(InvalidRequest, match=r"depth model .* needs an init image; use depth2img"):
        engine.generate(GenerationRequest(prompt="x", model=str(depth["safetensors"]), steps=1, width=32, height=32))
    with pytest.raises(InvalidRequest, match="carries no depth estimator .* --depth-map"):
        engine.generate(req(depth["bare"]))
    with pytest.raises(InvalidRequest, match="not a depth model"):
        engine.generate(req(None))  # the bundled mini model (SD 1.x)


# ---- front ends -----------------------------------------------------------------------------------------------


def test_cli_depth_map_and_save_depth(depth, tmp_path):
    from click.testing import CliRunner

    from brushwork.cli import main

    _init().save(tmp_path / "in.png")
    _gradient().save(tmp_path / "d.png")
    args = ["depth2img", "a statue", "--init-img", str(tmp_path / "in.png"), "--model", str(depth["bare"]),
            "--steps", "2", "--seed", "3", "--no-watermark", "-q", "--outdir", str(tmp_path / "out")]
    res = CliRunner().invoke(main, [*args, "--depth-map", str(tmp_path / "d.png"), "--save-depth"])
    assert res.exit_code == 0, res.output
    paths = res.output.strip().splitlines()
    assert len(paths) == 2 and paths[1] == paths[0].replace(".png", "-depth.png")
    saved = Image.open(paths[1])
    assert saved.size == (16, 16) and saved.mode == "L"  # the map the UNet saw, at the latent size
    assert np.asarray(saved)[0].min() == 255 and np.asarray(saved)[-1].max() == 0  # near (white) at the top
    assert "Denoising strength: 0.75" in Image.open(paths[0]).info["parameters"]
    res = CliRunner().invoke(main, args)  # no estimator in the file and no depth map
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--depth-map" in lines[0]
    res = CliRunner().invoke(main, ["txt2img", "a statue", "--model", str(depth["bare"]), "--steps", "1", "-q"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "needs an init image" in lines[0]


def _b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_sdapi_img2img_on_the_depth_model_runs_depth2img_and_the_native_api_takes_a_depth_map(depth, tmp_path,
                                                                                               engine):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from serverkit import decode_png, make_home, make_settings, wait_done

    expected = engine.generate(req(depth["safetensors"], sampler="Euler", cfg_scale=7.0))
    with_map = engine.generate(req(depth["safetensors"], sampler="Euler", cfg_scale=7.0, depth_map=_gradient()))
    settings = make_settings(make_home(tmp_path / "srv", depth["safetensors"], "tiny-depth"), watermark=False)
    with TestClient(create_app(Engine(settings), settings)) as client:
        body = {"prompt": "a stone statue", "init_images": [_b64(_init())], "steps": 3, "seed": 7, "cfg_scale": 7,
                "denoising_strength": 0.75, "sampler_name": "Euler", "width": 32, "height": 32,
                "override_settings": {"sd_model_checkpoint": "tiny-depth"}}
        res = client.post("/sdapi/v1/img2img", json=body)
        assert res.status_code == 200, res.text
        assert np.array_equal(px(decode_png(res.json()["images"][0])), px(expected.images[0]))
        job = client.post("/api/v1/jobs", json={"prompt": "a stone statue", "mode": "depth2img", "model": "tiny-depth",
                                                "init_image": _b64(_init()), "depth_map": _b64(_gradient()),
                                                "steps": 3, "seed": 7, "cfg_scale": 7, "sampler": "Euler",
                                                "watermark": False})
        assert job.status_code == 202, job.text
        done = wait_done(client, job.json()["id"])
        assert done["status"] == "done", done
        image = client.get(done["result"]["images"][0]["url"])
        assert np.array_equal(px(Image.open(io.BytesIO(image.content))), px(with_map.images[0]))
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 32, "height": 32,
                                                         "override_settings": {"sd_model_checkpoint": "tiny-depth"}})
        assert refused.status_code == 400 and "needs an init image" in refused.text


def test_a_16_bit_depth_map_keeps_its_precision_from_a_file_and_through_the_job_store(tmp_path):
    """MiDaS writes 16-bit PNGs: opened as a depth map (CLI, HTTP, a stored job) they keep all their levels."""
    from brushwork.engine.tasks.depth2img import depth_from_image
    from brushwork.output.images import open_image_file

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(ramp).save(path)
    opened = open_image_file(path, high_depth=True)
    assert len(np.unique(depth_from_image(opened).numpy())) > 1000  # 8 bits would leave 256
    assert len(np.unique(np.asarray(open_image_file(path).convert("L")))) <= 256  # an ordinary image: 8 bits
    stored = GenerationRequest(prompt="x", mode=Mode.DEPTH2IMG, init_image=Image.new("RGB", (64, 64)),
                               depth_map=opened).to_dict()
    again = GenerationRequest.from_dict(stored)
    assert np.array_equal(depth_from_image(again.depth_map).numpy(), depth_from_image(opened).numpy())

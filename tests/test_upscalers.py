"""Upscaler models (ESRGAN family, through spandrel) and plain resamplers: one table (``engine.upscalers``) for the
hires fix, ``/sdapi/v1`` extras and the CLI. The models are tiny random RRDB networks in the real key layouts
(ESRGAN's ``model.N`` and Real-ESRGAN's ``conv_first/body/conv_up``), saved as the files people download."""

from __future__ import annotations

import base64
import io
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from brushwork import GenerationRequest, InvalidRequest
from brushwork.engine import upscalers
from brushwork.errors import ModelError
from serverkit import decode_png, make_settings, tiny_model_file  # noqa: F401

GROWTH = 32  # RRDB's growth channels (fixed in spandrel's RRDBNet)


def _conv(sd: dict, key: str, cin: int, cout: int, g, bias: float = 0.0) -> None:
    import torch

    bound = 1.7 / (cin * 9) ** 0.5  # about PyTorch's own init, a little livelier
    sd[f"{key}.weight"] = (torch.rand(cout, cin, 3, 3, generator=g) * 2 - 1) * bound
    sd[f"{key}.bias"] = torch.full((cout,), bias) + (torch.rand(cout, generator=g) - 0.5) * 0.02


def tiny_esrgan(scale: int = 4, layout: str = "esrgan", nf: int = 8, nb: int = 1, seed: int = 0) -> dict:
    """A random RRDBNet state dict: ``layout`` "esrgan" (model.0 ... model.1.sub.N.RDBr.convc.0, model.3k upconvs)
    or "real-esrgan" (basicsr's conv_first, body.N.rdbr.convc, conv_up1/2; x2 = pixel-unshuffle + the x4 body)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict = {}
    rdb = "model.1.sub.{b}.RDB{r}.conv{c}.0" if layout == "esrgan" else "body.{b}.rdb{r}.conv{c}"
    first = "model.0" if layout == "esrgan" else "conv_first"
    _conv(sd, first, 3 * (4 if layout != "esrgan" and scale == 2 else 1), nf, g)
    for b in range(nb):
        for r in range(1, 4):
            for c in range(1, 6):
                _conv(sd, rdb.format(b=b, r=r, c=c), nf + (c - 1) * GROWTH, GROWTH if c < 5 else nf, g)
    if layout == "esrgan":
        _conv(sd, f"model.1.sub.{nb}", nf, nf, g)
        ups = [3 * (i + 1) for i in range(scale.bit_length() - 1)]
        for n in ups:
            _conv(sd, f"model.{n}", nf, nf, g)
        _conv(sd, f"model.{ups[-1] + 2}", nf, nf, g)
        _conv(sd, f"model.{ups[-1] + 4}", nf, 3, g, bias=0.5)
    else:
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            _conv(sd, name, nf, nf, g)
        _conv(sd, "conv_last", nf, 3, g, bias=0.5)
    return sd


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch ran-code",)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_file):  # noqa: F811
    """A model library: a checkpoint, upscalers in three of the folders A1111 / brushwork use, and a bad .pth."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("upscalers")
    models = root / "models"
    for folder in ("upscalers", "ESRGAN", "RealESRGAN"):
        (models / folder).mkdir(parents=True)
    shutil.copyfile(tiny_model_file, models / "tiny.safetensors")
    torch.save(tiny_esrgan(4, "esrgan"), models / "upscalers" / "tiny-4x.pth")
    save_file(tiny_esrgan(2, "real-esrgan", seed=1), str(models / "ESRGAN" / "tiny-x2.safetensors"))
    torch.save({"params_ema": tiny_esrgan(4, "real-esrgan", seed=2)}, models / "RealESRGAN" / "tiny_x4plus.pth")
    with open(models / "upscalers" / "evil.pth", "wb") as f:
        pickle.dump({"model.0.weight": _RunsCode()}, f, protocol=2)
    settings = make_settings({"home": root / "home", "models": models, "outputs": root / "outputs"})
    return settings


def picture(w: int = 40, h: int = 32, seed: int = 0):
    """A smooth random picture (a random field upsampled): structure the model's tiles must agree on."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def test_the_library_lists_upscalers_apart_from_checkpoints(library):
    from brushwork.models.store import ModelStore

    names = upscalers.available(library)
    assert names == ["None", "Lanczos", "Nearest", "evil", "tiny-4x", "tiny-x2", "tiny_x4plus"]
    assert [e.name for e in ModelStore(library).scan()] == ["tiny", "mini"]  # never a checkpoint
    assert upscalers.find("TINY-X2.safetensors", library).name == "tiny-x2"
    with pytest.raises(InvalidRequest, match=r"unknown upscaler 'ESRGAN_4x'; choose one of: None, Lanczos, "
                                             r"Nearest, evil, tiny-4x, tiny-x2, tiny_x4plus"):
        upscalers.find("ESRGAN_4x", library)


def test_spandrel_reads_the_architecture_and_scale_from_the_weights(library):
    for name, scale, tags in (("tiny-4x", 4, ["8nf", "1nb"]), ("tiny-x2", 2, ["8nf", "1nb", "unshuffle"]),
                              ("tiny_x4plus", 4, ["8nf", "1nb"])):
        model, device, dtype = upscalers.load_model(upscalers.find(name, library).path, library)
        assert (model.architecture.name, model.scale, model.tags) == ("ESRGAN", scale, tags), name
        assert device == "cpu" and str(dtype) == "torch.float32"
        assert upscalers.model_scale(upscalers.find(name, library), library) == scale  # remembered for listings


def test_spandrel_without_torchvision_keeps_its_registry_order():
    """The shim's registry is spandrel's own MAIN_REGISTRY order less the two architectures that need
    torchvision; where spandrel imports (a torch with torchvision) it is spandrel's registry itself."""
    import importlib.util

    source = Path(importlib.util.find_spec("spandrel").submodule_search_locations[0]) / "__helpers" / \
        "main_registry.py"
    order = re.findall(r"ArchSupport\.from_architecture\((\w+)\.\w+\(\)\)", source.read_text())
    assert [n for n in order if n not in upscalers.NEEDS_TORCHVISION] == list(upscalers.SPANDREL_ARCHITECTURES)
    registry = upscalers._spandrel_loader()["registry"]
    ids = [a.architecture.id for a in registry.architectures()]
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert ids == list(upscalers.SPANDREL_ARCHITECTURES)
    else:
        assert ids == order


def test_output_is_the_asked_size_at_native_and_other_factors(library):
    image = picture(24, 20)
    assert upscalers.upscale_with("tiny-4x", image, 4, library).size == (96, 80)
    assert upscalers.upscale_with("tiny-4x", image, 2.5, library).size == (60, 50)  # 4x, then Lanczos down
    assert upscalers.upscale_with("tiny-x2", image, 2, library).size == (48, 40)
    assert upscalers.upscale_with("tiny-x2", image, 3, library).size == (72, 60)  # two passes, then Lanczos
    assert upscalers.upscale_with("tiny_x4plus", image, 1.5, library).size == (36, 30)
    for plain in ("None", "Lanczos", "Nearest"):
        assert upscalers.upscale_with(plain, image, 1.5, library).size == (36, 30)
    model = np.asarray(upscalers.upscale_with("tiny-4x", image, 4, library)).astype(int)
    lanczos = np.asarray(upscalers.upscale_with("Lanczos", image, 4, library)).astype(int)
    assert np.abs(model - lanczos).mean() > 5  # the model ran
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    out = upscalers.upscale_with("tiny-4x", rgba, 2, library)
    assert out.mode == "RGBA" and out.size == (48, 40) and out.getchannel("A").getextrema() == (128, 128)
    for bad in (0, -1, float("nan"), 100, "2"):
        with pytest.raises(InvalidRequest, match="upscale factor"):
            upscalers.upscale_with("Lanczos", image, bad, library)


def test_a_pth_that_wants_to_run_code_is_refused(library, tmp_path):
    with pytest.raises(ModelError, match="contains code, not only weights"):
        upscalers.upscale_with("evil", picture(), 2, library)
    assert not (tmp_path / "ran-code").exists()


def test_a_pth_converted_to_safetensors_is_used_in_its_place(library, tmp_path):
    from click.testing import CliRunner

    from brushwork.cli import main

    models = tmp_path / "models"
    shutil.copytree(library.models_dir / "RealESRGAN", models / "RealESRGAN")
    settings = make_settings({"home": tmp_path / "home", "models": models, "outputs": tmp_path / "outputs"})
    before = upscalers.upscale_with("tiny_x4plus", picture(), 4, settings)
    result = CliRunner().invoke(main, ["models", "convert", str(models / "RealESRGAN" / "tiny_x4plus.pth")])
    assert result.exit_code == 0, result.output  # Real-ESRGAN's {"params_ema": ...} opened
    assert upscalers.available(settings)[3:] == ["tiny_x4plus"]
    assert upscalers.find("tiny_x4plus", settings).path.suffix == ".safetensors"
    after = upscalers.upscale_with("tiny_x4plus", picture(), 4, settings)
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_tiles_blend_without_a_seam(library):
    import torch

    model, _, _ = upscalers.load_model(upscalers.find("tiny-4x", library).path, library)
    pixels = upscalers.image_to_tensor(picture(128, 96, seed=3))
    whole = upscalers.run_model(model, pixels, tile=512)
    tiled = upscalers.run_model(model, pixels, tile=48, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 384, 512)
    diff = (tiled - whole).abs()[0].mean(0)
    assert diff.max() < 1 / 255  # under one level of a pixel anywhere
    # the overlap bands (where tiles meet) differ no more than a little over the rest
    band = torch.zeros_like(diff, dtype=torch.bool)
    for axis, length in ((0, 96), (1, 128)):
        size, starts = upscalers._split(length, 48, 16)
        for before, start in zip(starts, starts[1:], strict=False):
            index = [slice(None), slice(None)]
            index[axis] = slice(start * 4, (before + size) * 4)
            band[tuple(index)] = True
    assert band.any() and (~band).any()
    assert diff[band].mean() < 1e-4 and diff[~band].mean() < 1e-5  # the blend only ever differs in the bands
    # the same tiles pasted edge to edge do show their edges: what the blend is for
    hard = torch.zeros_like(whole)
    for y in range(0, 96, 48):
        for x in range(0, 128, 64):
            hard[..., y * 4:(y + 48) * 4, x * 4:(x + 64) * 4] = model(pixels[..., y:y + 48, x:x + 64])
    assert (hard - whole).abs().max() > 20 * diff.max()


def test_out_of_memory_halves_the_tile(library, caplog):
    import torch

    model, _, _ = upscalers.load_model(upscalers.find("tiny-4x", library).path, library)
    pixels = upscalers.image_to_tensor(picture(96, 64, seed=4))
    tried = []

    def limited(piece, error=torch.OutOfMemoryError):  # a device that fits tiles of at most 48x48
        tried.append(tuple(piece.shape[-2:]))
        if max(piece.shape[-2:]) > 48:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(piece)

    out, tile = upscalers.tiled(limited, pixels, 4, tile=192, overlap=32)
    assert tile == 48 and tried[0] == (64, 96) and tried[1] == (64, 96) and max(max(t) for t in tried[2:]) <= 48
    assert torch.equal(out, upscalers.tiled(model, pixels, 4, tile=48, overlap=32)[0])
    assert "out of memory upscaling in tiles of 192 pixels; trying 96" in caplog.text
    out, tile = upscalers.tiled(lambda p: limited(p, RuntimeError), pixels, 4, tile=96)  # the older spelling
    assert tile == 48

    def never(piece):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ModelError, match="out of memory upscaling even in tiles of 32 pixels"):
        upscalers.tiled(never, pixels, 4, tile=64)


def test_hires_fix_with_a_library_upscaler(library, tiny_model_file):  # noqa: F811
    from brushwork import Engine

    engine = Engine(library)
    base = dict(prompt="a red circle", model="tiny", steps=1, seed=3, width=32, height=32, watermark=False,
                hires_scale=2, hires_strength=0.5)
    result = engine.generate(GenerationRequest(**base, hires_upscaler="tiny-x2"))
    assert result.images[0].size == (64, 64)
    assert "Hires upscaler: tiny-x2" in result.infotexts[0]
    plain = engine.generate(GenerationRequest(**base, hires_upscaler="Lanczos"))
    assert np.abs(np.asarray(plain.images[0]).astype(int) - np.asarray(result.images[0]).astype(int)).mean() > 0.5
    with pytest.raises(InvalidRequest, match=r"unknown hires upscaler 'R-ESRGAN 4x\+'; choose one of: Latent, "
                                             r".*Latent \(nearest-exact\), None, Lanczos, Nearest, evil, tiny-4x"):
        engine.generate(GenerationRequest(**base, hires_upscaler="R-ESRGAN 4x+"))


@pytest.fixture(scope="module")
def client(library):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    with TestClient(create_app(Engine(library), library)) as c:
        yield c


def _b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_sdapi_lists_the_upscalers_with_a1111s_fields(client, library):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == upscalers.available(library)
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in listed)
    by_name = {u["name"]: u for u in listed}
    assert by_name["Lanczos"]["model_path"] is None
    assert by_name["tiny-x2"]["scale"] == 2 and by_name["tiny-x2"]["model_path"].endswith("tiny-x2.safetensors")


def test_sdapi_extras_upscale_by_and_to_a_size(client):
    image = picture(24, 20)
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image), "upscaler_1": "tiny-4x",
                                                          "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    out = decode_png(r.json()["image"])
    assert out.size == (48, 40)
    assert "Postprocess upscale by: 2" in r.json()["html_info"] and "tiny-4x" in out.info["postprocessing"]
    body = {"image": _b64(image), "resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 30,
            "upscaler_1": "tiny-x2", "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["image"]).size == (50, 30)
    assert "Postprocess upscaler 2: Lanczos" in r.json()["html_info"]
    none = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(image), "upscaler_1": "None"})
    assert decode_png(none.json()["image"]).size == (24, 20)  # as A1111: no first upscaler, nothing done
    batch = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": _b64(image), "name": "a.png"}, {"data": _b64(picture(16, 16)), "name": "b.png"}],
        "upscaler_1": "tiny-4x", "upscaling_resize": 4})
    assert batch.status_code == 200, batch.text
    assert [decode_png(d).size for d in batch.json()["images"]] == [(96, 80), (64, 64)]


@pytest.mark.parametrize("fields, words", [
    ({"upscaler_1": "R-ESRGAN 4x+"}, "unknown upscaler 'R-ESRGAN 4x+'; choose one of: None, Lanczos, Nearest, evil"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "SwinIR 4x"}, "upscaler_2: unknown upscaler"),
    ({"upscaler_1": "evil"}, "contains code"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 1000}, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 0}, "upscaling_resize_w"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 1}, "face restoration"),
    ({"upscaler_1": "tiny-4x", "upscaling_resize": 16}, "over this server's limit"),
    ({"image": "not base64 at all!"}, "not valid base64"),
    ({"image": base64.b64encode(b"hello, not a picture").decode()}, "not an image"),
])
def test_sdapi_extras_bad_input_is_a_clear_400(client, fields, words):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(picture(300, 300)), **fields})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


def test_sdapi_hires_fix_takes_a_library_upscaler(client):
    body = {"prompt": "a red circle", "steps": 1, "width": 32, "height": 32, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "tiny-4x", "denoising_strength": 0.3}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64) and "Hires upscaler: tiny-4x" in image.info["parameters"]
    r = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-UltraSharp"})
    assert r.status_code == 400 and "tiny-4x" in r.json()["detail"] and "Latent (bicubic)" in r.json()["detail"]

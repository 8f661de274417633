"""TAESD / TAESDXL (diffusers ``AutoencoderTiny``) from the library's vae-approx/: the live previews and --vae taesd.

Tiny random decoders in the real key layouts: the original ``taesd_decoder.pth`` (madebyollin/taesd's
``nn.Sequential``, which starts with a weightless Clamp, so its layer N is diffusers' ``decoder.layers[N - 1]``),
the same as ``.safetensors``, and a diffusers folder; loaded through the public loader.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brushwork import Engine, GenerationRequest, Settings
from brushwork.errors import ModelError
from brushwork.models import taesd
from serverkit import tiny_model_file  # noqa: F401

MINI = Path(__file__).resolve().parents[1] / "src/brushwork/models/mini/mini.safetensors"


def tiny_autoencoder(stages: int = 4, channels: int = 16, seed: int = 0):
    """An AutoencoderTiny with TAESD's block counts ((3, 3, 3, 1) for 4 stages: 8x up), few channels."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    blocks = (3,) * (stages - 1) + (1,)
    model = AutoencoderTiny(encoder_block_out_channels=(channels,) * stages, decoder_block_out_channels=(channels,) * stages,
                            num_encoder_blocks=(1,) * stages, num_decoder_blocks=blocks)
    with torch.no_grad():  # so that a mapping mistake anywhere changes the picture
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def original_decoder_state(model) -> dict:
    """The decoder as madebyollin's ``taesd_decoder.pth`` holds it: diffusers' ``decoder.layers.I.*`` is the
    original ``(I + 1).*`` (the original's layer 0 is the Clamp)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            out[f"{int(index) + 1}.{rest}"] = value.clone()
    return out


def save_tiny(model, path: Path) -> Path:
    """``model``'s decoder at ``path``: ``*.pth`` / ``*.safetensors`` in the original layout, else a diffusers folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pth":
        torch.save(original_decoder_state(model), path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(original_decoder_state(model), str(path))
    else:
        model.save_pretrained(path)
    return path


def vae_approx(home: Path) -> Path:
    return home / "models" / "vae-approx"


@pytest.fixture(scope="module")
def reference():
    return tiny_autoencoder()


def test_the_original_layout_is_taesds_sequential(reference):
    # madebyollin's Decoder: Clamp, conv, ReLU, 3 blocks, Upsample, conv (x3), a block, conv: weights at these indices
    keys = original_decoder_state(reference)
    assert {int(k.split(".")[0]) for k in keys} == {1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19}
    assert "7.weight" in keys and "7.bias" not in keys and "19.bias" in keys and "3.conv.4.weight" in keys


@pytest.mark.parametrize("name", ["taesd_decoder.pth", "taesd_decoder.safetensors", "taesd"])
def test_a_tiny_decoder_decodes_like_diffusers_autoencoder_tiny(reference, tmp_path, name):
    from brushwork.engine.run import decode

    path = save_tiny(reference, tmp_path / name)
    tiny = taesd.load(path)
    assert tiny.config.scaling_factor == 1.0 and taesd.upscale_factor(tiny) == 8
    latents = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 2
    with torch.inference_mode():
        expected = reference.decode(latents).sample
        got = tiny.decode(latents).sample
    assert got.shape == (2, 3, 40, 48)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the engine's decode divides by the scaling factor: 1.0, the latents as they are (never / 0.18215)
    images, _ = decode(tiny, latents)
    want = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert np.array_equal(np.asarray(images[1]), want[1])


def test_previews_decode_at_most_256_pixels_a_side(reference):
    from brushwork.engine.run import latent_preview

    big_vae = torch.nn.Linear(3000, 3000)  # over the "small VAE" limit: without TAESD the preview is the linear map
    latents = torch.randn(1, 4, 64, 40, generator=torch.Generator().manual_seed(2))
    assert latent_preview(big_vae, latents).size == (40, 64)  # the linear map: one pixel per latent pixel
    preview = latent_preview(big_vae, latents, reference)
    assert preview.size == (160, 256)  # SD's 512x320 latents averaged 2x down, then TAESD's 8x up
    with torch.inference_mode():
        pooled = torch.nn.functional.avg_pool2d(latents, 2)
        expected = ((reference.decode(pooled).sample / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0)
    assert np.array_equal(np.asarray(preview), expected.numpy().astype(np.uint8))


def test_a_file_that_is_not_a_decoder_is_refused_with_a_reason(reference, tmp_path):
    encoder = {f"{k.removeprefix('encoder.layers.')}": v for k, v in reference.state_dict().items()
               if k.startswith("encoder.layers.")}  # taesd_encoder.pth's layout: no shift, a weight at 0
    torch.save(encoder, tmp_path / "taesd_encoder.pth")
    with pytest.raises(ModelError, match="encoder"):
        taesd.load(tmp_path / "taesd_encoder.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="broken.pth"):
        taesd.load(tmp_path / "broken.pth")


def test_the_library_finds_them_in_vae_approx_and_never_as_checkpoints(reference, tmp_path):
    settings = Settings(home=tmp_path / "home")
    save_tiny(reference, settings.models_dir / "VAE-approx" / "taesd_decoder.safetensors")  # A1111's spelling
    save_tiny(reference, settings.models_dir / "vae-approx" / "taesdxl")  # a diffusers folder
    from brushwork.models.store import ModelStore

    store = ModelStore(settings)
    found = taesd.library_files(store)
    assert sorted(found) == ["taesd", "taesdxl"]
    assert found["taesd"].path.name == "taesd_decoder.safetensors" and found["taesdxl"].path.name == "taesdxl"
    assert [e.name for e in store.scan()] == ["mini"]  # not checkpoints
    assert taesd.requested("taesd", store) == found["taesd"]
    assert taesd.requested("taesd_decoder.safetensors", store) == found["taesd"]
    assert taesd.requested(None, store) is None and taesd.requested("some.vae.safetensors", store) is None
    assert taesd.name_for("sdxl") == "taesdxl" and taesd.name_for("sdxl-refiner") == "taesdxl"
    assert taesd.name_for("sd1") == "taesd" and taesd.name_for("sd2-inpaint") == "taesd"


def test_the_family_and_the_latent_shape_must_fit():
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4, block_out_channels=[1, 2, 3, 4]))
    sdxl = SimpleNamespace(name="some-xl", family=SimpleNamespace(name="sdxl", label="SDXL"), vae=vae)
    sd1 = SimpleNamespace(name="sd-v1-5", family=SimpleNamespace(name="sd1", label="Stable Diffusion 1.x"), vae=vae)
    tiny = SimpleNamespace(config=SimpleNamespace(latent_channels=4, upsampling_scaling_factor=2,
                                                  decoder_block_out_channels=(64,) * 4))
    assert taesd.misfit(tiny, "taesd", sd1) is None and taesd.misfit(tiny, "taesdxl", sdxl) is None
    assert "use --vae taesdxl" in taesd.misfit(tiny, "taesd", sdxl)
    assert "use --vae taesd" in taesd.misfit(tiny, "taesdxl", sd1)
    sixteen = SimpleNamespace(config=SimpleNamespace(latent_channels=16, upsampling_scaling_factor=2,
                                                     decoder_block_out_channels=(64,) * 4))  # taesd3 / taef1
    assert "16-channel" in taesd.misfit(sixteen, "taesd", sd1)


# ---- runs with the bundled mini model (4-channel latents, its VAE scales them 4x up) ----------------------------


@pytest.fixture
def engine(tmp_path):
    return Engine(Settings(home=tmp_path / "home"))


def _run(engine, **extra):
    previews = []
    request = GenerationRequest(prompt="a red circle in the center, on a white background", model=str(MINI), steps=3,
                                seed=11, watermark=False, **extra)
    result = engine.generate(request, progress=lambda info: previews.append(info.preview), want_previews=True)
    return result, [np.asarray(p) for p in previews]


def test_vae_taesd_decodes_the_final_picture_and_says_so(engine):
    full, plain_previews = _run(engine)  # no tiny decoder yet: previews are the mini VAE's decode
    save_tiny(tiny_autoencoder(stages=3), vae_approx(engine.settings.home) / "taesd_decoder.pth")
    with_file, previews = _run(engine)
    assert np.array_equal(np.asarray(with_file.images[0]), np.asarray(full.images[0]))  # previews change nothing else
    assert len(previews) == 3 and not np.array_equal(previews[-1], plain_previews[-1])  # TAESD's, not the fallback
    fast, _ = _run(engine, vae="taesd")
    picture = np.asarray(fast.images[0])
    assert fast.images[0].size == (64, 64) and not np.array_equal(picture, np.asarray(full.images[0]))
    assert "VAE: taesd," in fast.infotexts[0] and "VAE" not in full.infotexts[0]
    assert np.array_equal(picture, previews[-1])  # the last step's preview is the same TAESD decode of the same latents


def test_a_missing_file_says_which_file_to_put_where(engine):
    with pytest.raises(ModelError) as err:
        engine.generate(GenerationRequest(prompt="x", model=str(MINI), steps=1, vae="taesd"))
    message = str(err.value)
    assert "\n" not in message
    assert f"put taesd_decoder.pth (from github.com/madebyollin/taesd) in {vae_approx(engine.settings.home)}/" in message


def test_a_tiny_decoder_that_does_not_fit_is_refused_and_previews_go_on_without_it(engine, caplog):
    _, plain_previews = _run(engine)
    save_tiny(tiny_autoencoder(stages=4), vae_approx(engine.settings.home) / "taesd_decoder.pth")  # 8x up: real SD's
    with pytest.raises(ModelError, match="8x up.*4x up"):
        _run(engine, vae="taesd")
    _, previews = _run(engine)
    assert all(np.array_equal(a, b) for a, b in zip(previews, plain_previews, strict=True))
    (vae_approx(engine.settings.home) / "taesd_decoder.pth").write_bytes(b"\0" * 100)  # a broken download
    with caplog.at_level(logging.WARNING):
        result, previews = _run(engine)
    assert result.images and all(np.array_equal(a, b) for a, b in zip(previews, plain_previews, strict=True))
    assert any("live previews" in r.getMessage() and "taesd_decoder.pth" in r.getMessage() for r in caplog.records)


def test_the_cli_takes_vae_taesd(tmp_path, _isolated_home):
    from click.testing import CliRunner
    from PIL import Image

    from brushwork.cli import main

    save_tiny(tiny_autoencoder(stages=3), vae_approx(_isolated_home) / "taesd")
    result = CliRunner().invoke(main, ["txt2img", "a cat", "--model", str(MINI), "--steps", "1", "--seed", "3",
                                       "--vae", "taesd", "--outdir", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    image = Image.open(result.stdout.split()[0])
    assert image.size == (64, 64) and "VAE: taesd," in image.info["parameters"]


def test_the_http_apis_list_and_accept_taesd(tiny_model_file, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app
    from serverkit import make_home, make_settings

    paths = make_home(tmp_path, tiny_model_file)
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as client:
        body = {"prompt": "x", "seed": 3, "width": 32, "height": 32, "steps": 1,
                "override_settings": {"sd_vae": "taesd"}}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 400 and "put taesd_decoder.pth" in r.json()["detail"]
        save_tiny(tiny_autoencoder(stages=2), paths["models"] / "vae-approx" / "taesd_decoder.pth")  # its VAE: 2x
        assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["taesd"]
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert "VAE: taesd," in json.loads(r.json()["info"])["infotexts"][0]

"""The hires fix: txt2img, an upscale (latent or image), then img2img at the target size, as A1111's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brushwork import GenerationRequest, InvalidRequest, Mode
from brushwork.engine.tasks import task_for
from brushwork.engine.tasks.hires import second_pass
from brushwork.output.infotext import parse_infotext, request_from_infotext
from brushwork.request import HIRES_LATENT_MODES, HIRES_UPSCALERS
from serverkit import decode_png, make_home, make_settings, tiny_model_file  # noqa: F401


def req(tiny, **kw):
    base = dict(prompt="a red circle on the left", model=str(tiny["sd1"]["safetensors"]), steps=2, seed=77,
                width=32, height=32, watermark=False, hires_scale=2)
    base.update(kw)
    return GenerationRequest(**base)


def px(result, i=0):
    return np.asarray(result.images[i]).astype(int)


def test_hires_is_chosen_by_the_request_and_stays_txt2img():
    assert task_for(GenerationRequest(hires_scale=2)).denoise.__module__.endswith(".hires")
    for off in (GenerationRequest(), GenerationRequest(hires_scale=1), GenerationRequest(hires_scale=None)):
        assert task_for(off).denoise.__module__.endswith(".txt2img")
    assert task_for(GenerationRequest(hires_resize_x=64)).denoise.__module__.endswith(".hires")
    assert GenerationRequest(hires_scale=2).mode is Mode.TXT2IMG


def test_target_sizes_follow_a1111():
    r = GenerationRequest(hires_scale=1.5)
    assert r.hires_sizes(512, 512) == ((768, 768), (768, 768))
    assert GenerationRequest(hires_scale=1.3).hires_sizes(100, 64) == ((128, 80), (128, 80))  # 130x83 down to 8s
    assert GenerationRequest(hires_resize_x=1024).hires_sizes(512, 768) == ((1024, 1536), (1024, 1536))
    assert GenerationRequest(hires_resize_y=1024).hires_sizes(512, 768) == ((680, 1024), (680, 1024))
    # both sides: scaled to cover, then centre-cropped
    assert GenerationRequest(hires_resize_x=1024, hires_resize_y=512).hires_sizes(512, 512) == \
        ((1024, 1024), (1024, 512))


def test_second_pass_runs_exactly_the_asked_steps_as_a1111():
    for steps, strength in ((3, 0.7), (20, 0.7), (7, 0.33), (5, 1.0), (1, 0.05), (13, 0.999)):
        n, schedule, s = second_pass(GenerationRequest(steps=steps, hires_strength=strength))
        assert n == steps
        assert schedule == int(steps / min(strength, 0.999))  # A1111's setup_img2img_steps
        assert int(schedule * s) == steps and 0 < s <= 1  # diffusers img2img runs int(schedule * strength)
    assert second_pass(GenerationRequest(steps=4, hires_steps=9))[0] == 9


@pytest.mark.parametrize("fields, words", [
    ({"hires_upscaler": " "}, "hires upscaler must be a name"),  # other names: the library's (test_upscalers)
    ({"hires_scale": 0.5}, "hires scale"),
    ({"hires_strength": 1.5}, "hires strength"),
    ({"hires_steps": -1}, "hires steps"),
    ({"hires_scale": 8, "width": 1024, "height": 1024}, "limit"),
    ({"hires_sampler": "Euler b"}, "unknown sampler"),
])
def test_bad_hires_fields_are_clear_errors(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        GenerationRequest(**fields).validate()


def test_upscaler_names_are_read_case_insensitively():
    assert GenerationRequest(hires_upscaler="latent (Bicubic)").validate().hires_upscaler == "Latent (bicubic)"


def test_output_is_the_target_size_and_the_infotext_keeps_the_first_pass_size(tiny, engine):
    result = engine.generate(req(tiny))
    assert result.images[0].size == (64, 64)
    text = result.infotexts[0]
    p = parse_infotext(text)
    assert p["Size"] == "32x32" and p["Hires upscale"] == "2" and p["Hires upscaler"] == "Latent"
    assert p["Denoising strength"] == "0.7" and "Hires steps" not in p and "Hires resize" not in p
    plain = engine.generate(req(tiny, hires_scale=None))
    assert plain.images[0].size == (32, 32) and "Hires" not in plain.infotexts[0]


def test_every_upscaler_runs_and_latent_differs_from_lanczos(tiny, engine):
    pictures = {}
    for name in HIRES_UPSCALERS:
        result = engine.generate(req(tiny, steps=1, hires_upscaler=name, hires_strength=0.5))
        assert result.images[0].size == (64, 64), name
        assert f"Hires upscaler: {name}" in result.infotexts[0].replace('"', "")
        pictures[name] = px(result)
    assert np.abs(pictures["Latent"] - pictures["Lanczos"]).mean() > 1
    assert np.abs(pictures["Latent"] - pictures["Latent (nearest)"]).mean() > 0.1
    assert len(HIRES_LATENT_MODES) == 6


def test_resize_both_sides_crops_to_that_size(tiny, engine):
    result = engine.generate(req(tiny, hires_scale=None, hires_resize_x=64, hires_resize_y=40, steps=1))
    assert result.images[0].size == (64, 40)
    assert "Hires resize: 64x40" in result.infotexts[0] and "Hires upscale:" not in result.infotexts[0]
    lanczos = engine.generate(req(tiny, hires_scale=None, hires_resize_x=40, hires_resize_y=64, steps=1,
                                  hires_upscaler="Lanczos"))
    assert lanczos.images[0].size == (40, 64)


@pytest.mark.parametrize("fields", [
    {"hires_steps": 3, "hires_upscaler": "Lanczos", "hires_strength": 0.6, "hires_prompt": "a blue, square: box",
     "hires_negative_prompt": "green", "negative_prompt": "red"},
    {"hires_scale": None, "hires_resize_x": 48, "hires_sampler": "DPM++ 2M", "hires_upscaler": "Latent (nearest)"},
    {"hires_scheduler": "SGM Uniform", "hires_steps": 3},
])
def test_the_infotext_remakes_the_picture_exactly(tiny, engine, fields):
    first = engine.generate(req(tiny, **fields))
    text = first.infotexts[0]
    remade = GenerationRequest(**{**request_from_infotext(text), "model": str(tiny["sd1"]["safetensors"]),
                                  "watermark": False})
    for key, value in fields.items():
        assert getattr(remade, key) == value, key
    assert remade.width == 32 and remade.height == 32  # Size is the first pass's
    again = engine.generate(remade)
    assert np.array_equal(px(first), px(again))
    assert again.infotexts[0].split("\n")[-1].rsplit(", Version", 1)[0] == text.split("\n")[-1].rsplit(
        ", Version", 1)[0]


def test_hires_steps_is_exactly_the_second_pass_progress(tiny, engine):
    for hires_steps, expected in ((0, 2), (3, 3), (5, 5)):
        seen = []
        engine.generate(req(tiny, steps=2, hires_steps=hires_steps, hires_strength=0.45), progress=seen.append)
        assert [p.step for p in seen] == list(range(1, 2 + expected + 1)), hires_steps
        assert {p.total for p in seen} == {2 + expected}


def test_hires_schedule_type_is_the_second_passs_own(tiny, engine):
    a = engine.generate(req(tiny, steps=2, hires_steps=3))
    b = engine.generate(req(tiny, steps=2, hires_steps=3, hires_scheduler="SGM Uniform"))
    assert not np.array_equal(px(a), px(b))
    assert "Hires schedule type: SGM Uniform" in b.infotexts[0] and ", Schedule type:" not in b.infotexts[0]  # the first pass: Automatic
    with pytest.raises(InvalidRequest, match="schedule"):
        engine.generate(req(tiny, hires_scheduler="Sideways"))


def test_an_interrupt_in_the_second_pass_counts_both_passes_steps(tiny, engine):
    import threading

    event = threading.Event()
    result = engine.generate(req(tiny, steps=2, hires_steps=4),
                             progress=lambda info: event.set() if info.step == 3 else None, interrupt=event)
    assert result.interrupted and result.images[0].size == (64, 64)  # stopped in the upscaled pass
    assert any("interrupted after step 4 of 6" in note for note in result.notes), result.notes


def test_hires_prompt_changes_only_the_second_pass(tiny, engine):
    a = engine.generate(req(tiny, steps=1))
    b = engine.generate(req(tiny, steps=1, hires_prompt="a green triangle"))
    assert not np.array_equal(px(a), px(b))  # the tiny text encoder tells prompts apart only a little
    assert 'Hires prompt: a green triangle' in b.infotexts[0]


# ---- /sdapi/v1 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_model_file, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path_factory.mktemp("sdapi-hires"), tiny_model_file, "tiny")
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as c:
        yield c


def test_sdapi_enable_hr_latent_as_sillytavern_sends_it(client):
    body = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 3, "enable_hr": True,
            "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "denoising_strength": 0.6,
            "hr_sampler_name": "Use same sampler", "hr_checkpoint_name": "Use same checkpoint"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert "Size: 32x32" in text and "Hires upscale: 2" in text and "Denoising strength: 0.6" in text
    info = json.loads(r.json()["info"])
    assert info["width"] == 64 and info["height"] == 64
    off = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": False})
    assert decode_png(off.json()["images"][0]).size == (32, 32)


def test_sdapi_hires_resize_and_second_pass_fields(client):
    body = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 3, "enable_hr": True,
            "hr_resize_x": 48, "hr_resize_y": 48, "hr_upscaler": "Nearest", "hr_second_pass_steps": 2,
            "hr_prompt": "a blue circle"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert image.size == (48, 48)
    p = parse_infotext(image.info["parameters"])
    assert p["Hires resize"] == "48x48" and p["Hires steps"] == "2" and p["Hires upscaler"] == "Nearest"
    assert p["Hires prompt"] == "a blue circle" and p["Denoising strength"] == "0.75"  # A1111's API default


def test_sdapi_unknown_hr_upscaler_is_400_naming_the_choices(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 32, "steps": 1,
                                                "enable_hr": True, "hr_upscaler": "4x-UltraSharp"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "4x-UltraSharp" in detail and "Latent (nearest-exact)" in detail and "Lanczos" in detail


def test_sdapi_lists_the_latent_modes_and_the_plain_upscalers(client):
    modes = client.get("/sdapi/v1/latent-upscale-modes").json()
    assert modes == [{"name": n} for n in ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                                            "Latent (bicubic antialiased)", "Latent (nearest)",
                                            "Latent (nearest-exact)")]
    names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"]


def test_native_api_job_with_hires_fields(client):
    import time

    r = client.post("/api/v1/jobs", json={"prompt": "a yellow triangle", "seed": 4, "width": 32, "height": 32,
                                          "steps": 2, "hires_scale": 2, "hires_upscaler": "Latent (bicubic)",
                                          "hires_steps": 1, "hires_strength": 0.5})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (job := client.get(f"/api/v1/jobs/{r.json()['id']}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "done", job["error"]
    image = job["result"]["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    assert "Hires upscaler: Latent (bicubic)" in image["infotext"].replace('"', "")
    bad = client.post("/api/v1/jobs", json={"prompt": "x", "hires_scale": 9})
    assert bad.status_code in (400, 422) and "hires scale" in bad.text


def test_cli_hires_options(tiny, tmp_path):
    from pathlib import Path

    from click.testing import CliRunner
    from PIL import Image

    from brushwork.cli import main

    args = ["txt2img", "a red circle", "--model", tiny["sd1"]["safetensors"], "--steps", 2, "--seed", 5, "-W", 32,
            "-H", 32, "--hires-scale", 2, "--hires-upscaler", "Lanczos", "--hires-steps", 2, "--hires-strength", 0.5,
            "--outdir", tmp_path / "out", "--no-watermark"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    image = Image.open(Path(result.stdout.split()[0]))
    assert image.size == (64, 64)
    p = parse_infotext(image.info["parameters"])
    assert p["Size"] == "32x32" and p["Hires upscaler"] == "Lanczos" and p["Hires steps"] == "2"
    assert p["Denoising strength"] == "0.5"
    bad = CliRunner().invoke(main, [str(a) for a in args[:-3] + ["--hires-upscaler", "ESRGAN"]])
    assert bad.exit_code != 0 and "unknown hires upscaler" in bad.output


def test_hires_strength_zero_is_the_upscaled_first_pass(tiny, engine):
    seen = []
    result = engine.generate(req(tiny, steps=2, hires_strength=0.0, hires_upscaler="Nearest"), progress=seen.append)
    assert result.images[0].size == (64, 64) and [p.step for p in seen] == [1, 2]
    other = engine.generate(req(tiny, steps=2, hires_strength=0.0, hires_upscaler="Nearest", hires_prompt="blue"))
    assert np.array_equal(px(result), px(other))  # no second pass: its prompt changes nothing


# ---- a hires checkpoint (A1111's hr_checkpoint_name): the second pass on another model ------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """The tiny SD1 model's twin (the same weights under another name), one with other weights, ones with another
    UNet, text encoder or VAE only (the model's other parts), and an SDXL one."""
    import shutil

    from brushwork.models.convert import save_single_file
    from tinymodels import build_components, save_single, save_xl_single

    root = tmp_path_factory.mktemp("hires-checkpoints")
    twin = root / "tiny-twin.safetensors"
    shutil.copyfile(tiny["sd1"]["safetensors"], twin)
    out = {"twin": twin, "other": save_single(root / "tiny-other.safetensors", "sd1", seed=3),
           "xl": save_xl_single(root / "tiny-xl.safetensors", seed=2)}
    (unet, vae, te), (unet_b, vae_b, te_b) = build_components("sd1", 0), build_components("sd1", 3)  # tiny's: seed 0
    for name, parts in (("unet", (unet_b, vae, te)), ("text", (unet, vae, te_b)), ("vae", (unet, vae_b, te))):
        out[name] = save_single_file(root / f"tiny-{name}.safetensors", unet=parts[0], vae=parts[1],
                                     text_encoder=parts[2])
    return out


def test_a_hires_checkpoint_with_the_same_weights_gives_the_plain_hires_picture(tiny, checkpoints, engine):
    for upscaler in ("Latent", "Lanczos"):  # Lanczos: decoded by the model's VAE, encoded by the checkpoint's
        plain = engine.generate(req(tiny, hires_upscaler=upscaler))
        twin = engine.generate(req(tiny, hires_upscaler=upscaler, hires_checkpoint=str(checkpoints["twin"])))
        assert np.array_equal(px(plain), px(twin)), upscaler
        p = parse_infotext(twin.infotexts[0])
        assert p["Hires checkpoint"].startswith("tiny-twin [") and len(p["Hires checkpoint"]) == len("tiny-twin []") + 10
        assert "Hires checkpoint" not in plain.infotexts[0]


def test_a_hires_checkpoint_runs_the_second_pass_only(tiny, checkpoints, engine):
    def run(**kw):
        seen = []
        result = engine.generate(req(tiny, **kw), progress=seen.append, want_previews=True)
        return result, [np.asarray(p.preview).astype(int) for p in seen]

    plain, plain_previews = run()
    other, other_previews = run(hires_checkpoint=str(checkpoints["other"]))
    assert len(plain_previews) == len(other_previews) == 4  # 2 steps, then 2 of the second pass
    for a, b in zip(plain_previews[:2], other_previews[:2], strict=True):  # the first pass: the model's
        assert np.array_equal(a, b)
    assert np.abs(px(plain) - px(other)).mean() > 1
    # each of its parts is the checkpoint's: its UNet and text encoder denoise, its VAE encodes and decodes
    for part, upscaler in (("unet", "Latent"), ("text", "Latent"), ("vae", "Lanczos")):
        plain = engine.generate(req(tiny, hires_upscaler=upscaler))
        changed = engine.generate(req(tiny, hires_upscaler=upscaler, hires_checkpoint=str(checkpoints[part])))
        assert not np.array_equal(px(plain), px(changed)), part
    text = other.infotexts[0]
    assert "Hires upscaler: Latent, Hires checkpoint: tiny-other [" in text
    read = request_from_infotext(text)
    assert read["hires_checkpoint"] == parse_infotext(text)["Hires checkpoint"]
    assert "hires_checkpoint" not in request_from_infotext(text.replace(read["hires_checkpoint"], "Use same checkpoint"))


def test_an_sdxl_hires_checkpoint_with_the_same_weights_gives_the_plain_hires_picture(tiny, checkpoints, engine,
                                                                                     tmp_path):
    import shutil

    twin = shutil.copyfile(checkpoints["xl"], tmp_path / "tiny-xl-twin.safetensors")
    plain = engine.generate(req(tiny, model=str(checkpoints["xl"]), steps=1, hires_upscaler="Lanczos"))
    again = engine.generate(req(tiny, model=str(checkpoints["xl"]), steps=1, hires_upscaler="Lanczos",
                                hires_checkpoint=str(twin)))
    assert np.array_equal(px(plain), px(again)) and "Hires checkpoint: tiny-xl-twin [" in again.infotexts[0]


def test_hires_checkpoint_mistakes_are_one_clear_line(tiny, checkpoints, engine):
    from brushwork import ModelError

    with pytest.raises(ModelError) as err:
        engine.generate(req(tiny, hires_checkpoint=str(checkpoints["xl"])))
    message = str(err.value)
    assert "\n" not in message and "tiny-xl" in message and "latent space" in message
    assert "Stable Diffusion XL" in message and "tiny-sd1" in message
    with pytest.raises(InvalidRequest, match="a hires checkpoint and a refiner do not go together"):
        req(tiny, hires_checkpoint=str(checkpoints["other"]), refiner=str(checkpoints["xl"])).validate()


@pytest.fixture(scope="module")
def library_client(tiny_model_file, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from tinymodels import save_single

    paths = make_home(tmp_path_factory.mktemp("sdapi-hires-checkpoint"), tiny_model_file, "tiny")
    save_single(paths["models"] / "tiny-b.safetensors", "sd1", seed=3)
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as c:
        yield c


def test_sdapi_hr_checkpoint_name_runs_the_second_pass_on_it(library_client):
    body = {"prompt": "a red circle", "width": 32, "height": 32, "steps": 2, "seed": 3, "enable_hr": True,
            "hr_scale": 2, "denoising_strength": 0.6, "override_settings": {"sd_model_checkpoint": "tiny"}}
    same = library_client.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "Use same checkpoint"})
    r = library_client.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "tiny-b"})
    assert same.status_code == 200 and r.status_code == 200, r.text
    image = decode_png(r.json()["images"][0])
    assert image.size == (64, 64)
    info = library_client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]})
    title = info.json()["parameters"]["Hires checkpoint"]  # the picture's infotext, read back
    assert title.startswith("tiny-b [") and "Hires checkpoint" not in decode_png(same.json()["images"][0]).info[
        "parameters"]
    assert not np.array_equal(np.asarray(image), np.asarray(decode_png(same.json()["images"][0])))
    again = library_client.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": title})  # as read back
    assert again.status_code == 200 and np.array_equal(np.asarray(decode_png(again.json()["images"][0])),
                                                       np.asarray(image))
    bad = library_client.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "nope"})
    assert bad.status_code == 400 and "nope" in bad.json()["detail"] and "tiny-b" in bad.json()["detail"]
    native = library_client.post("/api/v1/jobs", json={"prompt": "x", "hires_scale": 2, "hires_checkpoint": "nope"})
    assert native.status_code == 400 and "nope" in native.text and "tiny-b" in native.text  # before it is queued


def test_cli_hires_checkpoint(tiny, checkpoints, tmp_path):
    from pathlib import Path

    from click.testing import CliRunner
    from PIL import Image

    from brushwork.cli import main

    args = ["txt2img", "a red circle", "--model", tiny["sd1"]["safetensors"], "--steps", 1, "--seed", 5, "-W", 32,
            "-H", 32, "--hires-scale", 2, "--hires-checkpoint", checkpoints["other"], "--outdir", tmp_path / "out",
            "--no-watermark"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    image = Image.open(Path(result.stdout.split()[0]))
    assert image.size == (64, 64) and parse_infotext(image.info["parameters"])["Hires checkpoint"].startswith(
        "tiny-other [")

"""``/sdapi/v1`` in process, through the real engine and a tiny model: what an A1111 client sees."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from serverkit import decode_png, make_home, make_settings, png_b64, tiny_model_file  # noqa: F401

SMALL = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def client(tiny_model_file, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path_factory.mktemp("sdapi"), tiny_model_file, "tiny", "tiny2")
    settings = make_settings(paths, max_upload_bytes=200_000, max_image_pixels=512 * 512)
    app = create_app(Engine(settings), settings)
    with TestClient(app) as c:
        c.paths = paths
        yield c


def test_txt2img_answers_like_a1111_with_the_infotext_inside_the_png(client):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 5, "batch_size": 2,
            "sampler_name": "euler_a", "sampler_index": "Euler", "some_new_field": 1, **SMALL}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) >= {"images", "parameters", "info"}
    assert isinstance(data["info"], str)  # clients json.loads it
    info = json.loads(data["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["sampler_name"] == "Euler a" and info["width"] == 32 and len(info["infotexts"]) == 2
    assert info["sd_model_hash"] and len(info["sd_model_hash"]) == 10
    assert len(data["images"]) == 2
    image = decode_png(data["images"][0])
    assert image.size == (32, 32)
    text = image.info["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blue\n")
    assert "Seed: 5" in text and "Steps: 2" in text and "Sampler: Euler a" in text
    assert decode_png(data["images"][1]).info["parameters"].count("Seed: 6") == 1
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["seed"] == 5


def test_the_full_payload_of_a_popular_client_library_is_accepted(client):
    # what webuiapi 0.9 sends for api.txt2img(prompt=..., steps=..., width=..., height=...) with its defaults
    payload = {
        "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
        "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
        "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
        "prompt": "a cat", "styles": [], "seed": 9, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
        "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0, "width": 32,
        "height": 32, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
        "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
        "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a", "scheduler": "Automatic", "sampler_index": "Euler a", "script_name": None,
        "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    }
    r = client.post("/sdapi/v1/txt2img", json=payload)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["seed"] == 9 and len(r.json()["images"]) == 1


def test_token_merging_ratio_in_override_settings_reaches_the_picture(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 3, **SMALL,
                                                "override_settings": {"token_merging_ratio": 0.5}})
    assert r.status_code == 200, r.text
    assert "Token merging ratio: 0.5" in decode_png(r.json()["images"][0]).info["parameters"]


def test_png_info_reads_back_the_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a green square", "seed": 11, **SMALL})
    image = r.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert info["info"].startswith("a green square")
    assert str(info["parameters"]["Seed"]) == "11"
    assert str(info["parameters"]["Steps"]) == "2"


@pytest.mark.parametrize("body, status, words", [
    ({"sampler_name": "Euler b"}, 400, "unknown sampler"),
    ({"width": 33}, 400, "multiple of 8"),
    ({"steps": 0}, 400, "steps"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 400, "unknown model"),
    ({"override_settings": {"sd_model_checkpoint": "../models/tiny.safetensors"}}, 400, "unknown model"),
    ({"steps": "many"}, 422, "steps"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 400, "hires upscaler"),
    ({"restore_faces": True}, 400, "face restoration"),
    ({"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}}, 422, "controlnet"),
    ({"script_name": "x/y/z plot"}, 422, "Script"),
    ({"override_settings": {"token_merging_ratio": 2}}, 400, "token merging ratio"),
])
def test_caller_mistakes_are_4xx_with_a1111_error_fields(client, body, status, words):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, **body})
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "detail", "body", "errors"}
    assert words in err["detail"]


def test_img2img_takes_a_data_url_and_keeps_the_size(client):
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "a red circle", "init_images": ["data:image/png;base64," + png_b64((32, 32))],
        "denoising_strength": 0.5, "seed": 3, **SMALL})
    assert r.status_code == 200, r.text
    data = r.json()
    assert decode_png(data["images"][0]).size == (32, 32)
    assert json.loads(data["info"])["denoising_strength"] == 0.5
    assert data["parameters"]["init_images"] is None  # not echoed back unless include_init_images


def test_img2img_without_an_init_image_is_404_like_a1111(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", **SMALL})
    assert r.status_code == 404
    assert "Init image" in r.json()["detail"]


def test_uploads_that_are_not_images_too_big_or_bombs_are_refused(client):
    import base64
    import io

    from PIL import Image

    not_image = base64.b64encode(b"hello, I am not a picture" * 10).decode()
    r = client.post("/sdapi/v1/img2img", json={"init_images": [not_image], **SMALL})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]

    buf = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buf, format="PNG")  # a few KB that decode to 16 million pixels
    bomb = base64.b64encode(buf.getvalue()).decode()
    r = client.post("/sdapi/v1/img2img", json={"init_images": [bomb], **SMALL})
    assert r.status_code == 400 and "pixels" in r.json()["detail"]

    big = base64.b64encode(bytes(300_000)).decode()  # over this app's 200 kB upload limit
    r = client.post("/sdapi/v1/img2img", json={"init_images": [big], **SMALL})
    assert r.status_code == 413


def test_progress_shows_a_running_job_and_interrupt_stops_it(client):
    answer = {}

    def run():
        answer["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "slow", "width": 32, "height": 32,
                                                             "steps": 400, "seed": 1})

    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.1)
    assert seen is not None, "the job never reported progress"
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert seen["state"]["sampling_steps"] == 400 and seen["state"]["job_count"] >= 1
    assert decode_png(seen["current_image"]).size[0] > 0  # the live preview is a real picture
    assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None

    started = time.monotonic()
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 10
    r = answer["r"]
    assert r.status_code == 200
    # as A1111: the interrupted picture comes back as far as it got, with its parameters
    assert len(r.json()["images"]) == 1 and json.loads(r.json()["info"])["interrupted"] is True
    unfinished = decode_png(r.json()["images"][0])
    assert unfinished.size == (32, 32) and "Seed: 1" in unfinished.info["parameters"]
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None


def test_models_options_and_switching_checkpoints(client):
    models = client.get("/sdapi/v1/sd-models").json()
    titles = {m["model_name"]: m["title"] for m in models}
    assert {"tiny", "tiny2"} <= set(titles)
    assert titles["tiny2"].startswith("tiny2.safetensors [") and len(models[0]["hash"]) == 10

    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert r.status_code == 400 and "tiny2" in r.json()["detail"]  # names the choices

    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny2"]}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["tiny2"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL})
    assert json.loads(r.json()["info"])["sd_model_name"] == "tiny2"
    assert "Model: tiny2" in decode_png(r.json()["images"][0]).info["parameters"]

    # the choice outlives a restart, like A1111's config.json
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app

    settings = make_settings(client.paths)
    restarted = TestClient(create_app(client.app.state.brushwork.engine, settings, start_worker=False))
    assert restarted.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["tiny2"]

    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 1, **SMALL})
    assert json.loads(r.json()["info"])["sd_model_name"] == "tiny"


def test_refresh_checkpoints_finds_a_new_file(client, tiny_model_file):  # noqa: F811
    import shutil

    shutil.copyfile(tiny_model_file, client.paths["models"] / "fresh.safetensors")
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "fresh" in {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}


def test_listing_routes_have_the_shapes_clients_read(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "DPM++ 2M", "DDIM", "PLMS"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert "Karras" in {s["label"] for s in schedulers}
    assert client.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["ckpt_dir"] == str(client.paths["models"])


def test_extra_single_image_names_the_upscalers_there_are(client):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(), "upscaler_1": "R-ESRGAN 4x+"})
    assert r.status_code == 400
    assert "unknown upscaler 'R-ESRGAN 4x+'; choose one of: None, Lanczos, Nearest" in r.json()["detail"]


def test_skip_ends_the_current_batch_and_the_next_one_runs(client):
    answer = {}

    def run():
        answer["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "slow", "width": 32, "height": 32,
                                                             "steps": 300, "n_iter": 2, "seed": 1})

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 2:
        time.sleep(0.1)
    assert client.post("/sdapi/v1/skip").status_code == 200
    next_batch = None
    while time.monotonic() < deadline and thread.is_alive() and next_batch is None:
        state = client.get("/sdapi/v1/progress").json()["state"]
        if state["job_no"] == 1 and state["sampling_step"] >= 1:
            next_batch = state
        time.sleep(0.05)
    assert next_batch is not None and next_batch["skipped"] is False  # the skip ended with its batch
    thread.join(120)
    assert not thread.is_alive()
    data = answer["r"].json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 2 and info["all_seeds"] == [1, 2] and "interrupted" not in info


@pytest.mark.parametrize(("sampler", "scheduler", "used", "note"), [
    ("Euler", "normal", "Normal", None),  # SillyTavern's default
    ("Euler a", "Karras", None, "does not support the Karras schedule"),  # Open WebUI's suggestion
    ("Euler", "kl_optimal_v9", None, "unknown schedule type"),
    ("DPM++ 2M", "align_your_steps", "Align Your Steps", None),  # A1111's names for the sigma schedules
    ("Euler", "KL Optimal", "KL Optimal", None),
    ("Euler a", "polyexponential", None, "does not support the Polyexponential schedule"),
])
def test_schedule_types_a1111_clients_send_are_taken_or_fall_back_with_a_note(client, sampler, scheduler, used,
                                                                              note):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": sampler, "scheduler": scheduler,
                                               **SMALL})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    text = info["infotexts"][0]
    if used:
        assert f"Schedule type: {used}," in text and not info["notes"]
    else:
        assert "Schedule type" not in text
        assert any(note in n and "Automatic" in n for n in info["notes"]), info["notes"]
    listed = client.get("/sdapi/v1/schedulers").json()
    assert [s["name"] for s in listed] == ["automatic", "uniform", "karras", "exponential", "polyexponential",
                                           "sgm_uniform", "kl_optimal", "align_your_steps", "simple", "normal",
                                           "ddim", "beta"]  # A1111's list, in its order
    assert {s["label"]: s["default_rho"] for s in listed if s["default_rho"] != -1} == {"Karras": 7.0,
                                                                                        "Polyexponential": 1.0}


def test_sd_vae_lists_the_librarys_vaes_and_selects_one(client):
    from safetensors.torch import save_file

    from brushwork.models.convert import vae_to_original
    from tinymodels import build_components

    _, other_vae, _ = build_components("sd1", seed=5)
    sd = {k.removeprefix("first_stage_model."): v for k, v in vae_to_original(other_vae.state_dict(),
                                                                               other_vae.config).items()}
    folder = client.paths["models"] / "vae"
    folder.mkdir(exist_ok=True)
    save_file(sd, str(folder / "other-vae.safetensors"))
    listed = client.get("/sdapi/v1/sd-vae").json()
    assert [v["model_name"] for v in listed] == ["other-vae.safetensors"]
    # a VAE in the vae/ folder is not a checkpoint
    assert all("other-vae" not in m["title"] for m in client.get("/sdapi/v1/sd-models").json())
    body = {"prompt": "x", "seed": 3, **SMALL}
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    swapped = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "other-vae"}}).json()
    assert decode_png(plain["images"][0]).tobytes() != decode_png(swapped["images"][0]).tobytes()
    assert "VAE: other-vae.safetensors" in json.loads(swapped["info"])["infotexts"][0]
    automatic = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "Automatic"}}).json()
    assert decode_png(plain["images"][0]).tobytes() == decode_png(automatic["images"][0]).tobytes()
    r = client.post("/sdapi/v1/options", json={"sd_vae": "nope"})
    assert r.status_code == 400 and "other-vae.safetensors" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "/etc/passwd"}).status_code == 400
    assert client.post("/sdapi/v1/options", json={"sd_vae": "other-vae.safetensors"}).status_code == 200
    chosen = client.post("/sdapi/v1/txt2img", json=body).json()
    assert decode_png(chosen["images"][0]).tobytes() == decode_png(swapped["images"][0]).tobytes()
    assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
    # the native API chooses the same VAE by name (and refuses an unknown one or a path before queueing)
    from serverkit import wait_done

    job = client.post("/api/v1/jobs", json={**body, "sampler": "Euler", "vae": "other-vae"})
    assert job.status_code == 202, job.text
    done = wait_done(client, job.json()["id"])
    image = client.get(done["result"]["images"][0]["url"])
    assert decode_png(base64.b64encode(image.content)).convert("RGB").tobytes() == \
        decode_png(swapped["images"][0]).convert("RGB").tobytes()
    for bad in ("nope", "../vae/other-vae.safetensors"):
        r = client.post("/api/v1/jobs", json={**body, "vae": bad})
        assert r.status_code == 400 and "vae" in r.json()["detail"].lower(), r.text


# ---- what a client leaves out: the model's recommendation (a few-step model), else A1111's defaults -------------


@pytest.fixture(scope="module")
def turbo_client(tiny_model_file, tmp_path_factory):  # noqa: F811
    """A library with the ordinary tiny model and a Turbo one (its brushwork.defaults say so, and give a small size:
    the tiny model takes minutes at Turbo's 512x512)."""
    from fastapi.testclient import TestClient
    from safetensors.torch import load_file, save_file

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path_factory.mktemp("sdapi-turbo"), tiny_model_file, "tiny")
    save_file(load_file(tiny_model_file), paths["models"] / "tiny-turbo.safetensors",
              metadata={"brushwork.defaults": json.dumps({"turbo": True, "width": 32, "height": 48})})
    settings = make_settings(paths)
    with TestClient(create_app(Engine(settings), settings)) as c:
        yield c


TURBO = {"override_settings": {"sd_model_checkpoint": "tiny-turbo"}}
ORDINARY = {"override_settings": {"sd_model_checkpoint": "tiny"}}


def test_a_turbo_model_fills_what_an_a1111_client_leaves_out(turbo_client):
    r = turbo_client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, **TURBO})
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    text = decode_png(data["images"][0]).info["parameters"]
    assert "Steps: 1," in text and "CFG scale: 1," in text and "Sampler: Euler a," in text, text
    assert "Schedule type: SGM Uniform," in text and "Size: 32x48," in text, text  # the file's size, not 512
    assert (info["steps"], info["cfg_scale"], info["sampler_name"], info["height"]) == (1, 1.0, "Euler a", 48)
    assert any("Turbo" in note and "1 step" in note for note in info["notes"]), info["notes"]
    params = data["parameters"]  # the echo says what ran, not A1111's 50 steps at CFG 7
    assert (params["steps"], params["cfg_scale"], params["sampler_name"], params["height"]) == (1, 1.0, "Euler a", 48)


def test_what_the_client_sends_wins_on_a_turbo_model(turbo_client):
    body = {"prompt": "a red circle", "seed": 1, "steps": 3, "cfg_scale": 2, "width": 32, "height": 32, **TURBO}
    data = turbo_client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(data["info"])
    text = info["infotexts"][0]
    assert "Steps: 3," in text and "CFG scale: 2," in text and "Size: 32x32," in text, text
    assert "Sampler: Euler a," in text  # not sent: the model's
    assert (info["steps"], info["cfg_scale"]) == (3, 2.0) and data["parameters"]["steps"] == 3
    named = turbo_client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "sampler_index": "Euler"})
    assert "Sampler: Euler," in json.loads(named.json()["info"])["infotexts"][0]
    # a schedule type without a sampler was chosen for A1111's Euler (the model's Euler a cannot take Karras)
    karras = turbo_client.post("/sdapi/v1/txt2img", json={**body, "scheduler": "karras"})
    assert karras.status_code == 200, karras.text
    assert "Sampler: Euler, Schedule type: Karras," in json.loads(karras.json()["info"])["infotexts"][0]


def test_turbo_img2img_left_to_the_model_still_runs_a_step(turbo_client):
    r = turbo_client.post("/sdapi/v1/img2img", json={"prompt": "a red circle", "init_images": [png_b64((32, 32))],
                                                      "denoising_strength": 0.5, "width": 32, "height": 32, **TURBO})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["steps"] == 2 and "Steps: 2," in info["infotexts"][0]  # 1 x 0.5 would run none
    assert any("steps raised from 1 to 2" in note for note in info["notes"]), info["notes"]


def test_turbo_hires_fix_left_to_the_model_runs_its_steps_in_both_passes(turbo_client):
    r = turbo_client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 1, "enable_hr": True,
                                                      "hr_scale": 2, "denoising_strength": 0.5, **TURBO})
    assert r.status_code == 200, r.text
    assert decode_png(r.json()["images"][0]).size == (64, 96)  # the file's 32x48, doubled
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Steps: 1," in text and "CFG scale: 1," in text and "Hires upscale: 2," in text, text


def test_an_ordinary_model_gets_a1111s_defaults_for_what_is_left_out(turbo_client):
    import dataclasses

    from brushwork.engine.run import model_defaults
    from brushwork.request import Mode
    from brushwork.server.sdapi import Txt2ImgRequest, _to_request

    # what runs for a bare {"prompt": ...}: A1111's 50 steps at CFG 7, Euler, 512x512 (not run here: 50 steps)
    state = turbo_client.app.state.brushwork
    request, _ = _to_request(state, Txt2ImgRequest(prompt="a cat", **ORDINARY), Mode.TXT2IMG)
    loaded, _ = state.engine.load(state.check_request(request))
    filled, notes = model_defaults(request, loaded.parts)
    used = (filled.steps, filled.cfg_scale, filled.sampler, filled.width, filled.height)
    assert used == (50, 7.0, "Euler", 512, 512)
    assert not notes
    # the same request on a Turbo file that names no size of its own: Turbo's (512x512 too), the rest its own
    turbo = dataclasses.replace(loaded.parts, fewstep="turbo", fewstep_why="its brushwork.defaults")
    filled, notes = model_defaults(request, turbo)
    used = (filled.steps, filled.cfg_scale, filled.sampler, filled.width, filled.height)
    assert used == (1, 1.0, "Euler a", 512, 512)
    assert "512x512" in notes[0]
    # through the API, with a few steps: CFG 7 and Euler, as A1111, and the echo says so
    data = turbo_client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 2, **SMALL, **ORDINARY}).json()
    text = json.loads(data["info"])["infotexts"][0]
    assert "Steps: 2," in text and "CFG scale: 7," in text and "Sampler: Euler," in text, text
    assert (data["parameters"]["cfg_scale"], data["parameters"]["sampler_name"]) == (7.0, "Euler")

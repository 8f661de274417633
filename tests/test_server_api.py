"""The native ``/api/v1`` in process, through the real engine and a tiny model."""

from __future__ import annotations

import base64
import io
import time

import pytest

from serverkit import make_home, make_settings, png_b64, tiny_model_file, wait_done  # noqa: F401

SMALL = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def client(tiny_model_file, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path_factory.mktemp("api"), tiny_model_file, "tiny")
    settings = make_settings(paths, max_upload_bytes=200_000)
    app = create_app(Engine(settings), settings)
    with TestClient(app) as c:
        c.paths = paths
        c.store = app.state.brushwork.store
        yield c


def wait_running(client, job_id: str, min_step: int = 1, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job.get("step", 0) >= min_step:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran")


def test_a_job_is_queued_runs_and_its_picture_is_served_with_parameters(client):
    from PIL import Image

    r = client.post("/api/v1/jobs", json={"prompt": "a yellow triangle", "seed": 42, "batch_size": 2, **SMALL})
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "running")
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    images = job["result"]["images"]
    assert [i["seed"] for i in images] == [42, 43]

    png = client.get(images[1]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.size == (32, 32)
    assert "Seed: 43" in picture.info["parameters"]
    # the file is in the outputs folder, written whole
    assert (client.paths["outputs"] / images[1]["path"]).read_bytes() == png.content

    meta = client.get(f"{images[0]['url']}/meta").json()
    assert meta["prompt"] == "a yellow triangle" and meta["seed"] == 42
    assert str(meta["parameters"]["Seed"]) == "42" and meta["request"]["steps"] == 2

    download = client.get(f"{images[0]['url']}?download=true")
    assert "attachment" in download.headers["content-disposition"]

    thumb = client.get(f"{images[0]['url']}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)  # never enlarged


def test_fast_mode_is_passed_to_the_engine_and_no_file_path_is(client):
    job = client.post("/api/v1/jobs", json={"prompt": "quick", "fast": True, "seed": 4, "width": 32, "height": 32,
                                            "steps": 6}).json()
    assert job["request"]["fast"] == 3 and job["request"]["config"] is None
    done = wait_done(client, job["id"])
    assert done["status"] == "done", done["error"]
    for body in ({"extra": {"config_yaml": "/etc/passwd"}}, {"config": "/etc/passwd"}):
        r = client.post("/api/v1/jobs", json={"prompt": "x", **body, **SMALL})
        assert r.status_code == 422  # a file path: not settable over HTTP
    r = client.post("/api/v1/jobs", json={"prompt": "x", "fast": 0.5, **SMALL})
    assert r.status_code == 422


def test_img2img_job_with_a_base64_upload(client):
    r = client.post("/api/v1/jobs", json={"prompt": "a bird", "mode": "img2img", "init_image": png_b64((32, 32)),
                                          "strength": 0.6, "steps": 3, "seed": 1})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["init_image"] == "<image>"  # job listings do not echo uploads
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    assert job["result"]["images"][0]["width"] == 32


def test_cancel_a_queued_job_and_a_running_job(client):
    running = client.post("/api/v1/jobs", json={"prompt": "long", "width": 32, "height": 32, "steps": 500}).json()
    queued = client.post("/api/v1/jobs", json={"prompt": "never runs", **SMALL}).json()
    wait_running(client, running["id"], min_step=2)
    assert client.get(f"/api/v1/jobs/{queued['id']}").json()["position"] == 1
    listed = client.get("/api/v1/jobs?status=queued").json()["jobs"]
    assert queued["id"] in [j["id"] for j in listed]

    r = client.post(f"/api/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    started = time.monotonic()
    r = client.delete(f"/api/v1/jobs/{running['id']}")
    assert r.json()["status"] == "cancelled"
    assert time.monotonic() - started < 5  # stops within a step, not at the end of 500
    job = client.get(f"/api/v1/jobs/{running['id']}").json()
    assert job["status"] == "cancelled" and job["result"] is None

    assert client.post(f"/api/v1/jobs/{running['id']}/cancel").status_code == 409  # already over
    assert client.post("/api/v1/jobs/nope/cancel").status_code == 404
    # the worker goes on with the next job
    after = client.post("/api/v1/jobs", json={"prompt": "after", **SMALL}).json()
    assert wait_done(client, after["id"])["status"] == "done"


@pytest.mark.parametrize("body, status, words", [
    ({"stpes": 3}, 422, "stpes"),
    ({"sampler": "Euler b"}, 400, "unknown sampler"),
    ({"width": 30}, 400, "multiple of 8"),
    ({"model": "/etc/passwd"}, 400, "unknown model"),
    ({"model": "../models/tiny"}, 400, "unknown model"),
    ({"mode": "img2img"}, 400, "init image"),
    ({"init_image": "%%%not base64%%%", "mode": "img2img"}, 400, "image"),
    ({"vae": "/home/someone/vae.pt"}, 400, "vae"),  # no VAE by path from HTTP: by name only
])
def test_caller_mistakes_are_4xx_naming_the_problem(client, body, status, words):
    r = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_an_upload_over_the_limit_is_413(client):
    big = base64.b64encode(bytes(300_000)).decode()
    r = client.post("/api/v1/jobs", json={"mode": "img2img", "init_image": big, **SMALL})
    assert r.status_code == 413
    r = client.post("/api/v1/jobs", content=b"{" + b" " * 2_000_000 + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_images_are_served_only_from_the_outputs_folder(client, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    # even a row pointing outside (a corrupted or hostile database) cannot escape the folder
    bad = client.store.add_image(job_id="x", idx=0, path=str(secret), request={"prompt": "x"}, seed=1, width=1,
                                 height=1, model=None, model_hash=None, infotext="")
    dots = client.store.add_image(job_id="x", idx=0, path="../../../../etc/passwd", request={"prompt": "x"},
                                  seed=1, width=1, height=1, model=None, model_hash=None, infotext="")
    assert client.get(f"/api/v1/images/{bad}").status_code == 404
    assert client.get(f"/api/v1/images/{dots}").status_code == 404
    assert client.get("/api/v1/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/api/v1/images/999999").status_code == 404


def test_history_is_searchable_by_prompt(client):
    for prompt in ("a purple cat", "a purple dog"):
        job = client.post("/api/v1/jobs", json={"prompt": prompt, **SMALL}).json()
        wait_done(client, job["id"])
    found = client.get("/api/v1/images", params={"q": "purple cat"}).json()["images"]
    assert [i["prompt"] for i in found] == ["a purple cat"]
    assert client.get("/api/v1/history", params={"q": "purple"}).json()["images"][0]["prompt"] == "a purple dog"
    assert client.get("/api/v1/images", params={"q": "zebra"}).json()["images"] == []


def test_jobs_list_models_samplers_status_docs_and_web_ui(client):
    jobs = client.get("/api/v1/jobs").json()
    assert jobs["counts"]["done"] >= 1 and jobs["jobs"][0]["created"] >= jobs["jobs"][-1]["created"]
    assert client.get("/api/v1/jobs?status=bogus").status_code == 400
    assert client.get("/api/v1/jobs/nope").status_code == 404
    models = client.get("/api/v1/models").json()["models"]
    assert {m["name"]: m["family"] for m in models}["tiny"] == "sd1"  # read from the file's header
    assert {m["name"]: m["native_size"] for m in models}["tiny"] == [512, 512]  # the web UI's size fields follow it
    samplers = client.get("/api/v1/samplers").json()
    assert "Euler a" in [s["name"] for s in samplers["samplers"]] and "Karras" in samplers["schedule_types"]
    assert samplers["schedule_types"][4:8] == ["Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps"]
    takes = {s["name"]: s["schedules"] for s in samplers["samplers"]}
    assert "Align Your Steps" in takes["DPM++ 2M"] and "Align Your Steps" not in takes["Euler a"]
    status = client.get("/api/v1/status").json()
    assert status["worker_alive"] and status["limits"]["max_upload_bytes"] == 200_000
    schema = client.get("/openapi.json").json()
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<title>brushwork</title>" in page.text
    assert client.get("/ui/app.js").status_code == 200 and client.get("/ui/style.css").status_code == 200


def test_basic_auth_guards_everything_when_set(client, tmp_path):
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app

    settings = make_settings({"home": tmp_path / "h", "models": tmp_path / "m", "outputs": tmp_path / "o"})
    app = create_app(object(), settings, start_worker=False, auth="ann:s3cret")
    c = TestClient(app)
    for path in ("/", "/api/v1/status", "/sdapi/v1/samplers"):
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert c.get("/api/v1/status", auth=("ann", "wrong")).status_code == 401
    assert c.get("/api/v1/status", auth=("ann", "s3cret")).status_code == 200


def test_stopping_the_server_puts_the_running_job_back_in_the_queue(client, tmp_path):
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app

    engine = client.app.state.brushwork.engine  # already loaded: no second model load
    settings = make_settings({"home": tmp_path / "h", "models": client.paths["models"], "outputs": tmp_path / "o"})
    with TestClient(create_app(engine, settings)) as first:
        job = first.post("/api/v1/jobs", json={"prompt": "interrupted by a shutdown", "width": 32, "height": 32,
                                               "steps": 300, "seed": 3}).json()
        wait_running(first, job["id"], min_step=2)
    # the app has shut down (Ctrl+C): the job is not lost and not marked cancelled
    with TestClient(create_app(engine, settings, start_worker=False)) as second:
        assert second.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_a_job_that_fails_in_the_engine_reports_why_and_the_worker_goes_on(client):
    import json as jsonlib

    (client.paths["models"] / "broken.safetensors").write_bytes(b"this is not a checkpoint")
    r = client.post("/api/v1/jobs", json={"prompt": "x", "model": "broken", **SMALL})
    assert r.status_code == 202  # it is in the library, so it is accepted; loading it fails
    job = wait_done(client, r.json()["id"])
    assert job["status"] == "failed" and "broken" in job["error"]
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert "event: error" in lines
    payload = jsonlib.loads(lines[lines.index("event: error") + 1][len("data: "):])
    assert payload["error"] == job["error"]

    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "broken"},
                                               **SMALL})
    assert r.status_code == 400 and "broken" in r.json()["detail"]

    (client.paths["models"] / "broken.safetensors").unlink()
    after = client.post("/api/v1/jobs", json={"prompt": "still working", **SMALL}).json()
    assert wait_done(client, after["id"])["status"] == "done"


def test_gallery_thumbnails_are_small(client):
    from PIL import Image

    big = client.paths["outputs"] / "txt2img" / "big-for-thumb.png"
    big.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (600, 400), "orange").save(big)
    image_id = client.store.add_image(job_id="x", idx=0, path="txt2img/big-for-thumb.png", request={"prompt": "b"},
                                      seed=1, width=600, height=400, model=None, model_hash=None, infotext="")
    thumb = client.get(f"/api/v1/images/{image_id}/thumb")
    assert thumb.status_code == 200
    assert Image.open(io.BytesIO(thumb.content)).size == (256, 171)
    assert len(thumb.content) < big.stat().st_size

"""Hostile (or just buggy) input: every value from outside gets a 4xx naming it, in bounded time, and no
request can break a later one. In process where the item is about data; through the real ``brushwork serve``
(uvicorn) where it is about transport: chunked bodies, raw header bytes."""

from __future__ import annotations

import base64
import io
import json
import socket
import sqlite3
import time

import httpx
import pytest

from serverkit import LiveServer, make_home, make_settings, png_b64, tiny_model_file, wait_done  # noqa: F401

SMALL = {"width": 32, "height": 32, "steps": 2}
MB = 1_000_000


@pytest.fixture(scope="module")
def home(tiny_model_file, tmp_path_factory):  # noqa: F811
    return make_home(tmp_path_factory.mktemp("hostile"), tiny_model_file, "tiny")


@pytest.fixture(scope="module")
def client(home):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    settings = make_settings(home)
    app = create_app(Engine(settings), settings)
    with TestClient(app) as c:
        c.state = app.state.brushwork
        yield c


@pytest.fixture(scope="module")
def live(home):
    server = LiveServer(home).start()
    yield server
    server.stop()


def still_serving(client) -> None:
    """What a later caller does: list jobs, images, options; all answer."""
    for path in ("/api/v1/jobs", "/api/v1/images", "/sdapi/v1/options", "/api/v1/status"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:300])


def png_with_parameters(text: str) -> str:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


# ---- 1. parsers of untrusted text are linear --------------------------------------------------------------

ADVERSARIAL = {
    "key characters, no colon": "a" * MB,
    "words and spaces, no colon": "ab " * (MB // 3),
    "quotes": '"' * MB,
    "escaped quotes": 'Steps: "' + '\\"' * (MB // 2),
    "backslashes": "Steps:" + "\\" * MB,
    "many short pairs": "a: 1," * (MB // 5),
    "many lines": "\n".join(["x" * 1000] * 1000),
    "negative prompt lines": "Negative prompt:" * (MB // 16),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_an_infotext_of_a_megabyte_parses_in_linear_time(name):
    from brushwork.output.infotext import parse_infotext, request_from_infotext

    text = ADVERSARIAL[name]
    started = time.perf_counter()
    parse_infotext(text)
    request_from_infotext(text)
    # linear: ~0.5 s on 2 quiet cores; a quadratic parse of a megabyte takes minutes. 5 s leaves room for a busy
    # machine (CI shares its cores) without letting a quadratic case through
    assert time.perf_counter() - started < 5.0


def test_the_linear_parser_finds_what_a1111s_pattern_finds():
    import random
    import re

    from brushwork.output.infotext import scan_params

    a1111 = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    alphabet = list('ab :,"\\-/\t_1é.')
    rng = random.Random(0)
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert scan_params(line) == a1111.findall(line), line
    line = 'Steps: 20, Sampler: "DPM++ 2M, Karras", Size: 512x512, Lora hashes: "a: 1, b: 2"'
    assert scan_params(line) == a1111.findall(line)


def test_png_info_of_a_hostile_picture_answers_at_once_and_the_server_keeps_serving(client):
    data = png_with_parameters("a" * 200_000)
    started = time.perf_counter()
    r = client.post("/sdapi/v1/png-info", json={"image": data})
    assert r.status_code == 200 and time.perf_counter() - started < 2.0
    assert r.json()["info"].startswith("aaaa")
    still_serving(client)


def test_brushwork_info_reads_a_hostile_picture_at_once(tmp_path):
    from click.testing import CliRunner

    from brushwork.cli import main

    path = tmp_path / "hostile.png"
    path.write_bytes(base64.b64decode(png_with_parameters("ab " * 300_000)))
    started = time.perf_counter()
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    assert result.exit_code == 0 and time.perf_counter() - started < 2.0
    assert json.loads(result.output)["Prompt"].startswith("ab ab")


# ---- 2. prompt length ----------------------------------------------------------------------------------------


def test_a_megabyte_prompt_is_refused_at_once_by_both_apis_and_the_cli(client, tiny_model_file):  # noqa: F811
    from click.testing import CliRunner

    from brushwork.cli import main
    from brushwork.request import MAX_PROMPT_CHARS

    huge = "a red circle, " * (MB // 14)
    for path, body in (("/api/v1/jobs", {"prompt": huge, **SMALL}),
                       ("/api/v1/jobs", {"negative_prompt": huge, **SMALL}),
                       ("/sdapi/v1/txt2img", {"prompt": huge, **SMALL})):
        started = time.perf_counter()
        r = client.post(path, json=body)
        assert r.status_code == 400 and time.perf_counter() - started < 5, r.text[:300]
        assert str(MAX_PROMPT_CHARS) in r.json()["detail"] and "shorten" in r.json()["detail"]
    result = CliRunner().invoke(main, ["txt2img", huge[: MAX_PROMPT_CHARS + 10], "--model", str(tiny_model_file)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "over the limit of 65536" in lines[0]
    assert client.get("/api/v1/jobs").json()["counts"]["queued"] == 0  # nothing was queued


def test_a_long_prompt_within_the_limit_still_draws(client):
    prompt = ", ".join(["masterpiece", "best quality", "(red hair:1.3)", "a castle on a hill"] * 40)  # ~8 chunks
    job = client.post("/api/v1/jobs", json={"prompt": prompt, **SMALL, "seed": 1}).json()
    assert wait_done(client, job["id"])["status"] == "done"


# ---- 3. the body limit counts the bytes that arrive ----------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_and_nothing_is_stored(live):
    from brushwork.settings import Settings

    limit = Settings().max_upload_bytes * 4 // 3 + 1024 * 1024

    def body():
        yield b'{"big": "'
        sent = 0
        while sent < limit + MB:
            yield b"x" * 65536
            sent += 65536
        yield b'"}'

    r = httpx.post(f"{live.url}/sdapi/v1/options", content=body(), timeout=60,
                   headers={"content-type": "application/json"})  # an iterator: Transfer-Encoding: chunked
    assert r.status_code == 413, r.text[:200]
    assert "big" not in httpx.get(f"{live.url}/sdapi/v1/options", timeout=30).json()
    assert httpx.get(f"{live.url}/api/v1/status", timeout=30).status_code == 200


# ---- 4, 5, 8. non-finite numbers and lone surrogates are refused, never stored ------------------------------

RAW_BAD_BODIES = [
    ("/sdapi/v1/options", '{"foo": NaN}', "NaN"),
    ("/sdapi/v1/options", '{"foo": -Infinity}', "Infinity"),
    ("/sdapi/v1/options", '{"foo": 1e999}', "too large"),
    ("/api/v1/jobs", '{"prompt": "x", "eta": NaN}', "NaN"),
    ("/api/v1/jobs", '{"prompt": "x", "cfg_scale": Infinity}', "Infinity"),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 1e999}}',
     "too large"),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": NaN}', "NaN"),
    ("/api/v1/jobs", '{"prompt": "\\ud800"}', "surrogate"),
    ("/sdapi/v1/txt2img", '{"prompt": "a \\udfff cat"}', "surrogate"),
    ("/sdapi/v1/options", '{"\\ud800": 1}', "surrogate"),
    ("/api/v1/jobs", "[" * 100_000 + "]" * 100_000, "nested"),
    ("/sdapi/v1/options", '{"seed": ' + "9" * 5000 + "}", "not valid JSON"),
]


@pytest.mark.parametrize(("path", "raw", "words"), RAW_BAD_BODIES)
def test_numbers_json_does_not_allow_and_broken_text_are_422_and_nothing_is_stored(client, path, raw, words):
    before = client.get("/api/v1/jobs").json()["counts"]
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert words in r.json()["detail"]
    assert client.get("/api/v1/jobs").json()["counts"] == before
    still_serving(client)


def test_a_prompt_with_a_lone_surrogate_is_refused_from_python_too():
    from brushwork.request import GenerationRequest, InvalidRequest

    with pytest.raises(InvalidRequest, match="lone surrogate"):
        GenerationRequest(prompt="a \udc80 cat").validate()


def test_what_an_older_version_stored_badly_cannot_break_the_answers(home, tmp_path):
    """A NaN in the options or a job's request (stored before these checks) reads back as null."""
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = {**home, "home": tmp_path / "home"}
    settings = make_settings(paths)
    app = create_app(Engine(settings), settings, start_worker=False)
    store = app.state.brushwork.store
    job = store.create({"prompt": "old", "eta": 0.0})
    db = sqlite3.connect(settings.data_dir / "brushwork.sqlite3")
    db.execute("UPDATE jobs SET request=?, status='done', result=? WHERE id=?",
               ('{"prompt": "old \\ud800", "eta": NaN}', '{"images": [], "timings": {"x": Infinity}}', job.id))
    db.execute("INSERT INTO options (key, value) VALUES ('sdapi_options', '{\"foo\": NaN}')")
    db.commit()
    db.close()
    store.close()
    app = create_app(Engine(settings), settings, start_worker=False)  # a restart on that database
    with TestClient(app) as c:
        jobs = c.get("/api/v1/jobs")
        assert jobs.status_code == 200
        assert jobs.json()["jobs"][0]["request"]["eta"] is None
        assert c.get(f"/api/v1/jobs/{job.id}").status_code == 200
        options = c.get("/sdapi/v1/options")
        assert options.status_code == 200 and options.json()["foo"] is None


def test_options_are_not_a_file_store(client):
    r = client.post("/sdapi/v1/options", json={"notes": "x" * 300_000})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert "notes" not in client.get("/sdapi/v1/options").json()
    assert client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200


# ---- 6, 7. numbers and searches that SQLite cannot take -------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/v1/images?offset=9223372036854775808", "/api/v1/jobs?offset=9223372036854775808",
    "/api/v1/history?limit=9223372036854775808", "/api/v1/images/9223372036854775808/meta",
    "/api/v1/images/9223372036854775808", "/api/v1/images/9223372036854775808/thumb",
    "/api/v1/images/-1/meta",
])
def test_integers_beyond_what_the_database_holds_are_422(client, path):
    r = client.get(path)
    assert r.status_code == 422, r.text[:300]


def test_a_search_of_many_words_is_a_clear_422_and_a_normal_one_works(client):
    r = client.get("/api/v1/images", params={"q": " ".join(["w"] * 1001)})
    assert r.status_code == 422
    r = client.get("/api/v1/images", params={"q": " ".join(f"w{i}" for i in range(40))})
    assert r.status_code == 422 and "at most 32 words" in r.json()["detail"]
    assert client.get("/api/v1/images", params={"q": " ".join(["red"] * 32)}).status_code == 200


# ---- 9, 12. authentication ------------------------------------------------------------------------------------


def test_a_non_ascii_authorization_header_is_401_not_500(home, tmp_path):
    paths = {**home, "home": tmp_path / "auth-home"}
    server = LiveServer(paths, args=("--auth", "ann:s3cret,bob:hunter2")).start()
    try:
        for raw in (b"Basic \xff\xfe\xfd", b"Basic " + base64.b64encode("ann:s3cr\u00e9t".encode("latin-1")),
                    b"Basic !!!!", b"Bearer x", b"\xe9\xe9"):
            assert raw_get(server.port, "/api/v1/status", raw) == 401
        for user, password in (("ann", "s3cret"), ("bob", "hunter2")):
            assert httpx.get(f"{server.url}/api/v1/status", auth=(user, password), timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/api/v1/status", auth=("ann", "hunter2"), timeout=30).status_code == 401
    finally:
        server.stop()


def raw_get(port: int, path: str, authorization: bytes) -> int:
    """A GET with raw header bytes (no client library would send these), returning the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization +
                  b"\r\nConnection: close\r\n\r\n")
        head = s.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


@pytest.mark.parametrize(("auth", "ok"), [("user:", False), (":pw", False), ("user", False), ("a:b,c:", False),
                                          ("a:b,c:d", True), ("ann:s3:cret", True)])
def test_auth_needs_a_user_and_a_password_for_each_entry(auth, ok):
    from brushwork.request import BrushworkError
    from brushwork.server.app import check_bind

    if ok:
        check_bind("0.0.0.0", auth)
    else:
        with pytest.raises(BrushworkError, match="user:password"):
            check_bind("0.0.0.0", auth)


# ---- minor: values the worker used to find wrong only later ---------------------------------------------------


@pytest.mark.parametrize(("body", "words"), [
    ({"fast": -5}, "fast"), ({"fast": 5000}, "fast"), ({"mask_blur": 1000}, "mask blur"),
    ({"n_iter": 10_000, "batch_size": 64}, "n_iter (batches) must be between 1 and 1000"),
    ({"n_iter": 500, "batch_size": 4}, "2000 images is over the limit"),
    ({"width": 4096, "height": 4096, "batch_size": 8}, "megapixels"),
    ({"steps": 1.5}, "steps"),
])
def test_values_the_worker_would_fail_on_are_refused_when_the_job_is_sent(client, body, words):
    before = client.get("/api/v1/jobs").json()["counts"]
    r = client.post("/api/v1/jobs", json={"prompt": "x", **SMALL, **body})
    assert 400 <= r.status_code < 500, r.text[:300]
    assert words in r.json()["detail"]
    assert client.get("/api/v1/jobs").json()["counts"] == before


def test_a_server_owner_can_lower_what_one_request_may_ask(home, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from brushwork.settings import Settings

    monkeypatch.setenv("BRUSHWORK_MAX_STEPS", "10")
    settings = Settings.load(home=tmp_path / "h", models_dir=home["models"], outputs_dir=tmp_path / "o")
    app = create_app(Engine(settings), settings, start_worker=False)
    with TestClient(app) as c:
        r = c.post("/api/v1/jobs", json={"prompt": "x", **SMALL, "steps": 11})
        assert r.status_code == 400 and "BRUSHWORK_MAX_STEPS" in r.json()["detail"]
        assert c.post("/api/v1/jobs", json={"prompt": "x", **SMALL, "steps": 10}).status_code == 202


@pytest.mark.parametrize("content", ['{"max_upload_bytes": NaN}', '{"threads": Infinity}', '{"threads": 2.5}',
                                     '{"watermark": "maybe"}', '{"models_dir": 5}'])
def test_a_bad_settings_file_is_one_line_naming_it(tmp_path, content):
    from brushwork.request import BrushworkError
    from brushwork.settings import Settings

    (tmp_path / "settings.json").write_text(content)
    with pytest.raises(BrushworkError, match="settings.json"):
        Settings.load(home=tmp_path)


def test_a_settings_file_that_is_not_an_object_is_ignored(tmp_path):
    from brushwork.settings import Settings

    (tmp_path / "settings.json").write_text("[1, 2]")
    assert Settings.load(home=tmp_path).max_steps == 1000


def test_a_tiny_png_upload_is_fine_and_a_broken_one_is_400(client):
    job = client.post("/api/v1/jobs", json={"mode": "img2img", "init_image": png_b64(), **SMALL}).json()
    assert wait_done(client, job["id"])["status"] == "done"
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["iVBORw0KGgo="], **SMALL})
    assert r.status_code == 400
    still_serving(client)


def test_an_unknown_key_in_the_settings_file_is_one_line_naming_it(tmp_path):
    from brushwork.request import BrushworkError
    from brushwork.settings import Settings

    (tmp_path / "settings.json").write_text('{"watermark": false, "watremark": true}')
    with pytest.raises(BrushworkError, match="unknown setting 'watremark'"):
        Settings.load(home=tmp_path)


def test_a_missing_config_file_is_one_line(tiny_model_file, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from brushwork.cli import main

    result = CliRunner().invoke(main, ["txt2img", "x", "--model", str(tiny_model_file), "--config",
                                       str(tmp_path / "v2-inference-v.yaml")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "config file not found" in lines[0]

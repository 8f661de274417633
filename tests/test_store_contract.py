"""The job-store contract, run against both stores: SQLite (one machine) and PostgreSQL (several servers sharing
one queue), the latter on a real throwaway server (``pgserver.py``). Plus what only a shared store must do
(a live runner keeps its job, a stalled one loses it without recording anything), the setting that picks the
store, and the server answering an A1111 txt2img on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from brushwork.request import BrushworkError, GenerationRequest
from brushwork.server.store import CANCELLED, DONE, QUEUED, RUNNING, ClaimLost, JobStore, Store, open_store
from brushwork.settings import Settings
from pgserver import pg_server, pg_url  # noqa: F401
from serverkit import decode_png, make_home, make_settings, tiny_model_file  # noqa: F401

LEASE = 1.0  # seconds; the shared store's lease, short so that a dead runner's job comes back quickly here


def _request(prompt: str = "a red circle") -> dict:
    return GenerationRequest(prompt=prompt, steps=2, width=32, height=32).to_dict()


def _row(idx: int, path: str, prompt: str = "p") -> dict:
    return {"idx": idx, "path": path, "request": {"prompt": prompt}, "seed": idx, "width": 32, "height": 32,
            "model": "tiny", "model_hash": None, "infotext": prompt}


class Opener:
    """Opens stores on one database, as separate servers (own connections) would."""

    def __init__(self, kind: str, target: str):
        self.kind, self.target, self.opened = kind, target, []

    def __call__(self, **kwargs) -> Store:
        if self.kind == "sqlite":
            store = JobStore(self.target)
        else:
            from brushwork.server.pgstore import PgJobStore

            store = PgJobStore(self.target, lease=kwargs.get("lease", LEASE))
        self.opened.append(store)
        return store

    def script(self) -> str:
        """Python that opens such a store as ``store`` in another process."""
        if self.kind == "sqlite":
            return f"from brushwork.server.store import JobStore\nstore = JobStore({self.target!r})\n"
        return (f"from brushwork.server.pgstore import PgJobStore\n"
                f"store = PgJobStore({self.target!r}, lease={LEASE})\n")


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request, tmp_path):
    target = str(tmp_path / "db.sqlite3") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    op = Opener(request.param, target)
    yield op
    for store in op.opened:
        store.close()


@pytest.fixture
def store(opener) -> Store:
    return opener()


def _child(opener: Opener, body: str) -> subprocess.Popen:
    code = opener.script() + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


# ---- the contract: both stores -----------------------------------------------------------------------


def test_jobs_are_listed_counted_and_taken_oldest_first(store):
    jobs = [store.create(_request(p), source=s) for p, s in [("one", "api"), ("two", "sdapi"), ("three", "web")]]
    assert [store.queue_position(j.id) for j in jobs] == [1, 2, 3]
    assert [j.request["prompt"] for j in store.list()] == ["three", "two", "one"]  # newest first
    assert [j.id for j in store.list(limit=1, offset=1)] == [jobs[1].id]
    assert store.get(jobs[1].id).source == "sdapi" and store.get("nope") is None and store.status("nope") is None

    claimed = store.claim_next()
    assert claimed.id == jobs[0].id and claimed.status == RUNNING and claimed.started is not None
    assert store.queue_position(jobs[0].id) is None and store.queue_position(jobs[2].id) == 2
    assert store.counts() == {"queued": 2, "running": 1, "done": 0, "failed": 0, "cancelled": 0}
    assert [j.id for j in store.list(status=QUEUED)] == [jobs[2].id, jobs[1].id]
    store.set_progress(claimed.id, 0.5)
    assert store.get(claimed.id).progress == 0.5
    store.finish(claimed.id, "failed", result={"user_error": True}, error="bad model")
    failed = store.get(claimed.id)
    assert (failed.status, failed.error, failed.result) == ("failed", "bad model", {"user_error": True})
    assert store.claim_next().id == jobs[1].id


def test_uploads_come_back_only_to_the_runner(store):
    from PIL import Image

    request = GenerationRequest(prompt="p", mode="img2img", init_image=Image.new("RGB", (16, 16), "red")).to_dict()
    job = store.create(request)
    assert store.list()[0].request["init_image"] == "<image>"
    again = GenerationRequest.from_dict(store.claim_next().request)
    assert again.init_image.getpixel((0, 0)) == (255, 0, 0)
    store.finish(job.id, CANCELLED, error="cancelled")
    assert store.get(job.id, with_inputs=True).request["init_image"] == "<image>"  # not kept once ended


def test_concurrent_claimers_never_take_the_same_job(opener):
    claimers = [opener() for _ in range(6)]  # six servers, each with its own connection
    ids = {claimers[0].create(_request(f"job {i}")).id for i in range(90)}
    taken: list[list[str]] = [[] for _ in claimers]
    start = threading.Barrier(len(claimers))

    def claim(store, out):
        start.wait()
        while True:
            job = store.claim_next()
            if job is not None:
                out.append(job.id)
            elif not store.counts()["queued"]:  # (SQLite's claim_next answers None when another won the race)
                return

    threads = [threading.Thread(target=claim, args=pair) for pair in zip(claimers, taken, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sum(taken, [])) == sorted(ids)  # each job once, none lost
    assert claimers[0].counts()["running"] == 90


def test_a_cancelled_job_never_runs_and_a_requeued_one_runs_first(store):
    running, cancelled, later = store.create(_request("a")), store.create(_request("b")), store.create(_request("c"))
    assert store.claim_next().id == running.id
    assert not store.cancel_queued(running.id)  # running: only a cancel request
    assert store.cancel_queued(cancelled.id) and store.get(cancelled.id).status == CANCELLED
    assert not store.mark_cancel_requested(later.id)
    store.requeue(running.id)  # the server stopped mid-run
    assert store.get(running.id).status == QUEUED and store.get(running.id).started is None
    assert [store.claim_next().id, store.claim_next().id] == [running.id, later.id]
    assert store.claim_next() is None
    assert store.mark_cancel_requested(later.id)


def test_a_jobs_images_are_recorded_once_and_with_its_end(store):
    job = store.create(_request())
    store.claim_next()
    broken = {k: v for k, v in _row(1, "txt2img/00001-1.png").items() if k != "seed"}
    with pytest.raises(TypeError):  # fails after the first row: none of it stays
        store.finish_done(job.id, [_row(0, "txt2img/00000-0.png"), broken], {"images": [{}, {}]})
    assert store.search_images() == [] and store.status(job.id) == RUNNING

    rows = [_row(0, "txt2img/00000-0.png"), _row(1, "txt2img/00001-1.png")]
    ids = store.finish_done(job.id, rows, {"images": [{"path": r["path"]} for r in rows]})
    again = {"images": [{}, {}]}
    assert store.finish_done(job.id, rows, again) == ids  # a retried call records nothing more
    assert [i["id"] for i in again["images"]] == ids
    done = store.get(job.id)
    assert done.status == DONE and done.progress == 1.0 and [i["id"] for i in done.result["images"]] == ids
    assert sorted(r["id"] for r in store.search_images()) == sorted(ids)
    assert [store.get_image(i)["path"] for i in ids] == ["txt2img/00000-0.png", "txt2img/00001-1.png"]


def test_a_job_whose_runner_was_killed_runs_again_and_is_recorded_once(opener):
    store = opener()
    job = store.create(_request("killed mid-run"))
    child = _child(opener, """
        job = store.claim_next()
        print(job.id, flush=True)
        import time
        time.sleep(60)  # "generating": killed here
    """)
    try:
        assert child.stdout.readline().strip() == job.id
        assert store.status(job.id) == RUNNING
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)

    restarted = opener()  # the next server start (SQLite) or another server (PostgreSQL, once the lease is over)
    assert _wait_for(restarted.recover) == 1
    rerun = restarted.claim_next()
    assert rerun.id == job.id and rerun.request["prompt"] == "killed mid-run"
    restarted.finish_done(job.id, [_row(0, "txt2img/00000-7.png")], {"images": [{}]})
    assert restarted.claim_next() is None and store.status(job.id) == DONE
    assert [r["job_id"] for r in store.search_images()] == [job.id]


def test_options_outlive_the_store(opener):
    store = opener()
    assert store.get_option("sd_model_checkpoint") is None and store.get_option("sdapi_options", {}) == {}
    store.set_option("sd_model_checkpoint", "tiny")
    store.set_option("sdapi_options", {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"})
    store.set_option("sd_model_checkpoint", "tiny2")
    store.close()
    reopened = opener()
    assert reopened.get_option("sd_model_checkpoint") == "tiny2"
    assert reopened.get_option("sdapi_options") == {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"}


def test_history_search_and_paths_kept_as_given(store):
    for i, prompt in enumerate(["a Red cat", "a blue cat on a mat", "a dog", "100% orange", "snake_case"]):
        store.add_image(job_id="j", idx=i, path=f"txt2img/{i:05d}-{i}.png", request={"prompt": prompt}, seed=i,
                        width=32, height=32, model="tiny", model_hash=None, infotext=prompt)
    assert [r["prompt"] for r in store.search_images("CAT")] == ["a blue cat on a mat", "a Red cat"]
    assert [r["prompt"] for r in store.search_images("cat red")] == ["a Red cat"]
    assert [r["prompt"] for r in store.search_images("%")] == ["100% orange"]
    assert [r["prompt"] for r in store.search_images("_")] == ["snake_case"]
    assert [r["path"] for r in store.search_images(limit=2, offset=1)] == ["txt2img/00003-3.png",
                                                                           "txt2img/00002-2.png"]
    newest = store.search_images(limit=1)[0]
    assert store.get_image(newest["id"]) == newest and store.get_image(10**12) is None


# ---- only a shared store: several runners ----------------------------------------------------------


def test_a_live_runner_keeps_its_job_and_a_stalled_one_loses_it_without_recording(pg_url):  # noqa: F811
    opener = Opener("postgres", pg_url)
    other = opener()
    job = other.create(_request("long"))
    child = _child(opener, """
        job = store.claim_next()
        print(job.id, flush=True)
        input()  # "generating" until told to record
        try:
            store.finish_done(job.id, [{"idx": 0, "path": "txt2img/late.png", "request": {}, "seed": 1, "width": 1,
                                        "height": 1, "model": None, "model_hash": None, "infotext": ""}],
                              {"images": [{}]})
            print("recorded", flush=True)
        except Exception as err:
            print(type(err).__name__, flush=True)
    """)
    try:
        assert child.stdout.readline().strip() == job.id
        time.sleep(2 * LEASE)  # longer than a lease: the heartbeat keeps it
        assert other.recover() == 0 and other.claim_next() is None and other.status(job.id) == RUNNING
        os.kill(child.pid, signal.SIGSTOP)  # stalled (a frozen machine, a network cut)
        rerun = _wait_for(other.claim_next)
        assert rerun.id == job.id
        other.finish_done(job.id, [_row(0, "txt2img/00000-1.png")], {"images": [{}]})
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == ClaimLost.__name__
        assert [r["path"] for r in other.search_images()] == ["txt2img/00000-1.png"]
        assert other.get(job.id).status == DONE
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        other.close()


# ---- choosing the store ------------------------------------------------------------------------------


def test_without_a_database_url_the_sqlite_file_in_the_data_folder_is_used(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = open_store(settings)
    try:
        assert isinstance(store, JobStore) and store.path == settings.data_dir / "brushwork.sqlite3"
    finally:
        store.close()


@pytest.mark.parametrize("url, expected", [
    ("mysql://ann:s3cret@db/brushwork", "must be a PostgreSQL URL"),
    ("postgresql://ann:s3cret@127.0.0.1:1/brushwork", "cannot use the job database"),
    ("postgresql://ann:s3cret@127.0.0.1/brushwork?sslmod=require", "not a valid PostgreSQL URL"),
])
def test_a_bad_database_url_is_one_line_naming_the_setting_without_the_password(tmp_path, monkeypatch, url,
                                                                                   expected):
    from click.testing import CliRunner

    from brushwork.cli import main

    monkeypatch.setenv("BRUSHWORK_DATABASE_URL", url)
    with pytest.raises(BrushworkError, match=expected):
        open_store(Settings.load(home=tmp_path / "home"))
    result = CliRunner().invoke(main, ["serve", "--port", "7998"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert lines[0].startswith("error: BRUSHWORK_DATABASE_URL") and expected in lines[0]
    assert "s3cret" not in lines[0] and "ann:***@" in lines[0]


# ---- the server on PostgreSQL ----------------------------------------------------------------------------


def test_the_server_on_postgresql_answers_txt2img_and_another_server_serves_its_picture(
        pg_url, tiny_model_file, tmp_path):  # noqa: F811
    import shutil

    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path / "a", tiny_model_file)
    settings = make_settings(paths, database_url=pg_url)
    with TestClient(create_app(Engine(settings), settings)) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "width": 32, "height": 32,
                                                   "steps": 2})
        assert r.status_code == 200, r.text
        assert decode_png(r.json()["images"][0]).info["parameters"].startswith("a red circle\n")
        images = client.get("/api/v1/images").json()["images"]
    client.app.state.brushwork.store.close()
    assert len(images) == 1 and images[0]["file"].startswith("txt2img/")  # relative to the outputs folder
    assert (paths["outputs"] / images[0]["file"]).is_file()
    assert not (paths["home"] / "data" / "brushwork.sqlite3").exists()

    # another machine: the same database, the outputs folder mounted somewhere else
    elsewhere = make_home(tmp_path / "b", tiny_model_file)
    shutil.copytree(paths["outputs"], elsewhere["outputs"])
    settings_b = make_settings(elsewhere, database_url=pg_url)
    app_b = create_app(Engine(settings_b), settings_b, start_worker=False)
    with TestClient(app_b) as client_b:
        picture = client_b.get(images[0]["url"])
        assert picture.status_code == 200
        assert picture.content == (paths["outputs"] / images[0]["file"]).read_bytes()
        assert client_b.get("/api/v1/status").json()["counts"]["done"] == 1
    app_b.state.brushwork.store.close()


def test_a_job_cancelled_through_another_server_on_the_same_database_stops_within_a_second_or_two(
        pg_url, tiny_model_file, tmp_path):  # noqa: F811
    """Two servers on one PostgreSQL database, no Ray: the job runs on B, the user cancels it through A (its
    DELETE /api/v1/jobs/{id}); B sees the request at its next progress save and stops; nothing is recorded."""
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path, tiny_model_file)
    settings = make_settings(paths, database_url=pg_url)
    with TestClient(create_app(Engine(settings), settings)) as runner, \
            TestClient(create_app(Engine(settings), settings, start_worker=False)) as front:
        job = runner.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 1000, "width": 32,
                                                "height": 32}).json()
        deadline = time.monotonic() + 60
        while runner.get(f"/api/v1/jobs/{job['id']}").json()["status"] != RUNNING and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        asked = time.monotonic()
        status = front.delete(f"/api/v1/jobs/{job['id']}").json()["status"]  # waits up to 5 s for the end
        took = time.monotonic() - asked
        assert status == CANCELLED and took < 5, (status, took)
        assert runner.get(f"/api/v1/jobs/{job['id']}").json()["progress"] < 0.5  # stopped, not run to its end
        assert front.get("/api/v1/images").json()["images"] == []
    for client in (runner, front):
        client.app.state.brushwork.store.close()

"""The real ``brushwork serve`` process: progress over Server-Sent Events, and surviving ``kill -9``."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serverkit import LiveServer, make_home, tiny_model_file  # noqa: F401

pytestmark = pytest.mark.slow


def read_events(url: str, timeout: float = 90) -> list[tuple[str, dict]]:
    """Every event of one job's stream, until the stream ends."""
    events, name = [], None
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def wait_status(base: str, job_id: str, statuses: tuple[str, ...], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/api/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}")


class Live:
    """One server for this module (starting one loads torch and the model: seconds on a busy CPU)."""

    def __init__(self, paths):
        self.paths = paths
        self.server = LiveServer(paths).start()

    def restart(self) -> None:
        self.server.stop()
        self.server = LiveServer(self.paths).start()


@pytest.fixture(scope="module")
def live(tiny_model_file, tmp_path_factory):  # noqa: F811
    holder = Live(make_home(tmp_path_factory.mktemp("live"), tiny_model_file, "tiny"))
    yield holder
    holder.server.stop()


def test_progress_streams_as_server_sent_events(live):
    base = live.server.url
    first = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "first", "width": 32, "height": 32,
                                                    "steps": 30, "seed": 1}).json()
    second = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "a red circle", "width": 32, "height": 32,
                                                     "steps": 40, "seed": 2}).json()
    events = read_events(f"{base}/api/v1/jobs/{second['id']}/events")
    names = [n for n, _ in events]
    # waits its turn behind the first job, then reports its steps as they go, then the result
    assert names[0] == "queued" and events[0][1]["position"] >= 1
    assert names[-1] == "done"
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == sorted(steps) and len(set(steps)) >= 3 and max(steps) <= 40
    assert all(d["total"] == 40 and 0 <= d["fraction"] <= 1 for n, d in events if n == "progress")
    previews = [d["preview"] for n, d in events if n == "progress" and d["preview"]]
    assert previews and previews[0].startswith("data:image/png;base64,")
    job = events[-1][1]["job"]
    assert job["status"] == "done" and job["result"]["images"][0]["seed"] == 2
    assert httpx.get(base + job["result"]["images"][0]["url"]).status_code == 200
    assert wait_status(base, first["id"], ("done",))["status"] == "done"


def test_an_accepted_job_survives_kill_9_and_runs_after_restart(live):
    paths = live.paths
    base = live.server.url
    running = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "survivor", "width": 32, "height": 32,
                                                      "steps": 40, "seed": 7}).json()
    queued = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "patient", "width": 32, "height": 32,
                                                     "steps": 3, "seed": 8}).json()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/api/v1/jobs/{running['id']}").json()
        if job["status"] == "running" and job.get("step", 0) >= 3:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the first job never got going")
    live.server.kill9()  # mid-run, no chance to clean up

    # restart on the same data folder: the very same jobs must finish, in order
    live.restart()
    base = live.server.url
    after = httpx.get(f"{base}/api/v1/jobs/{running['id']}").json()
    assert after["status"] in ("queued", "running")
    assert after["request"]["prompt"] == "survivor" and after["request"]["steps"] == 40
    for job_id, seed in ((running["id"], 7), (queued["id"], 8)):
        done = wait_status(base, job_id, ("done", "failed", "cancelled"))
        assert done["status"] == "done", done["error"]
        image = done["result"]["images"][0]
        assert image["seed"] == seed
        assert (paths["outputs"] / image["path"]).stat().st_size > 0
        assert httpx.get(base + image["url"]).status_code == 200
    # no half-written files are left in the outputs folder by the crash
    assert not [p for p in paths["outputs"].rglob("*") if p.name.startswith(".tmp")]


def test_a_second_server_on_the_same_data_folder_is_refused(live):
    import os
    import subprocess
    import sys

    env = dict(os.environ, BRUSHWORK_HOME=str(live.paths["home"]))
    proc = subprocess.run([sys.executable, "-m", "brushwork.cli", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another brushwork server" in lines[0], proc.stderr
    assert httpx.get(live.server.url + "/api/v1/status").status_code == 200  # the first one is unharmed


def _numbered(folder) -> set[str]:
    """The pictures in an outputs folder (``00042-<seed>.png``), tmp links left out."""
    import os
    import re

    try:
        return {n for n in os.listdir(folder) if re.match(r"^\d{5}-.*\.png$", n)}
    except FileNotFoundError:
        return set()


def test_kill_9_right_after_a_picture_is_written_still_records_each_picture_once(live):
    import sqlite3

    paths = live.paths
    folder = paths["outputs"] / "txt2img"
    database = paths["home"] / "data" / "brushwork.sqlite3"
    jobs, hits, round_ = [], 0, 0
    while round_ < 3 or (hits < 2 and round_ < 6):  # a kill can miss the moment: then a few more rounds
        round_ += 1
        base = live.server.url
        before = _numbered(folder)
        for i in range(2):  # four pictures a job: a kill can fall between the files and the job's end
            r = httpx.post(f"{base}/api/v1/jobs", json={"prompt": f"once {round_} {i}", "width": 32, "height": 32,
                                                        "steps": 2, "seed": 100 + 10 * round_ + i,
                                                        "batch_size": 4})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
        deadline = time.monotonic() + 60
        while not _numbered(folder) - before:
            assert time.monotonic() < deadline, "no picture was written"
            time.sleep(0.002)
        live.server.kill9()  # a picture is there; its job is (most likely) not yet on record
        with sqlite3.connect(database) as db:
            on_record = {row[0] for row in db.execute("SELECT path FROM images")}
        hits += bool({f"txt2img/{n}" for n in _numbered(folder)} - on_record)
        live.restart()

    base = live.server.url
    for job_id in jobs:
        done = wait_status(base, job_id, ("done", "failed", "cancelled"))
        assert done["status"] == "done", done["error"]
        assert len(done["result"]["images"]) == 4
    listed = httpx.get(f"{base}/api/v1/images", params={"limit": 500}).json()["images"]
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT id, job_id, idx, path FROM images").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert sorted(r[0] for r in rows) == sorted(i["id"] for i in listed)
    for job_id in jobs:  # one row per picture of the job, and the job's result names those rows
        mine = sorted((r[2], r[0]) for r in rows if r[1] == job_id)
        assert [idx for idx, _ in mine] == [0, 1, 2, 3], (job_id, mine)
        result = httpx.get(f"{base}/api/v1/jobs/{job_id}").json()["result"]
        assert sorted(i["id"] for i in result["images"]) == sorted(image_id for _, image_id in mine)
    # exactly as many pictures in the folder as rows, each row's file there, and no tmp left
    files = {f"txt2img/{n}" for n in _numbered(folder)}
    recorded = [r[3] for r in rows if r[3].startswith("txt2img/")]
    assert len(recorded) == len(set(recorded)) == len(files) and set(recorded) == files
    assert all((paths["outputs"] / path).stat().st_size > 0 for path in recorded)
    assert not [p for p in paths["outputs"].rglob(".tmp-*")]
    assert hits >= 1, "no kill fell between a picture and its job's end: the test did not test anything"

"""`brushwork serve --ray`: the same app on a real local Ray cluster (Ray Serve, two CPU replicas of one core each,
the bundled mini model under two names), answering a real HTTP client.

One cluster for the module (starting Ray and the replicas is most of the time). The routing test runs first, on
replicas that hold no model yet; the others do not depend on what is loaded where.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from serverkit import decode_png, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'brushwork[ray]')")
pytestmark = pytest.mark.slow  # a Ray cluster and two replicas: about a minute on 2 cores

SIZE = {"width": 64, "height": 64}


def _pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import httpx
    import ray
    from ray import serve

    from brushwork.models.store import bundled_model_path
    from brushwork.server.rayserve import APP_NAME, build_app, replica_plan
    from brushwork.settings import Settings

    base = tmp_path_factory.mktemp("ray-serve")
    models = base / "models"
    models.mkdir()
    for name in ("a", "b"):  # one model under two names: two models for the router, the same pictures
        shutil.copyfile(bundled_model_path(), models / f"{name}.safetensors")
    settings = Settings(home=base / "home", models_dir=models, outputs_dir=base / "outputs", device="cpu",
                        ray_cpus_per_replica=1, ray_min_replicas=2, ray_max_replicas=2)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=False)
    except Exception as err:  # no shared memory, no ports, ...: say why in one line
        pytest.skip(f"Ray could not start a local cluster here: {type(err).__name__}: {str(err).splitlines()[0]}")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        plan = replica_plan(settings, ray.cluster_resources())
        assert plan["min_replicas"] == plan["max_replicas"] == 2 and plan["ray_actor_options"] == {"num_cpus": 1}
        serve.run(build_app(settings, plan, auth="ann:pw-ann,bob:pw-bob"), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=180, auth=("ann", "pw-ann")) as client, \
                httpx.Client(base_url=url, timeout=180, auth=("bob", "pw-bob")) as other:
            assert httpx.get(f"{url}/api/v1/status").status_code == 401  # the app's auth, behind Serve's proxy
            yield SimpleNamespace(client=client, other=other, settings=settings, base=base)
    finally:
        serve.shutdown()
        ray.shutdown()


def _submit(client, **body) -> str:
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", **SIZE, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def _ran_on(client, job_id: str) -> int:
    return client.get("/api/v1/cluster").json()["recent"][job_id]["pid"]


def test_a_second_request_for_a_model_goes_to_the_replica_that_holds_it(cluster):
    client = cluster.client
    pids = {}
    for model in ("a", "b", "a", "b"):
        job = _wait(client, _submit(client, model=model, steps=2, seed=1))
        assert job["status"] == "done", job["error"]
        pids.setdefault(model, []).append(_ran_on(client, job["id"]))
    # each model stays where it was loaded; the second went to the replica that held none
    assert len(set(pids["a"])) == 1 and len(set(pids["b"])) == 1, pids
    assert pids["a"][0] != pids["b"][0], pids
    replicas = {r["pid"]: r["model"] for r in client.get("/api/v1/cluster").json()["replicas"]}
    assert replicas == {pids["a"][0]: "a", pids["b"][0]: "b"}


def test_unload_checkpoint_unloads_every_replicas_model(cluster):
    """A1111's POST /sdapi/v1/unload-checkpoint (memory back, e.g. before another program uses the GPU) reaches
    every replica, not only the ingress; the next job loads its model again."""
    client = cluster.client
    held = {r["pid"]: r["model"] for r in client.get("/api/v1/cluster").json()["replicas"]}
    assert sorted(held.values()) == ["a", "b"], held  # from the routing test
    assert client.post("/sdapi/v1/unload-checkpoint").status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replicas = client.get("/api/v1/cluster").json()["replicas"]
        if all(r["model"] is None for r in replicas):
            break
        time.sleep(0.2)
    assert [r["model"] for r in replicas] == [None, None], replicas
    job = _wait(client, _submit(client, model="a", steps=2, seed=1))
    assert job["status"] == "done" and job["result"]["timings"]["load_s"] > 0.05, job


def test_concurrent_requests_through_serve_give_the_local_servers_pictures(cluster, tmp_path):
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from brushwork.settings import Settings

    bodies = [{"prompt": f"a blue square number {seed}", "seed": seed, "steps": 6, **SIZE,
               "override_settings": {"sd_model_checkpoint": "a"}} for seed in (11, 12, 13)]
    answers: dict[int, object] = {}

    def post(i: int) -> None:
        answers[i] = cluster.client.post("/sdapi/v1/txt2img", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    served = []
    for i in range(len(bodies)):
        r = answers[i]
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["all_seeds"] == [bodies[i]["seed"]]
        served.append(decode_png(r.json()["images"][0]))

    local = Settings(home=tmp_path / "local-home", models_dir=cluster.settings.models_dir,
                     outputs_dir=tmp_path / "local-outputs", device="cpu")
    with TestClient(create_app(Engine(local), local)) as client:
        for body, picture in zip(bodies, served, strict=True):
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            mine = decode_png(r.json()["images"][0])
            assert (_pixels(mine) == _pixels(picture)).all(), f"seed {body['seed']}: Serve's picture differs"
            assert mine.info["parameters"] == picture.info["parameters"]


def test_progress_interrupt_and_cancel_reach_the_replica_running_the_job(cluster):
    client, other = cluster.client, cluster.other
    theirs = _submit(other, prompt="someone else's slow job", steps=300, seed=6)  # bob's, on one replica
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = other.get(f"/api/v1/jobs/{theirs}").json()
        if job["status"] == "running" and job.get("step", 0) >= 1:
            break
        time.sleep(0.1)
    assert job.get("step", 0) >= 1, job  # the native API sees the replica's steps too

    answer = {}

    def run():  # ann's, on the other replica
        answer["r"] = client.post("/sdapi/v1/txt2img", json={"prompt": "slow", "seed": 5, "steps": 300, **SIZE})

    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["job"] != theirs and p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.1)
    assert seen is not None, "the caller's job's progress never reached the ingress"
    mine = [j["id"] for j in client.get("/api/v1/jobs", params={"status": "running"}).json()["jobs"] if j["id"] != theirs]
    assert seen["state"]["job"] in mine and seen["state"]["job_count"] == 2  # each caller sees their own job
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 300
    assert decode_png(seen["current_image"]).size == (64, 64)  # the replica's live preview
    assert other.get("/sdapi/v1/progress").json()["state"]["job"] == theirs

    started = time.monotonic()
    assert client.post("/sdapi/v1/interrupt").status_code == 200  # ann's job stops, bob's goes on
    thread.join(60)
    assert not thread.is_alive() and time.monotonic() - started < 10
    r = answer["r"]
    assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is True
    assert len(r.json()["images"]) == 1 and "Seed: 5" in decode_png(r.json()["images"][0]).info["parameters"]
    assert other.get(f"/api/v1/jobs/{theirs}").json()["status"] == "running"

    assert other.post(f"/api/v1/jobs/{theirs}/cancel").status_code == 200
    job = _wait(other, theirs, timeout=20)
    assert job["status"] == "cancelled"
    assert not client.get("/api/v1/images", params={"q": "someone else"}).json()["images"]


def test_a_replica_killed_mid_run_loses_no_accepted_job(cluster):
    client = cluster.client
    prompt = "a green triangle that survives a kill"
    job_id = _submit(client, prompt=prompt, model="a", steps=40, seed=21)
    deadline, running = time.monotonic() + 60, None
    while time.monotonic() < deadline and running is None:
        for entry in client.get("/api/v1/cluster").json()["running"]:
            if entry["job_id"] == job_id and entry["pid"] and entry["fraction"] > 0:
                running = entry
        time.sleep(0.05)
    assert running is not None, "the job never started on a replica"
    os.kill(running["pid"], signal.SIGKILL)

    job = _wait(client, job_id, timeout=120)
    assert job["status"] == "done", job["error"]
    assert _ran_on(client, job_id) != running["pid"]  # it ran again, elsewhere
    images = client.get("/api/v1/images", params={"q": prompt}).json()["images"]
    assert len(images) == 1 and images[0]["seed"] == 21  # recorded once
    outputs = Path(cluster.settings.outputs_dir)
    assert not list(outputs.rglob(".tmp-*"))
    files = [p for p in outputs.rglob("*.png") if prompt in (decode_png_file(p).info.get("parameters") or "")]
    assert len(files) == 1  # and on disk once


def decode_png_file(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


@pytest.mark.parametrize(("share", "gpus", "actor", "most"), [
    (1.0, 4, {"num_gpus": 1, "num_cpus": 1}, 4),  # one replica per card
    (0.5, 4, {"num_gpus": 0.5, "num_cpus": 1}, 8),  # two small models on each card
    (2, 4, {"num_gpus": 2, "num_cpus": 1}, 2),
    (0.5, 0, {"num_cpus": 4}, 4),  # no GPU: by cores (16 / 4)
])
def test_replicas_are_sized_by_whole_or_fractional_gpus(share, gpus, actor, most, tmp_path):
    from brushwork.server.rayserve import replica_plan
    from brushwork.settings import Settings

    plan = replica_plan(Settings.load(home=tmp_path, ray_gpus_per_replica=str(share)), {"GPU": gpus, "CPU": 16})
    assert (plan["ray_actor_options"], plan["max_replicas"]) == (actor, most)


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "half", "nan"])
def test_a_bad_gpu_share_is_one_line(bad, tmp_path, monkeypatch):
    from brushwork.request import BrushworkError
    from brushwork.settings import Settings

    monkeypatch.setenv("BRUSHWORK_RAY_GPUS_PER_REPLICA", bad)
    with pytest.raises(BrushworkError, match=f"setting ray_gpus_per_replica must be a fraction of a GPU .*, got "
                                             f"'{bad}'; fix BRUSHWORK_RAY_GPUS_PER_REPLICA"):
        Settings.load(home=tmp_path)

"""Ray Serve scale-out on this machine's CPUs: pictures per minute with 1 and 2 generation replicas, and what the
Serve path adds to one request compared with the single-machine server.

    .venv/bin/python benchmarks/ray_scale.py                      # 8 jobs of 10 steps, 64x64, the mini model
    .venv/bin/python benchmarks/ray_scale.py --jobs 16 --steps 20 --out benchmarks/results/ray_scale.json

Everything is real: a local Ray cluster (``ray.init(num_cpus=...)``), ``brushwork.server.rayserve.build_app``
deployed with Serve behind its HTTP proxy, the bundled mini model, and for comparison ``brushwork serve`` (the
single-machine server) in its own process. Each replica gets ``--cpus-per-replica`` cores (torch uses that many threads); the
local server's torch gets the same, so "1 replica" and "local" do the same work per picture.

- throughput: ``--jobs`` native jobs posted at once, then followed to the end; pictures per minute from the
  first post to the last job done. 2 replicas on a 2-core machine can at best double it.
- overhead: ``--rounds`` sequential native jobs of 1 step each, on a warm replica (its model loaded) and on the
  warm local server: the median of each request's time outside the engine's run (HTTP, queueing, dispatch,
  saving; the run is the result's ``timings.total_s``), and the difference of the two. The
  single-machine server is measured before and after Serve, as the load of a shared machine changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_flags() -> list[str]:
    from brushwork.engine.device import _cpu_flags

    wanted = ("avx", "fma", "amx", "sse4", "f16c", "vnni")
    return sorted(f for f in _cpu_flags() if f.startswith(wanted) or "bf16" in f)


def follow(client, job_ids: list[str], timeout: float = 900) -> None:
    """Wait until every job has finished, with one listing request every 0.2 s (polling each job often would
    load the single-machine server's process, where the pictures are made, more than a real client does)."""
    deadline, left = time.monotonic() + timeout, set(job_ids)
    while left:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(left)} job(s) did not finish in {timeout}s")
        time.sleep(0.2)
        for status in ("done", "failed", "cancelled"):
            jobs = client.get("/api/v1/jobs", params={"status": status, "limit": 500}).json()["jobs"]
            finished = left & {j["id"] for j in jobs}
            if finished and status != "done":
                raise SystemExit(f"job {next(iter(finished))} {status}")
            left -= finished


def throughput(client, jobs: int, steps: int, size: int) -> dict:
    started = time.monotonic()
    ids = [client.post("/api/v1/jobs", json={"prompt": f"a red circle {i}", "seed": i, "steps": steps,
                                             "width": size, "height": size}).json()["id"] for i in range(jobs)]
    follow(client, ids)
    wall = time.monotonic() - started
    return {"jobs": jobs, "wall_s": round(wall, 2), "pictures_per_minute": round(jobs * 60 / wall, 1)}


def latency(client, rounds: int, size: int) -> dict:
    """Sequential 1-step jobs on a warm server: the whole request (post, then polled every 10 ms to its end) and
    what of it was not the engine's run (the result's ``timings.total_s``): the path's own cost (HTTP, queueing,
    dispatch, writing the PNG and its record), which depends much less on how busy the CPUs are."""
    body = {"prompt": "a blue square", "seed": 1, "steps": 1, "width": size, "height": size}

    def one() -> tuple[float, float]:
        t0 = time.perf_counter()
        job = client.post("/api/v1/jobs", json=body).json()
        while job["status"] not in ("done", "failed", "cancelled"):
            time.sleep(0.01)
            job = client.get(f"/api/v1/jobs/{job['id']}").json()
        total = time.perf_counter() - t0
        assert job["status"] == "done", job["error"]
        return total, total - job["result"]["timings"]["total_s"]

    one()  # warm: the model is loaded
    runs = [one() for _ in range(rounds)]
    return {"rounds": rounds, "median_request_s": round(statistics.median(r[0] for r in runs), 4),
            "median_outside_run_s": round(statistics.median(r[1] for r in runs), 4)}


def local_server(settings, threads: int):
    """``brushwork serve`` (app.py's server, its worker thread) in its own process, as a user runs it, with torch
    limited to ``threads``. Returns (process, url)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BRUSHWORK_HOME": str(settings.home), "BRUSHWORK_MODELS_DIR": str(settings.models_dir),
           "BRUSHWORK_OUTPUTS_DIR": str(settings.outputs_dir), "BRUSHWORK_DEVICE": "cpu", "BRUSHWORK_WATERMARK": "0",
           "BRUSHWORK_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "brushwork.cli", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/v1/status", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the local server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cpus-per-replica", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ray_scale.json"))
    args = parser.parse_args()
    started = time.time()

    import httpx
    import ray
    from ray import serve
    from step import machine, write_results

    from brushwork.models.store import bundled_model_path
    from brushwork.server.rayserve import APP_NAME, build_app, replica_plan
    from brushwork.settings import Settings

    results: dict = {"machine": {**machine(), "cpu_flags": cpu_flags()},
                     "settings": {"jobs": args.jobs, "steps": args.steps, "size": args.size, "rounds": args.rounds,
                                  "cpus_per_replica": args.cpus_per_replica, "model": "bundled mini"}}
    base = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    try:
        (base / "models").mkdir()
        shutil.copyfile(bundled_model_path(), base / "models" / "mini.safetensors")

        def settings_for(name: str, replicas: int = 1) -> Settings:
            return Settings(home=base / name, models_dir=base / "models", outputs_dir=base / name / "outputs",
                            device="cpu", watermark=False, ray_cpus_per_replica=args.cpus_per_replica,
                            ray_min_replicas=replicas, ray_max_replicas=replicas)

        # the single-machine server, as the baseline
        def run_local(name: str) -> dict:
            process, url = local_server(settings_for(name), args.cpus_per_replica)
            try:
                with httpx.Client(base_url=url, timeout=600) as client:
                    entry = {"latency_1_step": latency(client, args.rounds, args.size),
                             "throughput": throughput(client, args.jobs, args.steps, args.size)}
            finally:
                process.terminate()
                process.wait(30)
            print(name, entry, flush=True)
            return entry

        # the single-machine server, before and after Serve: on a shared machine the load changes meanwhile
        results["local_before"] = run_local("local_before")

        ray.init(address="local", num_cpus=2 * args.cpus_per_replica, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results["serve"] = {}
        for replicas in (1, 2):
            settings = settings_for(f"serve{replicas}", replicas)
            plan = replica_plan(settings, ray.cluster_resources())
            t0 = time.monotonic()
            serve.run(build_app(settings, plan), name=APP_NAME, route_prefix="/")
            deploy_s = time.monotonic() - t0
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                warm = latency(client, args.rounds, args.size) if replicas == 1 else None
                # every replica loads the model before the clock starts (a request waits a second or two for
                # the replica holding its model, then goes to another, which loads it)
                follow(client, [client.post("/api/v1/jobs", json={"prompt": "warm", "steps": args.steps, "seed": 1,
                                                                  "width": args.size, "height": args.size}
                                            ).json()["id"] for _ in range(3 * replicas)])
                entry = {"deploy_s": round(deploy_s, 1), "throughput": throughput(client, args.jobs, args.steps,
                                                                                  args.size)}
                if replicas == 1:
                    entry["latency_1_step"] = warm
                served_on = {r["pid"] for r in client.get("/api/v1/cluster").json()["replicas"]}
                entry["replicas_seen"] = len(served_on)
            results["serve"][f"{replicas}_replicas"] = entry
            print(f"serve {replicas}", entry, flush=True)
            serve.delete(APP_NAME)
        serve.shutdown()
        ray.shutdown()
        results["local_after"] = run_local("local_after")
        one = results["serve"]["1_replicas"]["throughput"]["pictures_per_minute"]
        two = results["serve"]["2_replicas"]["throughput"]["pictures_per_minute"]
        results["speedup_2_vs_1_replicas"] = round(two / one, 2)
        local_outside = statistics.mean(results[k]["latency_1_step"]["median_outside_run_s"]
                                        for k in ("local_before", "local_after"))
        serve_outside = results["serve"]["1_replicas"]["latency_1_step"]["median_outside_run_s"]
        results["serve_overhead_per_request_s"] = round(serve_outside - local_outside, 4)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    write_results(results, started, args.out)


if __name__ == "__main__":
    main()

"""Server load benchmark: N concurrent clients against a real ``brushwork serve`` process.

    .venv/bin/python benchmarks/server_load.py                    # 20 clients, tiny model, 32x32, 4 steps
    .venv/bin/python benchmarks/server_load.py --clients 50 --steps 8 --size 64
    .venv/bin/python benchmarks/server_load.py --url http://127.0.0.1:7860 --model mini   # an existing server

Half the clients use the A1111 API (``POST /sdapi/v1/txt2img``, which waits for the picture), half
the native API (``POST /api/v1/jobs`` then the job's Server-Sent Events until ``done``). All start
at once. Checks that every request completes with a picture and that no job is lost (the job table
holds exactly one finished job per request), and reports latency (p50/p95/max, seconds from
request to picture), throughput, and the server's resident memory before and after.

Without ``--url`` it starts its own server on a temporary data folder with a tiny random model in
the real SD 1.x layout (``tests/tinymodels.py``): speed depends on the architecture's size, not on
its weights, so this measures the server (queue, database, HTTP, SSE), not the model.
Writes the JSON report to stdout and to benchmarks/results/server_load.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def sdapi_client(base: str, i: int, args, out: dict) -> None:
    import httpx

    body = {"prompt": f"load test {i}", "seed": 1000 + i, "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "Euler a"}
    if args.model:
        body["override_settings"] = {"sd_model_checkpoint": args.model}
    started = time.perf_counter()
    try:
        r = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=args.timeout)
        ok = r.status_code == 200 and len(r.json()["images"]) == 1 and base64.b64decode(r.json()["images"][0])[:8] \
            == b"\x89PNG\r\n\x1a\n"
        seed = json.loads(r.json()["info"])["seed"] if ok else None
        out[i] = {"api": "sdapi", "ok": ok and seed == 1000 + i, "status": r.status_code,
                  "latency_s": time.perf_counter() - started}
    except Exception as err:  # a failed client is a result to report, not a crash of the benchmark
        out[i] = {"api": "sdapi", "ok": False, "error": f"{type(err).__name__}: {err}",
                  "latency_s": time.perf_counter() - started}


def native_client(base: str, i: int, args, out: dict) -> None:
    import httpx

    body = {"prompt": f"load test {i}", "seed": 1000 + i, "steps": args.steps, "width": args.size,
            "height": args.size}
    if args.model:
        body["model"] = args.model
    started = time.perf_counter()
    try:
        job = httpx.post(f"{base}/api/v1/jobs", json=body, timeout=60).json()
        final, events = None, 0
        with httpx.stream("GET", f"{base}/api/v1/jobs/{job['id']}/events?previews=false",
                          timeout=args.timeout) as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events += 1
                    if name in ("done", "error", "cancelled"):
                        final = (name, json.loads(line[6:]))
        ok = final is not None and final[0] == "done"
        if ok:
            image = final[1]["job"]["result"]["images"][0]
            png = httpx.get(base + image["url"], timeout=60)
            ok = png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n" and image["seed"] == 1000 + i
        out[i] = {"api": "native", "ok": ok, "job": job["id"], "events": events,
                  "latency_s": time.perf_counter() - started}
    except Exception as err:
        out[i] = {"api": "native", "ok": False, "error": f"{type(err).__name__}: {err}",
                  "latency_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--api", choices=["mixed", "sdapi", "native"], default="mixed")
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="model name from the server's library (default: its default)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads for the server started here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server_load.json"))
    args = parser.parse_args()

    import httpx

    server, tmp = None, None
    if args.url:
        base, pid = args.url.rstrip("/"), None
    else:
        from serverkit import LiveServer, make_home
        from tinymodels import save_single

        tmp = Path(tempfile.mkdtemp(prefix="brushwork-load-"))
        model = save_single(tmp / "tiny.safetensors", "sd1", seed=0)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        server = LiveServer(make_home(tmp, model, "tiny")).start()
        base, pid = server.url, server.proc.pid

    try:
        # warm up: the first job loads the model; that is not what we measure
        warm_started = time.perf_counter()
        r = httpx.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "warm up", "steps": 1, "width": args.size,
                                                          "height": args.size}, timeout=args.timeout)
        r.raise_for_status()
        warmup_s = time.perf_counter() - warm_started
        before_counts = httpx.get(f"{base}/api/v1/jobs", params={"limit": 1}).json()["counts"]
        rss_before = rss_bytes(pid) if pid else None

        results: dict[int, dict] = {}
        threads = []
        for i in range(args.clients):
            use_sdapi = args.api == "sdapi" or (args.api == "mixed" and i % 2 == 0)
            target = sdapi_client if use_sdapi else native_client
            threads.append(threading.Thread(target=target, args=(base, i, args, results)))
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rss_after = rss_bytes(pid) if pid else None
        after_counts = httpx.get(f"{base}/api/v1/jobs", params={"limit": 1}).json()["counts"]
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    latencies = [r["latency_s"] for r in results.values() if r["ok"]]
    new_done = after_counts["done"] - before_counts["done"]
    report = {
        "benchmark": "server_load",
        "clients": args.clients,
        "api": args.api,
        "steps": args.steps,
        "size": f"{args.size}x{args.size}",
        "completed": sum(1 for r in results.values() if r["ok"]),
        "failed": [dict(r, client=i) for i, r in sorted(results.items()) if not r["ok"]],
        "jobs_done_on_server": new_done,
        "jobs_lost": args.clients - new_done,
        "jobs_left_queued_or_running": after_counts["queued"] + after_counts["running"],
        "latency_s": {"p50": round(percentile(latencies, 0.5), 3), "p95": round(percentile(latencies, 0.95), 3),
                      "max": round(max(latencies), 3) if latencies else None,
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "wall_s": round(wall, 3),
        "images_per_s": round(len(latencies) / wall, 3) if wall else None,
        "warmup_s": round(warmup_s, 3),
        "server_rss_mb": {"before": round(rss_before / 2**20, 1) if rss_before else None,
                          "after": round(rss_after / 2**20, 1) if rss_after else None},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "server_threads": args.threads},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    ok = report["completed"] == args.clients and report["jobs_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

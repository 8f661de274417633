"""Property-based fuzzing of the whole HTTP API (both APIs, every operation in /openapi.json) with schemathesis.

The real ``brushwork serve`` process with the tiny model; the server's own request limits are set low
(3 steps, 64 pixels a side, 2 images) so that the generation requests the fuzzer gets through finish in
well under a second. What must hold: no answer is a 5xx, and the server still serves afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serverkit import LiveServer, make_home, tiny_model_file  # noqa: F401

pytestmark = pytest.mark.slow

BUDGET_S = int(os.environ.get("BRUSHWORK_FUZZ_SECONDS", "90"))


def test_no_request_the_fuzzer_makes_gets_a_server_error(tiny_model_file, tmp_path, monkeypatch):  # noqa: F811
    for name, value in (("MAX_STEPS", "3"), ("MAX_SIDE", "64"), ("MAX_IMAGES", "2")):
        monkeypatch.setenv(f"BRUSHWORK_{name}", value)
    paths = make_home(tmp_path, tiny_model_file, "tiny")
    server = LiveServer(paths).start()
    report = tmp_path / "report"
    try:
        cli = Path(sys.executable).with_name("schemathesis")
        proc = subprocess.run(
            [str(cli), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "15", "--max-time", str(BUDGET_S), "--workers", "1", "--request-timeout", "30",
             "--seed", "1", "--no-shrink", "--report", "json", "--report-dir", str(report)],
            capture_output=True, text=True, timeout=BUDGET_S + 120, cwd=tmp_path,
        )
        results = json.loads(next(report.glob("*.json")).read_text())
        cases = results["test_cases"]
        operations = len(results["operations"]) if isinstance(results["operations"], list | dict) else "?"
        print(f"\nschemathesis: {operations} operations, {cases['generated']} cases, "
              f"{cases['with_failures']} with failures, {len(results['errors'])} errors, "
              f"{results['running_time']:.0f} s")
        assert cases["generated"] > 500, proc.stdout[-3000:]
        assert cases["with_failures"] == 0 and not results["failures"], proc.stdout[-6000:]
        assert not results["errors"], proc.stdout[-6000:]
        assert proc.returncode == 0, proc.stdout[-6000:]
        # and the server is still there and still works: a real picture after all that
        assert server.proc.poll() is None
        job = httpx.post(f"{server.url}/api/v1/jobs", json={"prompt": "still here", "steps": 2, "width": 32,
                                                             "height": 32, "seed": 3}, timeout=30).json()
        for _ in range(600):
            job = httpx.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=30).json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            import time

            time.sleep(0.1)
        assert job["status"] == "done", job
        assert httpx.get(f"{server.url}/api/v1/images", timeout=30).status_code == 200
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()

"""Shared pieces for the server tests: a tiny real model library, settings, a live server process.

No engine is mocked: the tiny model goes through the real loader and pipeline, just small
(32x32 pictures, a few steps) so the whole server suite stays quick on a CPU.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """One tiny SD 1.x checkpoint in the original single-file layout, built once per session."""
    from tinymodels import save_single

    folder = tmp_path_factory.mktemp("tiny-model")
    return save_single(folder / "tiny.safetensors", "sd1", seed=0)


def make_home(base: Path, model_file: Path, *names: str) -> dict[str, Path]:
    """A brushwork home with a models folder holding ``model_file`` under each of ``names``."""
    home, models, outputs = base / "home", base / "models", base / "outputs"
    models.mkdir(parents=True, exist_ok=True)
    for name in names or ("tiny",):
        shutil.copyfile(model_file, models / f"{name}.safetensors")
    return {"home": home, "models": models, "outputs": outputs}


def make_settings(paths: dict[str, Path], **overrides):
    from brushwork.settings import Settings

    return Settings(home=paths["home"], models_dir=paths["models"], outputs_dir=paths["outputs"], **overrides)


def png_b64(size=(32, 32), color=(200, 40, 40)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def wait_done(client, job_id: str, timeout: float = 60) -> dict:
    """Poll a job (through a TestClient or any client with .get) until it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``brushwork serve`` in a subprocess (the real command, real uvicorn), for SSE and crash tests."""

    def __init__(self, paths: dict[str, Path], port: int | None = None, args: tuple[str, ...] = ()):
        self.paths = paths
        self.args = tuple(args)  # more options for `brushwork serve` (e.g. --auth)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = paths["home"].parent / f"server-{self.port}.log"

    def start(self, timeout: float = 60) -> LiveServer:
        import httpx

        env = dict(os.environ)
        env.update({
            "BRUSHWORK_HOME": str(self.paths["home"]),
            "BRUSHWORK_MODELS_DIR": str(self.paths["models"]),
            "BRUSHWORK_OUTPUTS_DIR": str(self.paths["outputs"]),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",  # tiny models: one thread is fastest, and the machine is shared
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        })
        self.paths["home"].mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "brushwork.cli", "serve", "--port", str(self.port), *self.args],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(self.paths["home"].parent),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/api/v1/status", timeout=2).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no cleanup, like a crash or a power cut
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

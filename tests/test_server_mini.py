"""A fresh install: no model in the library; the server uses the bundled mini model, and a picture made
through the server is exactly the one the Python API makes for the same request."""

from __future__ import annotations

import io
import time


def test_a_fresh_install_serves_the_bundled_model_and_the_same_picture_as_the_library(tmp_path):
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from brushwork import GenerationRequest
    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app
    from brushwork.settings import Settings

    prompt = "a red circle in the center, on a white background"
    settings = Settings(home=tmp_path / "home", models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    engine = Engine(settings)
    direct = engine.generate(GenerationRequest(prompt=prompt, seed=7, steps=20)).images[0]

    with TestClient(create_app(engine, settings)) as client:
        models = client.get("/api/v1/models").json()["models"]
        assert [m["name"] for m in models] == ["mini"] and models[0]["current"]
        assert models[0]["defaults"] == {"cfg_scale": 2.0, "cfg_end": 0.85}  # the web UI's CFG fields follow them
        job = client.post("/api/v1/jobs", json={"prompt": prompt, "seed": 7, "steps": 20}).json()
        deadline = time.monotonic() + 120
        while job["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert job["status"] == "done", job["error"]
        assert any("bundled mini model" in note for note in job["result"]["notes"])  # the user is told why
        png = client.get(job["result"]["images"][0]["url"]).content

    served = Image.open(io.BytesIO(png))
    assert served.size == (64, 64)  # the model's native size when none is asked for
    assert "Model: mini" in served.info["parameters"] and "Seed: 7" in served.info["parameters"]
    assert "CFG scale: 2," in served.info["parameters"]  # no scale asked for: the model's own
    assert "CFG end: 0.85," in served.info["parameters"]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(direct.convert("RGB")))

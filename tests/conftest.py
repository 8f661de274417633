"""Shared fixtures: offline environment, tiny models in every format, an engine with its own home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests must never reach the network: any hidden download fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # the tiny test models gain nothing from threads, and threads fight over 2 cores
    import torch

    torch.set_num_threads(1)


_frozen_at = 0  # len(sys.modules) when the garbage collector last froze what was alive


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The engine runs gc.collect() in every generation (and each out-of-memory retry); with torch, diffusers and
    transformers imported that walks ~500k long-lived objects (module globals, functions, classes): most of a
    tiny model's generation time. Whenever new modules have been imported, collect once and freeze what is left
    (gc.freeze: a full collection then skips those objects; they are still freed by reference counting). Nothing
    a test checks changes: the engine's collections still run, over the objects the tests create."""
    import gc

    global _frozen_at
    if len(sys.modules) != _frozen_at:
        gc.collect()
        gc.freeze()
        _frozen_at = len(sys.modules)


@pytest.fixture(scope="session", autouse=True)
def _scratch_folder(tmp_path_factory):
    """Module- and session-wide fixtures are made before a test's own scratch folder (``_isolated_home``): they
    run in a session one, so nothing they make (a server's relative outputs/ folder) lands in the checkout."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("scratch"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own brushwork home (models, cache, data) and runs in a scratch folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("BRUSHWORK_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny random models: tiny["sd1"]["safetensors" | "ckpt" | "diffusers"], same weights per family."""
    from tinymodels import FAMILY_SPECS, save_diffusers, save_single

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILY_SPECS:
        out[family] = {
            "safetensors": save_single(root / f"tiny-{family}.safetensors", family),
            "ckpt": save_single(root / f"tiny-{family}.ckpt", family),
        }
    out["sd1"]["diffusers"] = save_diffusers(root / "tiny-sd1-diffusers", "sd1")
    return out


@pytest.fixture
def engine(tmp_path):
    from brushwork import Engine, Settings

    return Engine(Settings(home=tmp_path / "home"))


def pytest_unconfigure(config):
    """One line at the very end when the browser tests could not run, naming what was not tested and the fix."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [r for r in reporter.stats.get("skipped", []) if "test_webui" in getattr(r, "nodeid", "")]
    if skipped:
        reporter.write_line(
            f"NOT TESTED: the web UI in a real browser ({len(skipped)} tests skipped: Chromium is not installed); "
            "install it with `apt-get install chromium` (as root) or run `make test` as root", yellow=True)
    no_pg = [r for r in reporter.stats.get("skipped", []) if "PostgreSQL is not installed" in str(r.longrepr)]
    if no_pg:
        reporter.write_line(
            f"NOT TESTED: the PostgreSQL job store ({len(no_pg)} tests skipped: PostgreSQL is not installed); "
            "install it with `apt-get install postgresql` (as root) or run `make test` as root", yellow=True)
    no_s3 = [r for r in reporter.stats.get("skipped", []) if "Swift (an S3-compatible store)" in str(r.longrepr)]
    if no_s3:
        reporter.write_line(
            f"NOT TESTED: the pictures' S3 bucket ({len(no_s3)} tests skipped: no S3-compatible store is installed); "
            "install Swift with `apt-get install swift-proxy swift-object swift-container swift-account` (as root) "
            "or run `make test` as root", yellow=True)

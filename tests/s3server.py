"""A real, throwaway S3-compatible object store for the bucket tests: OpenStack Swift with its ``s3api`` middleware
(Debian's ``swift-proxy``, ``swift-object``, ``swift-container``, ``swift-account``), never a mock.

``s3_server`` (once per session) lays out a one-disk, one-replica Swift in a temporary folder (rings built with
``swift-ring-builder``, the four servers on free local ports, ``tempauth`` with one account whose S3 access key
is ``test:tester`` and secret ``testing``), waits until it answers S3 calls, and stops it at the end. Without the
binaries the tests that need it are skipped with one line saying how to install them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

INSTALL_HINT = ("Swift (an S3-compatible store) is not installed: apt-get install swift-proxy swift-object "
                "swift-container swift-account (as root), or run `make test` as root")
ACCESS_KEY, SECRET_KEY = "test:tester", "testing"
SERVERS = ("account", "container", "object")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed() -> bool:
    return all(shutil.which(f"swift-{name}-server") for name in (*SERVERS, "proxy")) and bool(
        shutil.which("swift-ring-builder"))


class S3Server:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="brushwork-s3-"))
        self.ports = {name: _free_port() for name in (*SERVERS, "proxy")}
        self.endpoint = f"http://127.0.0.1:{self.ports['proxy']}"
        self.procs: list[subprocess.Popen] = []

    def _conf(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def start(self) -> None:
        f = self.folder
        (f / "srv" / "d1").mkdir(parents=True)
        self._conf("swift.conf", "[swift-hash]\nswift_hash_path_suffix = brushwork\nswift_hash_path_prefix = "
                                 "brushwork\n[storage-policy:0]\nname = gold\ndefault = yes\n")
        common = f"mount_check = false\nbind_ip = 127.0.0.1\nworkers = 0\nuser = {os.environ.get('USER') or 'root'}" \
                 f"\nswift_dir = {f}\ndevices = {f / 'srv'}\n"
        env = {**os.environ, "SWIFT_DIR": str(f)}
        confs = {}
        for name in SERVERS:
            for args in (("create", "6", "1", "1"), ("add", f"r1z1-127.0.0.1:{self.ports[name]}/d1", "1"),
                         ("rebalance",)):
                subprocess.run(["swift-ring-builder", str(f / f"{name}.builder"), *args], check=True,
                               capture_output=True, timeout=60, env=env)
            confs[name] = self._conf(f"{name}-server.conf", f"[DEFAULT]\n{common}bind_port = {self.ports[name]}\n"
                                     f"[pipeline:main]\npipeline = {name}-server\n[app:{name}-server]\n"
                                     f"use = egg:swift#{name}\n")
        filters = "".join(f"[filter:{n}]\nuse = egg:swift#{n}\n" for n in ("catch_errors", "gatekeeper",
                                                                            "listing_formats", "s3api", "copy"))
        confs["proxy"] = self._conf("proxy-server.conf", (
            f"[DEFAULT]\n{common}bind_port = {self.ports['proxy']}\n"
            "[pipeline:main]\npipeline = catch_errors gatekeeper proxy-logging cache listing_formats s3api tempauth "
            "copy proxy-logging proxy-server\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\nallow_account_management = true\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n"
            "[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:1\n"  # none: tokens uncached
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {SECRET_KEY} .admin\n{filters}"))
        for name, conf in confs.items():
            log = open(f / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the server's life)
            self.procs.append(subprocess.Popen([shutil.which(f"swift-{name}-server"), str(conf)], stdout=log,
                                               stderr=subprocess.STDOUT, env=env))
        self._wait()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def _wait(self, timeout: float = 180.0) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                self.client().list_buckets()
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.5)
        logs = "\n".join((self.folder / f"{n}.log").read_text(errors="replace")[-800:] for n in (*SERVERS, "proxy"))
        self.stop()
        raise RuntimeError(f"Swift did not come up ({last}):\n{logs}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    if not _installed():
        pytest.skip(INSTALL_HINT)
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """boto3's credentials for the store, as a user sets them (the AWS_* environment)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server

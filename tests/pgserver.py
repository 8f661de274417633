"""A real, throwaway PostgreSQL server for the job-store tests: Debian's ``postgresql`` binaries, never a mock.

``pg_server`` (once per session) runs ``initdb`` into a temporary folder and ``pg_ctl start`` listening only on a
unix socket in that folder (as the ``postgres`` user when the tests run as root: the server refuses root), and
stops it at the end. ``pg_url`` gives each test a fresh schema of its own, as a ``postgresql://`` URL. Without
the binaries the tests that need them are skipped with one line saying how to install them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql (as root), or run `make test` as root"


def _version(pg_ctl: str) -> float:
    name = Path(pg_ctl).parents[1].name  # /usr/lib/postgresql/<version>/bin/pg_ctl
    try:
        return float(name)
    except ValueError:
        return 0.0


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PgServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="brushwork-pg-"))
        self.data = self.folder / "data"
        self.as_postgres = os.geteuid() == 0
        self.port = 5432  # only a socket in our own folder: no port is shared with anything
        if self.as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self.user = "postgres" if self.as_postgres else (os.environ.get("USER") or "postgres")

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        proc = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stdout}{proc.stderr}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        options = f"-c listen_addresses='' -c unix_socket_directories={self.folder} -c port={self.port} -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                  "-o", options, "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, schema: str | None = None) -> str:
        url = f"postgresql://{self.user}@/postgres?host={quote(str(self.folder))}&port={self.port}"
        return url + (f"&options={quote(f'-csearch_path={schema}')}" if schema else "")


@pytest.fixture(scope="session")
def pg_server():
    bindir = _bindir()
    if bindir is None:
        pytest.skip(INSTALL_HINT)
    server = PgServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A URL whose tables land in a schema of this test's own."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.url(), autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    return pg_server.url(schema)

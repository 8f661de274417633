"""The server's persistent job queue and image history: SQLite (WAL), safe to share between threads.

A job is accepted only once its row is committed, so a crash (even ``kill -9`` mid-run) loses
nothing: on startup, jobs left ``running`` go back to ``queued`` and run again (``recover``). A job's
images and its end are one transaction (``finish_done``). Data read back is made safe to answer with
(``store_loads``), whatever an older version stored.

Nothing here knows about HTTP or the engine; ``worker.py`` runs the jobs. ``Store`` is what every job store
offers; ``open_store(settings)`` picks one: this SQLite file (one machine, the default) or, with
``BRUSHWORK_DATABASE_URL=postgresql://...``, a PostgreSQL database several servers share (``pgstore.py``).
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..settings import Settings

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
INPUT_IMAGES = ("init_image", "mask_image", "depth_map", "controlnet")  # kept apart from the request: listing jobs must not read megabytes
IMAGE_MARK = "<image>"
DB_NAME = "brushwork.sqlite3"  # in the data folder
JSON_INPUTS = ("controlnet",)  # inputs kept as JSON (the ControlNet units: their settings stay in the request, marked)


def _marked(name: str, value: Any) -> Any:
    """What the stored request shows of an input: the mark, or (ControlNet units) each unit with its pictures marked."""
    if name in JSON_INPUTS and isinstance(value, list):
        return [{**u, **{k: IMAGE_MARK for k in ("image", "mask") if u.get(k)}} if isinstance(u, dict) else u
                for u in value]
    return IMAGE_MARK

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT 'api',
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER,
    width INTEGER,
    height INTEGER,
    model TEXT,
    model_hash TEXT,
    sampler TEXT,
    steps INTEGER,
    cfg_scale REAL,
    infotext TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_job ON images (job_id);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS options (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: Any) -> Any:
    """A copy safe to send as JSON: non-finite floats become None, lone surrogates U+FFFD."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def store_loads(text: str) -> Any:
    """JSON read back from the job store: lenient (older versions stored NaN), and cleaned."""
    return clean(json.loads(text, parse_constant=lambda _: None))


@dataclass
class Job:
    id: str
    status: str
    request: dict[str, Any]
    created: float
    source: str = "api"
    started: float | None = None
    finished: float | None = None
    progress: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def finished_ok(self) -> bool:
        return self.status == DONE

    def public(self, *, with_images: bool = False) -> dict[str, Any]:
        """A JSON-safe view for the HTTP APIs; init/mask images are left out unless asked for."""
        request = dict(self.request)
        if not with_images:
            for key in INPUT_IMAGES:
                if request.get(key) is not None and key not in JSON_INPUTS:  # the units are marked when stored
                    request[key] = IMAGE_MARK
        return {
            "id": self.id,
            "status": self.status,
            "source": self.source,
            "request": request,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": self.progress,
            "error": self.error,
            "result": self.result,
        }


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        source=row["source"],
        request=store_loads(row["request"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        progress=row["progress"],
        error=row["error"],
        result=store_loads(row["result"]) if row["result"] else None,
        cancel_requested=bool(row["cancel_requested"]),
    )


class ClaimLost(Exception):
    """The job is no longer this worker's (a shared store gave it to another after this one's lease ran out):
    nothing of this run was recorded, and its files must go."""


class Store(Protocol):
    """What a job store offers the server (``JobStore`` here, ``pgstore.PgJobStore``): the queue, the history, the
    options. ``errors`` are the exception types meaning "the database is unavailable right now" (the worker
    carries on); ``finish_done`` is atomic and records a job's images once, however often it is called."""

    errors: tuple[type[BaseException], ...]

    def close(self) -> None: ...
    def recover(self) -> int: ...
    def create(self, request: dict[str, Any], *, source: str = "api") -> Job: ...
    def get(self, job_id: str, *, with_inputs: bool = False) -> Job | None: ...
    def status(self, job_id: str) -> str | None: ...
    def list(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]: ...
    def counts(self) -> dict[str, int]: ...
    def queue_position(self, job_id: str) -> int | None: ...
    def claim_next(self) -> Job | None: ...
    def finish(self, job_id: str, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> None: ...
    def finish_done(self, job_id: str, images: list[dict[str, Any]], result: dict[str, Any]) -> list[int]: ...
    def set_progress(self, job_id: str, progress: float) -> None: ...
    def cancel_queued(self, job_id: str) -> bool: ...
    def requeue(self, job_id: str) -> None: ...
    def mark_cancel_requested(self, job_id: str) -> bool: ...
    def get_option(self, key: str, default: Any = None) -> Any: ...
    def set_option(self, key: str, value: Any) -> None: ...
    def add_image(self, *, job_id: str, idx: int, path: str, request: dict[str, Any], seed: int | None,
                  width: int, height: int, model: str | None, model_hash: str | None, infotext: str) -> int: ...
    def get_image(self, image_id: int) -> dict[str, Any] | None: ...
    def search_images(self, query: str = "", *, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]: ...


DATABASE_SCHEMES = ("postgresql://", "postgres://")


def open_store(settings: Settings) -> Store:
    """The job store the settings ask for: ``database_url`` (``BRUSHWORK_DATABASE_URL``) a PostgreSQL URL, or
    unset: the SQLite file in the data folder. A bad URL or a database that cannot be reached is one
    ``BrushworkError`` line naming the setting."""
    url = (settings.database_url or "").strip()
    if not url:
        return JobStore(settings.data_dir / DB_NAME)
    from ..request import BrushworkError

    if not url.lower().startswith(DATABASE_SCHEMES):
        raise BrushworkError(f"BRUSHWORK_DATABASE_URL must be a PostgreSQL URL (postgresql://user:password@host/db), "
                             f"got {_shown_url(url)!r}; unset it to keep the jobs in SQLite")
    from .pgstore import PgJobStore, StoreUnreachable

    try:
        return PgJobStore(url)
    except StoreUnreachable as err:
        raise BrushworkError(f"BRUSHWORK_DATABASE_URL={_shown_url(url)}: {err}") from err


def _shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", url)


def prompt_matches(query: str, *, like: str, mark: str) -> tuple[str, list[Any]]:
    """`` WHERE prompt LIKE ? AND ...`` (empty for no words) and its parameters: every word of ``query`` a
    substring of the prompt, with ``%``, ``_`` and ``\\`` taken literally. ``like``/``mark``: the database's
    operator (LIKE, ILIKE) and parameter mark (?, %s)."""
    words = [w for w in query.split() if w]
    if not words:
        return "", []
    escaped = [w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for w in words]
    return (" WHERE " + " AND ".join(f"prompt {like} {mark} ESCAPE '\\'" for _ in words),
            [f"%{e}%" for e in escaped])


class JobStore:
    """Jobs and the image history in one SQLite database (WAL). Safe to share between threads."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an accepted job is on disk before we answer
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    # ---- jobs ---------------------------------------------------------------------------------

    def recover(self) -> int:
        """After a crash: jobs that were running go back to the queue (or end, if cancelled). Returns how many."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, finished=?, error='cancelled' WHERE status=? AND cancel_requested=1",
                (CANCELLED, time.time(), RUNNING),
            )
            cur = self._db.execute(
                "UPDATE jobs SET status=?, started=NULL, progress=0 WHERE status=?", (QUEUED, RUNNING)
            )
            return cur.rowcount

    def create(self, request: dict[str, Any], *, source: str = "api") -> Job:
        inputs = {k: request[k] for k in INPUT_IMAGES if request.get(k)}
        stored = {**request, **{k: _marked(k, v) for k, v in inputs.items()}}
        inputs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in inputs.items()}
        job = Job(id=uuid.uuid4().hex, status=QUEUED, request=stored, created=time.time(), source=source)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
                self._db.execute(
                    "INSERT INTO jobs (id, seq, status, source, request, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.id, seq, job.status, source, json.dumps(stored), job.created),
                )
                for name, data in inputs.items():
                    self._db.execute("INSERT INTO job_inputs (job_id, name, data) VALUES (?, ?, ?)",
                                     (job.id, name, data))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job

    def get(self, job_id: str, *, with_inputs: bool = False) -> Job | None:
        """One job; ``with_inputs`` puts the uploaded images back into its request (for running it)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _row_to_job(row)
            if with_inputs:
                for name, data in self._db.execute("SELECT name, data FROM job_inputs WHERE job_id=?", (job_id,)):
                    job.request[name] = json.loads(data) if name in JSON_INPUTS else data
        return job

    def status(self, job_id: str) -> str | None:
        row = self._execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row[0] if row else None

    def list(self, *, status: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        if status:
            rows = self._execute(
                "SELECT * FROM jobs WHERE status=? ORDER BY seq DESC LIMIT ? OFFSET ?", (status, limit, offset)
            ).fetchall()
        else:
            rows = self._execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_row_to_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = {s: 0 for s in STATUSES}
        out.update({r[0]: r[1] for r in rows})
        return out

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to run; None when the job is not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if not row or row["status"] != QUEUED:
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status=? AND seq<=?", (QUEUED, row["seq"])
            ).fetchone()[0]

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to running and return it."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE status=? ORDER BY seq LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            cur = self._db.execute(
                "UPDATE jobs SET status=?, started=?, progress=0 WHERE id=? AND status=?",
                (RUNNING, time.time(), row["id"], QUEUED),
            )
            if cur.rowcount != 1:
                return None
            return self.get(row["id"], with_inputs=True)

    def finish(self, job_id: str, status: str, *, result: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, finished=?, progress=?, result=?, error=? WHERE id=?",
                (status, time.time(), 1.0 if status == DONE else 0.0,
                 json.dumps(result) if result is not None else None, error, job_id),
            )
            self._db.execute("DELETE FROM job_inputs WHERE job_id=?", (job_id,))  # uploads are only needed to run

    def finish_done(self, job_id: str, images: list[dict[str, Any]], result: dict[str, Any]) -> list[int]:
        """One transaction: the job's images join the history (``add_image``'s keywords, one dict each), the
        job is done with ``result`` and its uploads go. ``result["images"][i]["id"]`` gets each row's id.
        A job already done keeps what it has (a second call records nothing and answers its images' ids)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is not None and row[0] == DONE:
                    ids = [r[0] for r in self._db.execute("SELECT id FROM images WHERE job_id=? ORDER BY idx, id",
                                                          (job_id,))]
                    for entry, image_id in zip(result.get("images", []), ids, strict=False):
                        entry["id"] = image_id
                    self._db.execute("COMMIT")
                    return ids
                ids = [self._insert_image(job_id=job_id, **image) for image in images]
                for entry, image_id in zip(result.get("images", []), ids, strict=False):
                    entry["id"] = image_id
                self._db.execute(
                    "UPDATE jobs SET status=?, finished=?, progress=1.0, result=?, error=NULL WHERE id=?",
                    (DONE, time.time(), json.dumps(result), job_id),
                )
                self._db.execute("DELETE FROM job_inputs WHERE job_id=?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return ids

    def set_progress(self, job_id: str, progress: float) -> None:
        self._execute("UPDATE jobs SET progress=? WHERE id=?", (progress, job_id))

    def cancel_queued(self, job_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status=?, finished=?, error='cancelled' WHERE id=? AND status=?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            if cur.rowcount == 1:
                self._db.execute("DELETE FROM job_inputs WHERE job_id=?", (job_id,))
            return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """A running job interrupted by a shutdown goes back to the front of the queue."""
        self._execute("UPDATE jobs SET status=?, started=NULL, progress=0 WHERE id=? AND status=?",
                      (QUEUED, job_id, RUNNING))

    def mark_cancel_requested(self, job_id: str) -> bool:
        cur = self._execute(
            "UPDATE jobs SET cancel_requested=1 WHERE id=? AND status=?", (job_id, RUNNING)
        )
        return cur.rowcount == 1

    # ---- options that outlive a restart (the selected model, ...) ------------------------------

    def get_option(self, key: str, default: Any = None) -> Any:
        row = self._execute("SELECT value FROM options WHERE key=?", (key,)).fetchone()
        return store_loads(row[0]) if row else default

    def set_option(self, key: str, value: Any) -> None:
        self._execute("INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, json.dumps(value)))

    # ---- image history ------------------------------------------------------------------------

    def add_image(self, *, job_id: str, idx: int, path: str, request: dict[str, Any], seed: int | None,
                  width: int, height: int, model: str | None, model_hash: str | None, infotext: str) -> int:
        with self._lock:
            return self._insert_image(job_id=job_id, idx=idx, path=path, request=request, seed=seed, width=width,
                                      height=height, model=model, model_hash=model_hash, infotext=infotext)

    def _insert_image(self, *, job_id: str, idx: int, path: str, request: dict[str, Any], seed: int | None,
                      width: int, height: int, model: str | None, model_hash: str | None, infotext: str) -> int:
        cur = self._db.execute(
            "INSERT INTO images (job_id, idx, path, prompt, negative_prompt, seed, width, height, model, model_hash,"
            " sampler, steps, cfg_scale, infotext, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, idx, path, request.get("prompt", ""), request.get("negative_prompt", ""), seed, width, height,
             model, model_hash, request.get("sampler"), request.get("steps"), request.get("cfg_scale"),
             infotext, time.time()),
        )
        return int(cur.lastrowid)

    def get_image(self, image_id: int) -> dict[str, Any] | None:
        row = self._execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        return dict(row) if row else None

    def search_images(self, query: str = "", *, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first; ``query`` matches the prompt (case-insensitive substring, every word must match)."""
        where, params = prompt_matches(query, like="LIKE", mark="?")
        sql = "SELECT * FROM images" + where
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        params += [limit, offset]
        return [dict(r) for r in self._execute(sql, tuple(params)).fetchall()]

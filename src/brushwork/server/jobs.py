"""The server's persistent job queue (SQLite, WAL) and the worker thread that drains it.

A job is accepted only once its row is committed, so a crash (even ``kill -9`` mid-run) loses
nothing: on startup, jobs left ``running`` go back to ``queued`` and run again. A job's images are
recorded exactly once: each file is written atomically with a second link, ``.tmp-<job id>-*.png``,
kept until the one transaction that adds its history rows and marks the job done has committed;
at the next start ``recover_outputs`` removes the files of a run that was killed before that.

Nothing here knows about HTTP: ``app.py``, ``sdapi.py`` and ``api.py`` translate to and from it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..request import BrushworkError, Cancelled, GenerationRequest, ProgressInfo

log = logging.getLogger("brushwork.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
INPUT_IMAGES = ("init_image", "mask_image")  # kept apart from the request: listing jobs must not read megabytes
IMAGE_MARK = "<image>"

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
                if request.get(key) is not None:
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


class JobStore:
    """Jobs and the image history in one SQLite database (WAL). Safe to share between threads."""

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
        stored = {**request, **{k: IMAGE_MARK for k in inputs}}
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
                    job.request[name] = data
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
        job is done with ``result`` and its uploads go. ``result["images"][i]["id"]`` gets each row's id."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
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
        words = [w for w in query.split() if w]
        sql = "SELECT * FROM images"
        params: list[Any] = []
        if words:
            sql += " WHERE " + " AND ".join("prompt LIKE ? ESCAPE '\\'" for _ in words)
            for w in words:
                escaped = w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                params.append(f"%{escaped}%")
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        params += [limit, offset]
        return [dict(r) for r in self._execute(sql, tuple(params)).fetchall()]


@dataclass
class LiveProgress:
    """What the running job is doing right now (kept in memory; the database holds the rest)."""

    job_id: str
    started: float
    step: int = 0
    total: int = 0
    batch: int = 0
    batches: int = 1
    fraction: float = 0.0
    preview: Any = None  # a small PIL image, or None
    preview_version: int = 0
    textinfo: str = ""
    sampling_since: tuple[float, float] | None = None  # (time, fraction) at the first step: loading is not sampling
    skipped: bool = False
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eta_relative(self) -> float:
        """Seconds left, from the speed of the steps so far (model loading does not count)."""
        if self.sampling_since is None or self.fraction <= self.sampling_since[1]:
            return 0.0
        since, fraction0 = self.sampling_since
        rate = (self.fraction - fraction0) / max(1e-6, time.time() - since)
        return max(0.0, (1.0 - self.fraction) / rate)


class Worker:
    """One thread per device: takes the oldest queued job, runs it on the engine, saves its images.

    ``engine`` is a ``brushwork.engine.core.Engine`` (anything with ``generate(request, *, progress,
    cancel, want_previews)``). ``save(result, outputs_dir, job_id)`` writes a result's images and returns
    ``(path, tmp)`` pairs: ``tmp`` a second link to the file, ``.tmp-<job_id>-*.png`` in its folder
    (``brushwork.output.files.write_linked``), which the worker removes once the job is on record.
    """

    def __init__(self, store: JobStore, engine: Any, outputs_dir: Path, *,
                 save: Callable[[Any, Path, str], list[tuple[Path, Path]]] | None = None,
                 poll_interval: float = 0.5,
                 name: str = "brushwork-worker"):
        self.store = store
        self.engine = engine
        self.outputs_dir = Path(outputs_dir)
        self._save = save or _save_result
        self._poll_interval = poll_interval
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None
        self._interrupt: threading.Event | None = None  # A1111's interrupt: stop, but keep what is there
        self._skip: threading.Event | None = None  # A1111's skip: end the current batch that way, go on
        self.live: LiveProgress | None = None
        self.engine_lock = threading.Lock()  # held while the engine runs; others (unload) take it too
        self.last_finished: tuple[str, str] | None = None  # (job id, status) of the last job that ended

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._cancel is not None:
                self._cancel.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def notify(self) -> None:
        """A job was queued: wake the worker now instead of at the next poll."""
        self._wake.set()

    # ---- cancel -------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job. Returns the job's status afterwards, or None if unknown."""
        if self.store.cancel_queued(job_id):
            return CANCELLED
        with self._lock:
            live, event = self.live, self._cancel
            if live is not None and live.job_id == job_id and event is not None:
                self.store.mark_cancel_requested(job_id)
                live.interrupted = True
                event.set()
                return RUNNING  # stops within a step
        return self.store.status(job_id)

    def interrupt_current(self, *, skipped: bool = False) -> str | None:
        """As A1111's interrupt: the running job ends after its current step and keeps its pictures (the
        unfinished ones too); ``skipped``: only its current batch ends so, and the next batch starts.
        Returns the job's id, or None when idle."""
        with self._lock:
            live, event = self.live, (self._skip if skipped else self._interrupt)
        if live is None or event is None:
            return None
        if skipped:
            live.skipped = True
        else:
            live.interrupted = True
        event.set()
        return live.job_id

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
            except sqlite3.Error:
                log.exception("job store unavailable")
                job = None
            if job is None:
                self._wake.wait(self._poll_interval)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception:  # e.g. the disk is full: keep serving; the job is queued again at the next start
                log.exception("could not record the end of job %s", job.id)
                time.sleep(self._poll_interval)

    def run_job(self, job: Job) -> None:
        cancel, interrupt, skip = threading.Event(), threading.Event(), threading.Event()
        live = LiveProgress(job_id=job.id, started=time.time())
        with self._lock:
            self._cancel, self._interrupt, self._skip, self.live = cancel, interrupt, skip, live
        status, result, error, recorded = FAILED, None, None, False
        try:
            request = GenerationRequest.from_dict(job.request).validate()
            live.total, live.batches = request.steps, request.n_iter

            saved_at = [0.0]

            def on_progress(info: ProgressInfo) -> None:
                live.step, live.total, live.batch, live.batches = info.step, info.total, info.batch, info.batches
                live.fraction = info.fraction
                if live.skipped and not skip.is_set():
                    live.skipped = False  # the skipped batch has ended; the next one runs (as A1111 resets it)
                now = time.time()
                if live.sampling_since is None:
                    live.sampling_since = (now, info.fraction)
                if now - saved_at[0] >= 1.0:  # the database copy of the progress, at most once a second
                    saved_at[0] = now
                    self.store.set_progress(job.id, info.fraction)
                if info.preview is not None:
                    live.preview = info.preview
                    live.preview_version += 1
                if cancel.is_set():
                    raise Cancelled("cancelled")

            with self.engine_lock:
                out = self.engine.generate(request, progress=on_progress, cancel=cancel, interrupt=interrupt,
                                           skip=skip, want_previews=True)
            if cancel.is_set():
                raise Cancelled("cancelled")
            result = self._record(job, out)  # marks the job done, in the transaction that adds its images
            status, recorded = DONE, True
        except Cancelled:
            # the server is stopping (not a user's cancel): the job runs again after the restart
            status, error = (QUEUED, None) if self._stop.is_set() and not live.interrupted else (CANCELLED, "cancelled")
        except BrushworkError as err:  # the caller's mistake (bad model, bad image, ...): HTTP 4xx
            status, error, result = FAILED, str(err), {"error_type": type(err).__name__, "user_error": True}
        except Exception as err:  # a bug or an engine crash must not kill the worker: the job fails, we go on
            log.exception("job %s failed", job.id)
            status, error = FAILED, f"internal error: {type(err).__name__}: {err}"
            result = {"error_type": type(err).__name__, "user_error": False}
        finally:
            with self._lock:
                self._cancel, self._interrupt, self._skip, self.live = None, None, None, None
                self.last_finished = (job.id, status)
            if status == QUEUED:
                self.store.requeue(job.id)
            elif not recorded:
                self.store.finish(job.id, status, result=result, error=error)

    def _record(self, job: Job, out: Any) -> dict[str, Any]:
        """Write the images (atomically), then add them to the history and mark the job done in one
        transaction, and return the job's result. A crash in between leaves the files' tmp links, which
        ``recover_outputs`` reads at the next start: the images are recorded exactly once."""
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        saved = self._save(out, self.outputs_dir, job.id)
        try:
            result, rows = self._result(job, out, [Path(path) for path, _ in saved])
            self.store.finish_done(job.id, rows, result)
        except Exception:
            self._discard(job.id, saved)
            raise
        for _, tmp in saved:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:  # harmless: removed at the next start, the job being done
                log.warning("could not remove %s", tmp)
        return result

    def _discard(self, job_id: str, saved: list[tuple[Path, Path]]) -> None:
        """The job could not be recorded: its files go too (unless it is done after all, or we cannot tell:
        then the next start sorts them out)."""
        try:
            if self.store.status(job_id) == DONE:
                return
        except sqlite3.Error:
            return
        for path, tmp in saved:
            for p in {Path(path), Path(tmp)}:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    log.warning("could not remove %s", p)

    def _result(self, job: Job, out: Any, paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The job's result, and its images' history rows (``JobStore.add_image``'s keywords)."""
        images, rows = [], []
        root = self.outputs_dir.resolve()
        ran = getattr(out, "request", None)  # what ran: open settings filled in by the model's defaults
        asked = ({**job.request, "cfg_scale": ran.cfg_scale, "cfg_end": ran.cfg_end} if ran is not None
                 else job.request)
        for i, path in enumerate(paths):
            image = out.images[i] if i < len(out.images) else None
            seed = out.seeds[i] if i < len(out.seeds) else None
            infotext = out.infotexts[i] if i < len(out.infotexts) else ""
            try:
                rel = str(Path(path).resolve().relative_to(root))
            except ValueError:
                rel = str(path)
            width, height = image.size if image is not None else (0, 0)
            rows.append({"idx": i, "path": rel, "request": asked, "seed": seed, "width": width, "height": height,
                         "model": out.model_name, "model_hash": out.model_hash, "infotext": infotext})
            images.append({"id": None, "path": rel, "seed": seed, "width": width, "height": height,
                           "infotext": infotext})
        result = {
            "images": images,
            "seeds": list(out.seeds),
            "infotexts": list(out.infotexts),
            "model_name": out.model_name,
            "model_hash": out.model_hash,
            "notes": list(getattr(out, "notes", []) or []),
            "timings": dict(getattr(out, "timings", {}) or {}),
            "interrupted": bool(getattr(out, "interrupted", False)),
        }
        return result, rows


def _save_result(result: Any, outdir: Path, job_id: str) -> list[tuple[Path, Path]]:
    from ..output.files import save_result_linked

    return save_result_linked(result, outdir, job_id, grid=False)


def recover_outputs(store: JobStore, outputs_dir: Path, data_dir: Path | None = None) -> dict[str, int]:
    """At startup, after ``store.recover()`` and before the worker runs: remove what killed writes left.

    A job's ``.tmp-<job id>-*.png`` still there means the job was not recorded when the server died:
    if the job runs again, the file(s) that run made go with it (the rerun writes them anew), so every
    job ends with its images exactly once. Also: old command-line tmps, and half-made thumbnails.
    """
    from ..output.files import clean_journal

    def job_done(job_id: str) -> bool | None:
        status = store.status(job_id)
        return None if status is None else status == DONE

    removed = clean_journal(outputs_dir, job_done)
    thumbs = Path(data_dir) / "thumbs" if data_dir is not None else None
    if thumbs is not None and thumbs.is_dir():  # one server per data folder: nobody else is writing these
        for tmp in thumbs.glob("tmp*.webp"):
            tmp.unlink(missing_ok=True)
            removed["tmps"] += 1
    if removed["images"] or removed["tmps"]:
        log.info("removed %d unrecorded image(s) and %d temporary file(s) left by a crash",
                 removed["images"], removed["tmps"])
    return removed

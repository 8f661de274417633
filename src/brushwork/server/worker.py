"""The worker thread that drains the job queue: one job at a time on the engine, its images recorded once.

Each picture is written atomically with a second link, ``.tmp-<job id>-*.png``, kept until the one
transaction that adds its history rows and marks the job done has committed; at the next start
``recover_outputs`` removes the files of a run that was killed before that, so every job ends with
its images exactly once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..output.bucket import StorageError
from ..request import BrushworkError, Cancelled, GenerationRequest, ProgressInfo
from .store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, ClaimLost, Job, Store

log = logging.getLogger("brushwork.server")
# the request's settings that the model's defaults fill where it leaves them open (engine.run.model_defaults)
FILLED_FIELDS = ("cfg_scale", "cfg_end", "steps", "sampler", "scheduler", "width", "height")


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

    def __init__(self, store: Store, engine: Any, outputs_dir: Path, *,
                 save: Callable[[Any, Path, str], list[tuple[Path, Path]]] | None = None,
                 poll_interval: float = 0.5,
                 name: str = "brushwork-worker", bucket: Any = None):
        self.store = store
        self.engine = engine
        self.outputs_dir = Path(outputs_dir)
        self.bucket = bucket  # output.bucket.Bucket: every picture goes there too before it is on record
        self._save = save or (_save_result if bucket is None else _save_result_unique)
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

    def notify(self, job_id: str | None = None) -> None:
        """A job was queued: wake the worker now instead of at the next poll."""
        self._wake.set()

    def live_of(self, job_id: str) -> LiveProgress | None:
        """The live progress of ``job_id`` while it runs here, else None."""
        live = self.live
        return live if live is not None and live.job_id == job_id else None

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
        status = self.store.status(job_id)
        if status == RUNNING:  # on another server sharing the store: it sees the request within a second
            self.store.mark_cancel_requested(job_id)
        return status

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
            except self.store.errors:
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
            live.total, live.batches = request.steps or 0, request.n_iter  # None: the model's, known at the first step

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
                    if (mine := self.store.get(job.id)) is not None and mine.cancel_requested:
                        cancel.set()  # cancelled through another server sharing the store (PostgreSQL)
                        live.interrupted = True
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
        except StorageError as err:  # the pictures' bucket refused them: the server's storage, not the request
            log.error("job %s failed: %s", job.id, err)
            status, error, result = FAILED, str(err), {"error_type": "StorageError", "user_error": False}
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
        stored: list[str] = []  # put in the bucket
        try:
            result, rows = self._result(job, out, [Path(path) for path, _ in saved])
            if self.bucket is not None:  # in the bucket before on record: a recorded picture is always there
                for row, (path, _) in zip(rows, saved, strict=True):
                    self.bucket.put(row["path"], Path(path))
                    stored.append(row["path"])
            ids = self.store.finish_done(job.id, rows, result)
        except Exception as err:
            if self._discard(job.id, saved, lost=isinstance(err, ClaimLost)):
                for rel in stored:
                    self.bucket.delete(rel)
            raise
        if rows and ids and (first := self.store.get_image(ids[0])) is not None and first["path"] != rows[0]["path"]:
            # another run of this job was on record first (a restarted SQLite server queued it again while a
            # replica still ran it): its pictures are the job's, this run's go
            log.info("job %s was recorded by another run; this run's %d picture(s) removed", job.id, len(saved))
            self._discard(job.id, saved, lost=True)
            for rel in stored:
                self.bucket.delete(rel)
            recorded = self.store.get(job.id)
            return recorded.result if recorded is not None and recorded.result else result
        for _, tmp in saved:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:  # harmless: removed at the next start, the job being done
                log.warning("could not remove %s", tmp)
        return result

    def _discard(self, job_id: str, saved: list[tuple[Path, Path]], *, lost: bool = False) -> bool:
        """The job could not be recorded: its files go too (unless it is done after all, or we cannot tell:
        then the next start sorts them out); True if they went. ``lost``: another worker has the job, whatever
        its status."""
        try:
            if not lost and self.store.status(job_id) == DONE:
                return False
        except self.store.errors:
            return False
        for path, tmp in saved:
            for p in {Path(path), Path(tmp)}:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    log.warning("could not remove %s", p)
        return True

    def _result(self, job: Job, out: Any, paths: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The job's result, and its images' history rows (``JobStore.add_image``'s keywords)."""
        images, rows = [], []
        root = self.outputs_dir.resolve()
        ran = getattr(out, "request", None)  # what ran: open settings filled in by the model's defaults
        filled = {key: getattr(ran, key) for key in FILLED_FIELDS} if ran is not None else {}
        asked = {**job.request, **filled}
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
            "extras": extras_view(getattr(out, "extras", None) or {}),
            "ran": filled,  # the settings the request left open, as the model's defaults filled them
        }
        return result, rows


def extras_view(extras: dict[str, Any]) -> dict[str, Any]:
    """What the task made beside the pictures (``GenerationResult.extras``), JSON-safe: a picture (depth2img's
    ``depth_map``, at the latent size: a few KB) as a PNG ``data:`` URL, a plain value as it is."""
    import base64

    from PIL import Image

    from ..output.files import encode_png

    view: dict[str, Any] = {}
    for key, value in extras.items():
        if isinstance(value, Image.Image):
            view[key] = "data:image/png;base64," + base64.b64encode(encode_png(value)).decode("ascii")
        elif isinstance(value, list) and value and all(isinstance(v, Image.Image) for v in value):
            # ControlNet's maps, one a unit (``controlnet_maps``)
            view[key] = ["data:image/png;base64," + base64.b64encode(encode_png(v)).decode("ascii") for v in value]
        elif value is None or isinstance(value, str | int | float | bool):
            view[key] = value
    return view


def _save_result(result: Any, outdir: Path, job_id: str) -> list[tuple[Path, Path]]:
    from ..output.files import save_result_linked

    return save_result_linked(result, outdir, job_id, grid=False)


def _save_result_unique(result: Any, outdir: Path, job_id: str) -> list[tuple[Path, Path]]:
    """As ``_save_result``, each name ending in the job's id: machines that number their own folders and put
    their pictures in one bucket never take the same name (``output/bucket.py``)."""
    from ..output.files import save_result_linked

    return save_result_linked(result, outdir, job_id, grid=False, unique=job_id[:12])


def recover_outputs(store: Store, outputs_dir: Path, data_dir: Path | None = None) -> dict[str, int]:
    """At startup, after ``store.recover()`` and before the worker runs: remove what killed writes left.

    A job's ``.tmp-<job id>-*.png`` still there means the job was not recorded when the server died:
    if the job runs again, the file(s) that run made go with it (the rerun writes them anew), so every
    job ends with its images exactly once. Also: old command-line tmps, and half-made thumbnails.
    """
    from ..output.files import clean_journal

    def job_done(job_id: str) -> bool | None:
        status = store.status(job_id)
        # running: on another server sharing the store and the outputs folder (none runs here yet); its
        # picture stays for it to record, only the tmp link goes
        return None if status is None else status in (DONE, RUNNING)

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

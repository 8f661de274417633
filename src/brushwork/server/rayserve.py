"""``brushwork serve --ray [ADDRESS]``: the same app (web UI, ``/sdapi/v1``, ``/api/v1``) on Ray Serve.

::

    clients -> Serve's HTTP proxy -> BrushworkIngress (app.py's FastAPI app, 1 replica, no CPU reserved)
                                        | accepts jobs into the job store, as on one machine
                                        | ClusterWorker: claim_next -> a generation replica, by model
                                     -> BrushworkGenerator replicas (one per GPU, or per N CPU cores),
                                        each an Engine (its own pipeline cache) running worker.Worker.run_job

The job store stays the one truth: a job is accepted once its row is committed; the dispatcher claims it
(``running``) and hands its id to a replica with Serve's model multiplexing (``multiplexed_model_id``: the
job's model), so it goes where that model is loaded and a cold load happens only where none holds it. The
replica runs it exactly as the single-machine worker does (images written with their journal links, then
recorded with the job's end in one transaction). A replica that dies mid-run (``kill -9``, a lost node)
fails the Serve call: its unrecorded files are removed and the job is queued again, so it runs elsewhere and
its images are recorded once. While a job runs, its replica reports its progress (and previews) to the
ingress every ``REPORT_INTERVAL`` seconds and gets back what was asked of it (cancel, interrupt, skip), so the
routes of app.py work unchanged through ``state.worker`` (this module's ``ClusterWorker``).

Nothing here imports Ray at import time; ``build_app`` and ``serve_ray`` do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextvars
import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..settings import Settings
from .store import CANCELLED, FAILED, QUEUED, RUNNING
from .worker import LiveProgress

log = logging.getLogger("brushwork.server")

APP_NAME = "brushwork"
INGRESS = "BrushworkIngress"
GENERATOR = "BrushworkGenerator"
REPORT_INTERVAL = 0.1  # seconds between a running replica's progress reports (and its look at cancel/interrupt)
# /sdapi/v1/unload-checkpoint reaches every replica through the store: the ingress writes a new value of this
# option, and each replica, looking every UNLOAD_POLL seconds, unloads its model when it sees one
UNLOAD_OPTION = "ray_unload_epoch"
UNLOAD_POLL = 1.0
MAX_ATTEMPTS = 3  # a job whose replica dies this many times fails instead of killing a fourth
RECENT = 1000  # jobs remembered with the replica that ran them (GET /api/v1/cluster)

# who sent the HTTP request being served: the auth user, else the client's address (/sdapi/v1/progress reports
# that caller's job, as on one machine where there is only one)
_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("brushwork_caller", default=None)


def caller_of(authorization: str | None, host: str | None) -> str:
    """The caller a request comes from: ``user:<name>`` for HTTP Basic auth, else ``host:<address>``."""
    if authorization and authorization[:6].lower() == "basic ":
        try:
            user = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8").partition(":")[0]
            return f"user:{user}"
        except (ValueError, UnicodeError, binascii.Error):
            pass
    return f"host:{host or ''}"


def discard_unrecorded(outputs_dir: Path, job_id: str) -> int:
    from ..output.files import remove_linked

    """Remove the pictures a dead replica wrote for ``job_id`` but never recorded (their ``.tmp-<job id>-*``
    journal links say which), before the job runs again. Other jobs' files are left alone: they may be running.
    Returns how many pictures went."""
    removed = 0
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return 0
    for tmp in outputs_dir.rglob(f".tmp-{job_id}-*.png"):
        try:
            st = tmp.lstat()
        except FileNotFoundError:
            continue
        if st.st_nlink > 1:
            removed += remove_linked(tmp, st)
        tmp.unlink(missing_ok=True)
    return removed


# ---- the ingress side: the dispatcher and what the routes read ----------------------------------------


class ClusterWorker:
    """``worker.Worker``'s face for the routes (``live``, ``cancel``, ``interrupt_current``, ``notify``, ...), with
    the jobs run on Serve replicas. A thread claims queued jobs (at most ``capacity`` at once, so autoscaling
    sees the backlog and the rest stays queued in the store) and sends each to ``generator`` (a Serve
    ``DeploymentHandle``) by model; one thread per running job waits for the replica's answer."""

    def __init__(self, store: Any, generator: Any, outputs_dir: Path, *, capacity: int,
                 default_model: Callable[[], str], poll_interval: float = 0.2, max_attempts: int = MAX_ATTEMPTS):
        self.store = store
        self.generator = generator
        self.outputs_dir = Path(outputs_dir)
        self.capacity = max(1, capacity)
        self._default_model = default_model
        self._poll_interval = poll_interval
        self._max_attempts = max_attempts
        self.engine_lock = threading.Lock()  # the ingress's own engine (extras upscaling) runs one at a time
        self.last_finished: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._running: dict[str, dict[str, Any]] = {}  # job id -> {model, since, replica, pid, node}
        self._live: dict[str, LiveProgress] = {}
        self._controls: dict[str, list[str]] = {}  # job id -> asked of its replica, not yet taken
        self._callers: dict[str, str | None] = {}
        self._attempts: collections.Counter[str] = collections.Counter()
        self._replicas: dict[str, dict[str, Any]] = {}  # replica id -> {pid, node, model, jobs, seen}
        self._recent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="brushwork-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching. Jobs running on replicas carry on and are recorded by them."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def notify(self, job_id: str | None = None) -> None:
        if job_id is not None:
            with self._lock:
                self._callers[job_id] = _caller.get()
        self._wake.set()

    # ---- what the routes read -----------------------------------------------------------------

    @property
    def live(self) -> LiveProgress | None:
        """The running job the caller of the current HTTP request is waiting for (its oldest), else the oldest
        running one: what ``/sdapi/v1/progress`` shows, and what ``/interrupt`` and ``/skip`` act on."""
        caller = _caller.get()
        with self._lock:
            lives = sorted(self._live.values(), key=lambda live: live.started)
            mine = [live for live in lives if caller is not None and self._callers.get(live.job_id) == caller]
        return (mine or lives or [None])[0]

    def live_of(self, job_id: str) -> LiveProgress | None:
        with self._lock:
            return self._live.get(job_id)

    def cancel(self, job_id: str) -> str | None:
        if self.store.cancel_queued(job_id):
            return CANCELLED
        with self._lock:
            if job_id in self._running:
                self.store.mark_cancel_requested(job_id)
                self._controls.setdefault(job_id, []).append("cancel")
                if job_id in self._live:
                    self._live[job_id].interrupted = True
                return RUNNING  # its replica stops within a step of its next report
        return self.store.status(job_id)

    def interrupt_current(self, *, skipped: bool = False) -> str | None:
        live = self.live
        if live is None:
            return None
        with self._lock:
            self._controls.setdefault(live.job_id, []).append("skip" if skipped else "interrupt")
            if skipped:
                live.skipped = True
            else:
                live.interrupted = True
        return live.job_id

    def unload_everywhere(self) -> None:
        """Every replica unloads its model within about UNLOAD_POLL seconds (A1111's unload-checkpoint)."""
        import uuid

        self.store.set_option(UNLOAD_OPTION, uuid.uuid4().hex)

    def replica_unloaded(self, replica: dict[str, Any]) -> None:
        with self._lock:
            self._replicas.setdefault(replica["replica"], {"jobs": 0}).update(
                {"pid": replica.get("pid"), "node": replica.get("node"), "model": None, "seen": time.time()})

    def cluster_view(self) -> dict[str, Any]:
        """GET /api/v1/cluster: the replicas seen, the running jobs and where the recent ones ran."""
        with self._lock:
            return {"capacity": self.capacity,
                    "replicas": [{"replica": rid, **info} for rid, info in self._replicas.items()],
                    "running": [{"job_id": jid, **info,
                                 "fraction": self._live[jid].fraction if jid in self._live else 0.0}
                                for jid, info in self._running.items()],
                    "recent": dict(self._recent)}

    # ---- what the replicas send ---------------------------------------------------------------

    def report(self, job_id: str, live: LiveProgress | None, replica: dict[str, Any]) -> list[str]:
        """A running job's progress from its replica; answers what was asked of it since (cancel, interrupt, skip)."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return []
            running.update({k: replica.get(k) for k in ("replica", "pid", "node")})
            self._replicas.setdefault(replica["replica"], {"jobs": 0}).update(
                {"pid": replica.get("pid"), "node": replica.get("node"), "model": replica.get("model"),
                 "seen": time.time()})
            if live is not None:
                old = self._live.get(job_id)
                if live.preview is None and old is not None and old.preview_version == live.preview_version:
                    live.preview = old.preview  # unchanged previews are not sent again
                if old is not None:  # asked here and not yet taken there: keep showing it
                    live.interrupted |= old.interrupted
                    live.skipped |= old.skipped and "skip" in self._controls.get(job_id, ())
                self._live[job_id] = live
            return self._controls.pop(job_id, [])

    # ---- dispatching --------------------------------------------------------------------------

    def model_id(self, request: dict[str, Any]) -> str:
        """The model a job needs (what the replicas are routed by): its model, else the default one."""
        model = request.get("model")
        if model:
            return str(model)
        try:
            return self._default_model()
        except Exception:  # no model at all: the replica's run fails the job with the message
            return ""

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = len(self._running)
            job = None
            if busy < self.capacity:
                try:
                    job = self.store.claim_next()
                except Exception:
                    log.exception("job store unavailable")
            if job is None:
                self._wake.wait(self._poll_interval)
                self._wake.clear()
                continue
            self._dispatch(job)

    def _dispatch(self, job: Any) -> None:
        model = self.model_id(job.request)
        with self._lock:
            self._running[job.id] = {"model": model, "since": time.time(), "replica": None, "pid": None,
                                     "node": None}
        try:
            response = self.generator.options(multiplexed_model_id=model).run.remote(
                job.id, getattr(self.store, "worker_id", None))
        except Exception as err:  # Serve could not take it at all: the job waits in the queue
            self._lost(job.id, err)
            return
        threading.Thread(target=self._follow, args=(job.id, response), name=f"brushwork-job-{job.id[:8]}",
                         daemon=True).start()

    def _follow(self, job_id: str, response: Any) -> None:
        try:
            outcome = response.result()
        except Exception as err:  # the replica died (kill -9, a lost node, out of memory) or was unreachable
            self._lost(job_id, err)
            return
        with self._lock:
            info = self._running.pop(job_id, {})
            self._live.pop(job_id, None)
            self._controls.pop(job_id, None)
            self._callers.pop(job_id, None)
            self._attempts.pop(job_id, None)
            ran = {"replica": outcome.get("replica"), "pid": outcome.get("pid"), "node": outcome.get("node"),
                   "model": info.get("model"), "status": outcome.get("status")}
            self._recent[job_id] = ran
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            if ran["replica"]:
                seen = self._replicas.setdefault(ran["replica"], {"jobs": 0})
                seen.update({"pid": ran["pid"], "node": ran["node"], "model": outcome.get("model"),
                             "seen": time.time()})
                seen["jobs"] = seen.get("jobs", 0) + 1
            self.last_finished = (job_id, str(outcome.get("status")))
        self._wake.set()

    def _lost(self, job_id: str, err: BaseException) -> None:
        """The run of a job ended without an answer: unless the replica recorded it after all, its unrecorded
        files go and it is queued again (or, after ``max_attempts``, fails: it kills whatever runs it)."""
        with self._lock:
            info = self._running.pop(job_id, {})
            self._live.pop(job_id, None)
            self._controls.pop(job_id, None)
            self._attempts[job_id] += 1
            attempts = self._attempts[job_id]
            if info.get("replica"):
                self._replicas.pop(info["replica"], None)
        try:
            job = self.store.get(job_id)
            if job is None or job.status != RUNNING:
                return  # recorded (or cancelled) before the answer was lost
            removed = discard_unrecorded(self.outputs_dir, job_id)
            where = f"replica pid {info.get('pid')}" if info.get("pid") else "its replica"
            if job.cancel_requested:
                self.store.finish(job_id, CANCELLED, error="cancelled")
                status = CANCELLED
            elif attempts >= self._max_attempts:
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                self.store.finish(job_id, FAILED, error=f"internal error: {attempts} runs of this job ended without "
                                                        f"an answer (their replica died?); last: {type(err).__name__}: "
                                                        f"{first}",
                                  result={"error_type": "ReplicaDied", "user_error": False})
                status = FAILED
            else:
                self.store.requeue(job_id)
                status = QUEUED
            log.warning("job %s: %s ended without an answer (%s: %s); %d unrecorded picture(s) removed; it is %s",
                        job_id, where, type(err).__name__, str(err).splitlines()[0] if str(err) else "", removed,
                        "queued again" if status == QUEUED else status)
            with self._lock:
                if status != QUEUED:
                    self._callers.pop(job_id, None)
                    self._attempts.pop(job_id, None)
                    self.last_finished = (job_id, status)
        except Exception:
            log.exception("job %s: could not queue it again; it will be at the next start", job_id)
        finally:
            self._wake.set()


# ---- the replica side ------------------------------------------------------------------------------


def _live_copy(live: LiveProgress | None, job_id: str, sent_preview: list[int]) -> LiveProgress | None:
    """What a report carries: the live progress, its preview only when new."""
    if live is None or live.job_id != job_id:
        return None
    out = copy.copy(live)
    out.extra = dict(live.extra)
    if live.preview_version == sent_preview[0]:
        out.preview = None
    sent_preview[0] = live.preview_version
    return out


def _apply(worker: Any, job_id: str, controls: list[str]) -> list[str]:
    """Do what the ingress asked of the running job; what cannot be done yet (the run has not started) waits."""
    live = worker.live
    if live is None or live.job_id != job_id:
        return list(controls)
    for control in controls:
        if control == "cancel":
            worker.cancel(job_id)
        else:
            worker.interrupt_current(skipped=control == "skip")
    return []


# ---- building and running the Serve application ----------------------------------------------------


def absolute(settings: Settings) -> Settings:
    """The settings with every folder absolute: replicas do not run where the command was typed."""
    settings = copy.copy(settings)
    settings.home = Path(settings.home).expanduser().resolve()
    settings.models_dir = Path(settings.models_dir).expanduser().resolve()
    settings.outputs_dir = Path(settings.outputs_dir).expanduser().resolve()
    return settings


def replica_plan(settings: Settings, resources: dict[str, float]) -> dict[str, Any]:
    """How the generation deployment is sized, from the settings and the cluster's resources (``ray.
    cluster_resources()``): ``ray_gpus_per_replica`` GPUs a replica (1: one per GPU; 0.5: two share a card)
    unless the device is ``cpu``, else ``ray_cpus_per_replica`` cores; ``ray_max_replicas`` 0 = as many as fit."""
    gpus = float(resources.get("GPU", 0)) if settings.device not in ("cpu", "mps") else 0
    cpus = max(1, settings.ray_cpus_per_replica)
    share = float(getattr(settings, "ray_gpus_per_replica", 1.0) or 1.0)
    if gpus >= share:
        actor = {"num_gpus": int(share) if share.is_integer() else share, "num_cpus": 1}
        fit = int(gpus / share + 1e-9)
    else:
        actor = {"num_cpus": cpus}
        fit = max(1, int(resources.get("CPU", cpus) // cpus))
    most = settings.ray_max_replicas or fit
    least = max(0, min(settings.ray_min_replicas, most))
    target = max(1, settings.ray_target_ongoing_requests)
    return {"ray_actor_options": actor, "min_replicas": least, "max_replicas": max(1, most),
            "target_ongoing_requests": target, "max_ongoing_requests": target}


def _open_store(settings: Settings, worker_id: str | None = None) -> Any:
    """The job store, as the ingress opens it. ``worker_id``: a shared store's (PostgreSQL's) claims are its
    claimer's, so a replica records the jobs the dispatcher claimed under the dispatcher's worker id (whose
    lease the ingress keeps alive; a replica that dies leaves the job to the dispatcher to queue again)."""
    from . import store

    url = (getattr(settings, "database_url", None) or "").strip()
    if worker_id and url:
        from .pgstore import PgJobStore

        return PgJobStore(url, worker_id=worker_id)
    if hasattr(store, "open_store"):
        return store.open_store(settings)  # BRUSHWORK_DATABASE_URL: PostgreSQL, else SQLite in the data folder
    return store.JobStore(settings.data_dir / "brushwork.sqlite3")


def _warm_up() -> None:
    """Import what every model load needs (torch, diffusers, transformers: seconds) before any job waits for it."""
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401


class GeneratorReplica:
    """A generation replica (``BrushworkGenerator``): one Engine, its pipeline cache, running the store's jobs one
    at a time as the single-machine worker thread does. Made a Serve deployment by ``build_app``."""

    def __init__(self, settings: Settings):
        import ray
        from ray import serve

        from ..engine.core import Engine
        from ..output.bucket import open_bucket
        from .worker import Worker

        self.settings = settings
        self.store = _open_store(settings)
        self._stores = {None: self.store}  # by the claimer's worker id (a shared store's)
        self.engine = Engine(settings)
        self.worker = Worker(self.store, self.engine, settings.outputs_dir, bucket=open_bucket(settings))
        context = serve.get_replica_context()
        self.identity = {"replica": context.replica_id.unique_id, "pid": os.getpid(),
                         "node": ray.get_runtime_context().get_node_id()[:12], "model": None}
        self.ingress = serve.get_deployment_handle(INGRESS, app_name=context.app_name)

        async def hold(model_id: str) -> str:
            """Serve's model multiplexing: the model a request names is loaded here (and reported, so the next
            request for it comes here); the Engine keeps one, so one is held."""
            await asyncio.to_thread(self._preload, model_id)
            self.identity["model"] = model_id
            return model_id

        self._hold = serve.multiplexed(max_num_models_per_replica=1)(hold)
        _warm_up()  # while the deployment starts (in parallel), not in the first job's time
        threading.Thread(target=self._watch_unloads, name="brushwork-unload-watch", daemon=True).start()

    def _watch_unloads(self) -> None:
        """Unload the model when the ingress asks every replica to (``ClusterWorker.unload_everywhere``): never
        under a running job (the engine's lock), then say so to the ingress."""
        try:
            seen = self.store.get_option(UNLOAD_OPTION)
        except Exception:
            seen = None
        while True:
            time.sleep(UNLOAD_POLL)
            try:
                now = self.store.get_option(UNLOAD_OPTION)
            except Exception:  # the store is away for a moment: look again
                continue
            if now == seen:
                continue
            seen = now
            with self.worker.engine_lock:
                self.engine.unload()
            self.identity["model"] = None
            try:
                self.ingress.unloaded.remote(dict(self.identity))
            except Exception as err:
                log.debug("could not tell the ingress about the unload: %s", err)


    def _preload(self, model_id: str) -> None:
        from ..request import BrushworkError, GenerationRequest

        try:
            self.engine.load(GenerationRequest(model=model_id or None, device=self.settings.device))
        except BrushworkError as err:  # the job itself fails with the message
            log.info("could not load %r ahead of its job: %s", model_id, err)

    async def run(self, job_id: str, worker_id: str | None = None) -> dict[str, Any]:
        """Run a job the dispatcher (whose store's worker id is ``worker_id``) has claimed, reporting its progress
        to the ingress as it goes."""
        from ray import serve

        if worker_id not in self._stores:
            self._stores[worker_id] = await asyncio.to_thread(_open_store, self.settings, worker_id)
        self.worker.store = self._stores[worker_id]  # one job at a time here

        model_id = serve.get_multiplexed_model_id()
        if model_id:  # none: no model could be resolved, and the run fails the job with the message
            await self._hold(model_id)
            self.identity["model"] = model_id  # loaded again by the run after an unload, if Serve thinks it held
        job = self.worker.store.get(job_id, with_inputs=True)
        if job is None or job.status != RUNNING:  # cancelled while it waited for this replica
            return {"status": job.status if job else None, **self.identity}
        task = asyncio.ensure_future(asyncio.to_thread(self.worker.run_job, job))
        pending: list[str] = []
        sent_preview = [-1]
        while True:
            try:
                live = _live_copy(self.worker.live, job_id, sent_preview)
                pending += await asyncio.wait_for(self.ingress.report.remote(job_id, live, self.identity), 5)
            except Exception as err:  # the ingress restarts: the run goes on, and is recorded in the store
                log.debug("progress report for %s failed: %s", job_id, err)
            pending = _apply(self.worker, job_id, pending)
            done, _ = await asyncio.wait({task}, timeout=REPORT_INTERVAL)
            if done:
                break
        await task
        finished = self.worker.last_finished
        return {"status": finished[1] if finished and finished[0] == job_id else None, **self.identity}


class IngressReplica:
    """The HTTP ingress (``BrushworkIngress``): app.py's app, with ``state.worker`` a ``ClusterWorker`` that sends
    the jobs to the generation replicas. Made a Serve deployment by ``build_app``."""

    def __init__(self, generator: Any, settings: Settings, auth: str | None, capacity: int):
        from fastapi import Request

        from ..engine.core import Engine
        from .app import create_app

        engine = Engine(settings)  # the model library and the checks; no model is loaded here
        self.asgi = create_app(engine, settings, start_worker=False, auth=auth)
        state = self.asgi.state.brushwork
        self.worker = ClusterWorker(state.store, generator, state.outputs_dir, capacity=capacity,
                                    default_model=lambda: engine.resolve(None)[0].name)
        state.worker = self.worker

        @self.asgi.middleware("http")
        async def _remember_caller(request: Request, call_next):
            token = _caller.set(caller_of(request.headers.get("authorization"),
                                          request.client.host if request.client else None))
            try:
                return await call_next(request)
            finally:
                _caller.reset(token)

        @self.asgi.get("/api/v1/cluster", tags=["brushwork"],
                      summary="The Ray Serve replicas, the running jobs and where recent jobs ran")
        async def _cluster():
            return self.worker.cluster_view()

        self.worker.start()

    def __serve_build_asgi_app__(self):
        return self.asgi

    def report(self, job_id: str, live: LiveProgress | None, replica: dict[str, Any]) -> list[str]:
        return self.worker.report(job_id, live, replica)

    def unloaded(self, replica: dict[str, Any]) -> None:
        self.worker.replica_unloaded(replica)


def build_app(settings: Settings, plan: dict[str, Any], *, auth: str | None = None):
    """The Serve application (``serve.run(build_app(...), name=APP_NAME, route_prefix="/")``), sized by
    ``replica_plan``."""
    from ray import serve

    settings = absolute(settings)
    scaling: dict[str, Any]
    if plan["min_replicas"] == plan["max_replicas"]:
        scaling = {"num_replicas": plan["max_replicas"]}
    else:
        scaling = {"autoscaling_config": {"min_replicas": plan["min_replicas"], "max_replicas": plan["max_replicas"],
                                          "initial_replicas": max(1, plan["min_replicas"]),
                                          "target_ongoing_requests": plan["target_ongoing_requests"]}}
    generator = serve.deployment(name=GENERATOR, max_ongoing_requests=plan["max_ongoing_requests"],
                                 ray_actor_options=plan["ray_actor_options"], graceful_shutdown_timeout_s=5,
                                 **scaling)(GeneratorReplica)
    # one ingress: it holds the dispatcher (the store's queue is the state; this replica only reads it)
    ingress = serve.deployment(name=INGRESS, num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})(serve.ingress()(IngressReplica))
    capacity = plan["max_replicas"] * plan["max_ongoing_requests"]
    return ingress.bind(generator.bind(settings), settings, auth, capacity)


def application(args: dict[str, Any] | None = None):
    """An application builder for Serve's own tools: ``serve run brushwork.server.rayserve:application`` or a
    KubeRay ``RayService``'s ``import_path`` (docs/scale.md). ``args``: ``auth`` (``user:password,...``). The
    settings come from the environment (``BRUSHWORK_*``) and ``settings.json`` of the nodes' shared home."""
    import ray

    args = dict(args or {})
    unknown = sorted(set(args) - {"auth"})
    if unknown:
        from ..request import BrushworkError

        raise BrushworkError(f"unknown application argument {unknown[0]!r}; the arguments are: auth")
    settings = Settings.load()
    if not ray.is_initialized():  # `serve run` on a machine without a cluster: a local one, as serve.run would
        ray.init()
    return build_app(settings, replica_plan(settings, ray.cluster_resources()), auth=args.get("auth"))


def serve_ray(settings: Settings | None = None, address: str | None = None, host: str = "127.0.0.1",
              port: int = 7860, auth: str | None = None) -> None:
    """``brushwork serve --ray [ADDRESS]``: deploy on a Ray cluster (ADDRESS: ``auto``, ``host:6379`` or
    ``ray://host:10001``; none: ``RAY_ADDRESS`` or a local one) and serve until Ctrl+C."""
    from .app import _lock_data_dir, check_bind

    check_bind(host, auth)
    settings = absolute(settings or Settings.load())
    lock = _lock_data_dir(settings.data_dir)  # noqa: F841 (held until the process ends)
    try:
        import ray
        from ray import serve
    except ImportError as err:
        from ..request import BrushworkError

        raise BrushworkError("--ray needs Ray Serve: pip install 'brushwork[ray]'") from err
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    plan = replica_plan(settings, ray.cluster_resources())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, plan, auth=auth), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    each = (f"{plan['ray_actor_options'].get('num_gpus', 0)} GPU" if "num_gpus" in plan["ray_actor_options"]
            else f"{plan['ray_actor_options']['num_cpus']} CPUs")
    least, most = plan["min_replicas"], plan["max_replicas"]
    count = f"{most} generation replica{'s' if most > 1 else ''}" if least == most else \
        f"{least} to {most} generation replicas (autoscaling)"
    print(f"brushwork: serving on http://{shown}:{port}/ with Ray Serve: {count} of {each} each "
          "(Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # a cluster this command started ends with it; another keeps running
        ray.shutdown()

"""The ASGI app: ``create_app(engine, settings)`` and ``serve(settings, host, port, auth)``.

The app is a thin shell: HTTP in, ``GenerationRequest`` into the persistent job queue
(``store.py``, run by ``worker.py``), ``GenerationResult`` files out. ``/sdapi/v1`` (A1111-compatible) lives in
``sdapi.py``, the native ``/api/v1`` in ``api.py``, the browser UI in ``web/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..request import BrushworkError, GenerationRequest, InvalidRequest, Mode
from ..settings import Settings
from .edge import BodyLimit
from .store import FINISHED, Job, JobStore
from .worker import Worker, recover_outputs

log = logging.getLogger("brushwork.server")

WEB_DIR = Path(__file__).parent / "web"
DB_NAME = "brushwork.sqlite3"


class HTTPError(Exception):
    """An error with an HTTP status, rendered as JSON ``{error, detail, body, errors}``."""

    def __init__(self, status: int, detail: str, *, error: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or _STATUS_NAMES.get(status, "Error")


_STATUS_NAMES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict",
                 413: "Payload Too Large", 422: "Unprocessable Entity", 503: "Service Unavailable"}


@dataclass
class ServerState:
    """Everything the routes share. One per app; nothing global."""

    engine: Any
    settings: Settings
    store: JobStore
    worker: Worker
    outputs_dir: Path
    selected_model: str | None = None  # set by POST /sdapi/v1/options sd_model_checkpoint
    options: dict[str, Any] = field(default_factory=dict)

    # ---- models: only by name from the library, never a path from HTTP -------------------------

    def models(self) -> list[Any]:
        try:
            return list(self.engine.list_models())
        except BrushworkError:
            return []

    def resolve_model(self, name: str | None) -> str | None:
        """A library model name for ``name`` (a name, "name [hash]" title, file name or hash); None = default."""
        if name is None or (isinstance(name, str) and not name.strip()):
            return self.selected_model
        if not isinstance(name, str):
            raise InvalidRequest(f"model must be a model name, got {name!r}")
        wanted = name.strip()
        entries = self.models()
        for entry in entries:
            candidates = {entry.name, getattr(entry, "title", None), Path(str(entry.path)).name,
                          Path(str(entry.path)).stem, getattr(entry, "short_hash", None)}
            sha = getattr(entry, "sha256", None) or ""
            if (wanted in candidates or wanted.lower() in {str(c).lower() for c in candidates if c}
                    or (len(wanted) >= 8 and sha.lower().startswith(wanted.lower()))):
                # the engine reads a name that exists as a path (relative to where the server runs) as that
                # path; hand it this entry's own file then, so a name always means the library entry
                return str(entry.path) if Path(entry.name).exists() else entry.name
        names = ", ".join(e.name for e in entries) or "(the model library is empty)"
        raise InvalidRequest(f"unknown model {wanted!r}; choose one of: {names}")

    def current_model_entry(self) -> Any:
        """The model a request without ``model`` would use, as a ModelEntry (or None)."""
        entries = self.models()
        if self.selected_model:
            for e in entries:
                if self.selected_model in (e.name, str(e.path)):
                    return e
        current = getattr(self.engine, "current_model", None)
        if current is not None:
            return current
        default = self.settings.default_model
        for e in entries:
            if default and default in (e.name, Path(str(e.path)).name):
                return e
        return entries[0] if entries else None

    # ---- submitting and waiting ---------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> GenerationRequest:
        """Everything a caller can get wrong, checked before the job is accepted."""
        request.model = self.resolve_model(request.model)
        for key in ("vae",):
            value = getattr(request, key)
            if value is not None and ("/" in str(value) or "\\" in str(value)):
                raise InvalidRequest(f"{key} must be a name from the library, not a path: {value!r}")
        for lora in request.loras:
            if "/" in str(lora[0]) or "\\" in str(lora[0]):
                raise InvalidRequest(f"LoRA must be a name from the library, not a path: {lora[0]!r}")
        # the device and memory policy belong to whoever runs the server, not to HTTP callers
        request.device = self.settings.device
        request.memory = self.settings.memory
        for image in (request.init_image, request.mask_image):
            if image is not None and image.width * image.height > self.settings.max_image_pixels:
                raise InvalidRequest(
                    f"the image is {image.width}x{image.height} pixels, over the limit of "
                    f"{self.settings.max_image_pixels} pixels; make it smaller"
                )
        request.validate()
        limits = self.settings
        for value, limit, what, name in (
                (request.steps, limits.max_steps, "steps", "max_steps"),
                (request.width, limits.max_side, "width", "max_side"),
                (request.height, limits.max_side, "height", "max_side"),
                (request.total_images, limits.max_images, "images (batch size x n_iter)", "max_images")):
            if isinstance(value, int) and value > limit:
                raise InvalidRequest(f"{value} {what} is over this server's limit of {limit} (its owner can change "
                                     f"BRUSHWORK_{name.upper()})")
        return request

    def submit(self, request: GenerationRequest, *, source: str = "api") -> Job:
        request = self.check_request(request)
        job = self.store.create(request.to_dict(), source=source)
        self.worker.notify()
        return job

    async def wait(self, job_id: str, *, poll: float = 0.1) -> Job:
        """Wait (without holding a thread) until the job has finished."""
        while True:
            status = self.store.status(job_id)
            if status is None or status in FINISHED:
                job = self.store.get(job_id)
                if job is None:
                    raise HTTPError(404, f"job {job_id} not found")
                return job
            await asyncio.sleep(poll)

    def decode_image(self, data: Any, what: str = "image"):
        """A base64 (or data: URL) image from a caller, with the upload limits applied."""
        from ..output.images import open_image_bytes

        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"{what} must be a base64-encoded image")
        if data.startswith("data:"):
            data = data.split(",", 1)[1] if "," in data else ""
        if len(data) * 3 // 4 > self.settings.max_upload_bytes:
            raise HTTPError(413, f"{what} is larger than the upload limit of {self.settings.max_upload_bytes} bytes")
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what} is not valid base64") from None
        return open_image_bytes(raw, self.settings.max_image_pixels)

    def image_path(self, rel: str) -> Path:
        """A file inside the outputs folder, or a 404: no path from the database or a caller escapes it."""
        root = self.outputs_dir.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPError(404, "image not found")
        return path


def state_of(request) -> ServerState:
    """The server state of the app a request came to (for the route modules)."""
    return request.app.state.brushwork


def job_request_mode(job: Job) -> Mode:
    return Mode(job.request.get("mode", "txt2img"))


# ---- the app -------------------------------------------------------------------------------------


def create_app(engine: Any, settings: Settings | None = None, *, start_worker: bool = True,
               auth: str | None = None):
    """Build the ASGI app around an engine. The job database lives in ``settings.data_dir``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import api, sdapi

    settings = settings or Settings.load()
    outputs_dir = Path(settings.outputs_dir).expanduser().resolve()
    store = JobStore(settings.data_dir / DB_NAME)
    recovered = store.recover()
    if recovered:
        log.info("%d job(s) interrupted by a restart are queued again", recovered)
    recover_outputs(store, outputs_dir, settings.data_dir)  # a killed run's files go before it runs again
    worker = Worker(store, engine, outputs_dir)
    state = ServerState(engine=engine, settings=settings, store=store, worker=worker, outputs_dir=outputs_dir,
                        selected_model=store.get_option("sd_model_checkpoint"),
                        options=store.get_option("sdapi_options", {}))

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="brushwork", version=_version(), lifespan=lifespan,
                  description="Stable Diffusion on your own machine: native API (/api/v1) and "
                              "A1111-compatible API (/sdapi/v1).")
    app.state.brushwork = state

    def error_body(error: str, detail: Any, errors: Any = "") -> dict[str, Any]:
        return {"error": error, "detail": detail, "body": "", "errors": errors}

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse(error_body(exc.error, exc.detail, exc.detail), status_code=exc.status)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest):
        return JSONResponse(error_body("InvalidRequest", str(exc), str(exc)), status_code=400)

    @app.exception_handler(BrushworkError)
    async def _brushwork_error(request: Request, exc: BrushworkError):
        return JSONResponse(error_body(type(exc).__name__, str(exc), str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(_STATUS_NAMES.get(exc.status_code, "HTTPException"), exc.detail),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        detail = "; ".join(problems) or "invalid request"
        return JSONResponse(error_body("RequestValidationError", detail, detail), status_code=422)

    limit = settings.max_upload_bytes * 4 // 3 + 1024 * 1024  # base64 and JSON overhead
    users = parse_auth(auth) if auth else None

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if users is not None and not _auth_ok(request.headers.get("authorization"), users):
            return JSONResponse(error_body("Unauthorized", "authentication required"), status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="brushwork"'})
        return await call_next(request)

    # outermost of the app's own middleware: a body over the limit is refused before anything reads it
    app.add_middleware(BodyLimit, limit=limit, error_body=lambda: error_body(
        "Payload Too Large", f"the request is larger than the upload limit ({settings.max_upload_bytes} bytes)"))

    app.include_router(sdapi.router)
    app.include_router(api.router)

    @app.get("/", include_in_schema=False)
    async def _index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=str(WEB_DIR)), name="ui")

    if start_worker:
        worker.start()
    return app


def parse_auth(auth: str) -> list[tuple[str, str]]:
    """``user:password`` or A1111's ``--api-auth`` list ``user1:pass1,user2:pass2``; one-line error otherwise."""
    users = []
    for entry in auth.split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise BrushworkError("--auth must look like user:password (several as user1:pass1,user2:pass2), "
                                 "each with a user name and a password")
        users.append((user, password))
    return users


def _auth_ok(header: str | None, users: list[tuple[str, str]]) -> bool:
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        given = base64.b64decode(header[6:].strip().encode("ascii"), validate=True).decode("utf-8").encode()
    except (ValueError, UnicodeError):  # not base64, not ASCII (headers arrive as latin-1), not UTF-8
        return False
    ok = False
    for user, password in users:  # every entry compared, in constant time each
        ok |= secrets.compare_digest(given, f"{user}:{password}".encode())
    return ok


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("brushwork")
    except Exception:  # not installed (running from a source tree)
        return "0.1.0"


# ---- serve ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: str | None) -> None:
    """Listening beyond this machine needs a password: raise a one-line error otherwise."""
    if auth is not None:
        parse_auth(auth)
    if not is_loopback(host) and not auth:
        raise BrushworkError(
            f"refusing to listen on {host} without a password: anyone on the network could use this machine; "
            "add --auth user:password (or bind to 127.0.0.1)"
        )


def _lock_data_dir(data_dir: Path):
    """One server per data folder: a second one would run (and, after a restart, re-run) the same jobs."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "server.lock", "w")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BrushworkError(
            f"another brushwork server is already using {data_dir}; stop it first, or give this one its own "
            "home with BRUSHWORK_HOME"
        ) from None
    return handle


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = 7860,
          auth: str | None = None, *, engine: Any = None) -> None:
    """Run the server until interrupted (``brushwork serve``)."""
    import uvicorn

    check_bind(host, auth)
    settings = settings or Settings.load()
    lock = _lock_data_dir(settings.data_dir)  # noqa: F841 (held until the process ends)
    if engine is None:
        from ..engine.core import Engine

        engine = Engine(settings)
    app = create_app(engine, settings, auth=auth)
    shown = f"[{host}]" if ":" in host else host
    print(f"brushwork: serving on http://{shown}:{port}/  (API docs at /docs; Ctrl+C to stop)", flush=True)
    # open event streams (a browser tab) must not hold up Ctrl+C for long
    uvicorn.run(app, host=host, port=port, log_level="warning", workers=1, timeout_graceful_shutdown=3)

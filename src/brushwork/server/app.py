"""The ASGI app: ``create_app(engine, settings)`` and ``serve(settings, host, port, auth)``.

The app is a thin shell: HTTP in, ``GenerationRequest`` into the persistent job queue
(``store.py``, run by ``worker.py``), ``GenerationResult`` files out. ``/sdapi/v1`` (A1111-compatible) lives in
``sdapi.py``, the native ``/api/v1`` in ``api.py``, the browser UI in ``web/``.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
from pathlib import Path
from typing import Any

from ..output.bucket import open_bucket
from ..request import BrushworkError, InvalidRequest
from ..settings import Settings
from .edge import BodyLimit
from .state import _STATUS_NAMES, HTTPError, ServerState
from .store import DB_NAME, open_store  # noqa: F401 (DB_NAME: where the SQLite store lives)
from .worker import Worker, recover_outputs

log = logging.getLogger("brushwork.server")

WEB_DIR = Path(__file__).parent / "web"


# ---- the app -------------------------------------------------------------------------------------


def create_app(engine: Any, settings: Settings | None = None, *, start_worker: bool = True,
               auth: str | None = None):
    """Build the ASGI app around an engine. The job database lives in ``settings.data_dir``, or in the
    PostgreSQL database of ``settings.database_url`` (``store.open_store``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import api, controlnet, sdapi

    settings = settings or Settings.load()
    outputs_dir = Path(settings.outputs_dir).expanduser().resolve()
    store = open_store(settings)
    recovered = store.recover()
    if recovered:
        log.info("%d job(s) interrupted by a restart are queued again", recovered)
    recover_outputs(store, outputs_dir, settings.data_dir)  # a killed run's files go before it runs again
    bucket = open_bucket(settings)
    if bucket is not None:
        bucket.check()  # one line now, not a failed upload after the first picture
    worker = Worker(store, engine, outputs_dir, bucket=bucket)
    state = ServerState(engine=engine, settings=settings, store=store, worker=worker, outputs_dir=outputs_dir,
                        bucket=bucket,
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
    app.include_router(controlnet.router)  # A1111's ControlNet extension's /controlnet/*
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

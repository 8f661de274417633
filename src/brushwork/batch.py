"""``brushwork batch``: the requests of a JSON Lines file, each line one native ``/api/v1`` job body.

1. read  every line checked as the native API checks a job body (``server.api.JobRequest``, ``job_request``,
         ``GenerationRequest.validate()``), once, here: a bad line is an error naming its line number
2. ids   each line's id: its own ``"id"``, else a hash of its canonical JSON and how many identical lines came
         before it, so ids survive edits elsewhere in the file
3. skip  the ids ``manifest.jsonl`` records as done (a torn last line, from a kill, is ignored); pictures a
         killed run wrote but never recorded (their ``.tmp-<tag>-*.png`` links say so) are removed first
4. run   locally (one engine, in file order) or on Ray Data (``--ray``: actors with one engine each)
5. record one manifest line per item (id, line, files, seeds, timings, error, worker), appended and fsynced,
         then the item's pictures lose their journal links: a picture is either on record or removed on restart

Ray is imported only by ``run_ray``; this module imports no torch (the engine loads when the run starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BrushworkError, InvalidRequest
from .settings import Settings

MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"
MAX_ID_CHARS = 200
EXAMPLE = '{"prompt": "a red circle on the left", "steps": 20, "seed": 1}'


@dataclass
class Item:
    """One line of the batch file: its 1-based line number, its id, and either the request to run (the
    ``GenerationRequest.to_dict()`` form a worker reads back) or why it cannot run."""

    line: int
    id: str
    job: dict[str, Any] | None = None
    error: str | None = None

    @property
    def tag(self) -> str:
        """The 32 hex digits its pictures' journal links carry (``output.files.write_linked``)."""
        return hashlib.sha256(self.id.encode("utf-8")).hexdigest()[:32]

    def task(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "tag": self.tag, "job": self.job}


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line, error)


# ---- 1. and 2.: reading the file -------------------------------------------------------------------------------


def read_items(path: str | Path, settings: Settings) -> list[Item]:
    """The file's requests, each checked; a file that cannot be read, or that is not JSON Lines at all, is one
    ``BrushworkError``. Blank lines are skipped (line numbers still count them)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BrushworkError(f"batch file not found: {path}") from None
    except OSError as err:
        raise BrushworkError(f"cannot read the batch file {path}: {err.strerror}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BrushworkError(f"{path} is not UTF-8 text (byte {err.start}); a batch file is JSON Lines: one "
                             f"request a line, e.g. {EXAMPLE}") from err
    parsed: list[tuple[int, str, Any, str | None]] = []  # (line, text, object, why it is not JSON)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if line:
            parsed.append((number, line, *_parse_json(line)))
    if not parsed:
        raise BrushworkError(f"{path} holds no requests; write one JSON object a line, e.g. {EXAMPLE}")
    if all(why is not None for *_, why in parsed):
        number, _, _, why = parsed[0]
        raise BrushworkError(f"{path} is not JSON Lines: line {number} is {why}; write one JSON object a line, "
                             f"e.g. {EXAMPLE}")
    decode = _image_decoder(settings)
    items: list[Item] = []
    seen: dict[str, int] = {}  # canonical text -> how many lines so far had it
    explicit: dict[str, int] = {}  # a line's own id -> its line number
    for number, line, obj, why in parsed:
        own = obj.pop("id", None) if isinstance(obj, dict) else None
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) if why is None else line
        occurrence = seen.get(canonical, 0)
        seen[canonical] = occurrence + 1
        item = Item(number, hashlib.sha256(f"{occurrence}:{canonical}".encode()).hexdigest()[:16])
        try:
            if why is not None:
                raise InvalidRequest(f"the line is {why}")
            if own is not None:
                own = _checked_id(own)
                if own in explicit:
                    raise InvalidRequest(f"id {own!r} is line {explicit[own]}'s too; give each line "
                                         "its own id")
                explicit[own] = number
                item.id = own
            item.job = _job(obj, decode, settings)
        except BrushworkError as err:
            item.error = str(err)
        items.append(item)
    return items


def _parse_json(line: str) -> tuple[Any, str | None]:
    """(the object, None) or (None, why the line is not JSON the native API takes)."""
    from .server.edge import BadBody, loads

    try:
        json.loads(line)
    except ValueError as err:
        where = f" at character {err.pos + 1}" if isinstance(err, json.JSONDecodeError) else ""
        reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)[:120]
        return None, f"not JSON ({reason}{where})"
    try:
        return loads(line), None  # the API's strict reading: no NaN / Infinity, lone surrogates, deep nesting
    except BadBody as err:
        return None, f"not JSON the API takes ({err})"


def _checked_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"id must be non-empty text or a whole number, got {value!r}")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidRequest(f"id must be at most {MAX_ID_CHARS} printable characters")
    return value


def _job(obj: Any, decode, settings: Settings) -> dict[str, Any]:
    """A line's object checked as ``POST /api/v1/jobs`` checks a body; the request's JSON-safe form."""
    import pydantic

    from .server.api import JobRequest, job_request

    if not isinstance(obj, dict):
        raise InvalidRequest("the line must be a JSON object of request fields (prompt, steps, seed, ...), "
                             f"got {type(obj).__name__}")
    try:
        body = JobRequest.model_validate(obj)
    except pydantic.ValidationError as err:
        raise InvalidRequest(_problems(err)) from err
    return job_request(body, decode, watermark=settings.watermark).validate().to_dict()


def _problems(err) -> str:
    """pydantic's errors as the server's 422 words them, an unknown field named as such."""
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            out.append(f"unknown field {where!r} (the fields are the native API's job fields: docs/server.md)")
        else:
            out.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(out) or "invalid request"


def _image_decoder(settings: Settings) -> Callable[..., Any]:
    """``decode(data, what, high_depth=...)`` for ``job_request``: base64 or a data: URL, within the image limit."""
    from .output.images import open_image_bytes

    def decode(data: Any, what: str = "image", *, high_depth: bool = False):
        import base64
        import binascii

        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"{what} must be a base64-encoded image")
        if data.startswith("data:"):
            data = data.split(",", 1)[1] if "," in data else ""
        try:
            raw = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what} is not valid base64") from None
        try:
            return open_image_bytes(raw, settings.max_image_pixels, high_depth=high_depth)
        except InvalidRequest as err:
            raise InvalidRequest(f"{what}: {err}") from err

    return decode


# ---- 3. and 5.: the manifest -----------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The records of a manifest, in order; a line that is not a whole record (the last one, torn by a kill) is
    ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(raw) if raw.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records


class Manifest:
    """``manifest.jsonl``, appended one whole, fsynced line per finished item."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 (closed by close())
        if self._file.tell() and _last_byte(path) != b"\n":
            self._file.write(b"\n")  # after a torn line, the next record starts a line of its own

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


@contextlib.contextmanager
def _locked(out: Path):
    """One batch at a time per output folder (a second one would take the first's unrecorded pictures for a
    killed run's)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BrushworkError(f"another brushwork batch is writing to {out}; wait for it to end or give "
                                 "another --out") from None
        yield


# ---- the run ---------------------------------------------------------------------------------------------------


def run(path: str | Path, out: str | Path, settings: Settings, *, ray_address: str | None = None,
        ray_options: dict[str, Any] | None = None, echo: Callable[[str, str], None] | None = None) -> Summary:
    """Run every line of ``path`` not yet done in ``out`` (``ray_address`` not None: on Ray, ``""`` being Ray's
    own choice of cluster). ``echo(text, kind)`` reports: ``"file"`` a file written, ``"info"`` a line done or
    skipped, ``"error"`` a line that failed."""
    echo = echo or (lambda text, kind: print(text, file=sys.stdout if kind == "file" else sys.stderr))
    if ray_address is not None:
        check_ray_options(**(ray_options or {}))
    items = read_items(path, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    with _locked(out):
        from .output.files import clean_journal

        records = read_manifest(out / MANIFEST)
        done = {r["id"] for r in records if r.get("error") is None}
        last_error = {r["id"]: r.get("error") for r in records}  # an id's latest error (None: done)
        done_tags = {item.tag for item in items if item.id in done}
        clean_journal(out, lambda tag: tag in done_tags)  # a killed run's unrecorded pictures go
        todo = [item for item in items if item.id not in done]
        summary.skipped = len(items) - len(todo)
        if summary.skipped:
            echo(f"{summary.skipped} of {len(items)} requests already done ({out / MANIFEST}): skipped", "info")
        manifest = Manifest(out / MANIFEST)
        try:
            for item in todo:  # refused as the file was read: on record (once), the rest still runs
                if item.error is not None:
                    record = _record(item.task(), error=item.error)
                    _finish(manifest if last_error.get(item.id) != item.error else None, out, record, summary, echo)
            runnable = [item.task() for item in todo if item.error is None]
            if runnable:
                results = (run_local(runnable, out, settings) if ray_address is None
                           else run_ray(runnable, out, settings, address=ray_address, **(ray_options or {})))
                with contextlib.closing(results):  # a Ray started here is shut down, also on Ctrl+C
                    for record in results:
                        _finish(manifest, out, record, summary, echo)
        finally:
            manifest.close()
    return summary


def _finish(manifest: Manifest | None, out: Path, record: dict[str, Any], summary: Summary, echo) -> None:
    """On record first (``manifest`` None: it is already), then the journal links go (a kill between the two only
    leaves links to remove)."""
    tmps = record.pop("tmps", [])
    if manifest is not None:
        manifest.append(record)
    for tmp in tmps:
        Path(tmp).unlink(missing_ok=True)
    if record["error"] is None:
        summary.done += 1
        seeds = record["seeds"]
        seed_text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}" if seeds else "-"
        echo(f"line {record['line']} ({record['id']}): seed {seed_text}, "
             f"{record['timings'].get('total_s', 0):.1f}s", "info")
        for name in record["files"]:
            echo(str(out / name), "file")
    else:
        summary.failed.append((record["line"], record["error"]))
        echo(f"line {record['line']}: error: {record['error']}", "error")


def _record(task: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": task["id"], "line": task["line"], "files": [], "seeds": [], "timings": {}, "error": None,
            "worker": f"{socket.gethostname()}:{os.getpid()}", **fields}


def run_task(engine, task: dict[str, Any], out: Path) -> dict[str, Any]:
    """One item on an engine: its pictures written with journal links (``tmps`` in the record, for the one who
    writes the manifest to remove), or its error. Ctrl+C stops the batch; anything else is this item's error."""
    from .output.files import save_result_linked
    from .request import GenerationRequest

    started = time.perf_counter()
    try:
        result = engine.generate(GenerationRequest.from_dict(task["job"]))
        pairs = save_result_linked(result, out, task["tag"], grid=False)
    except BrushworkError as err:
        return _record(task, error=str(err))
    except Exception as err:  # one broken item (out of memory, a bad file) must not end the batch
        if os.environ.get("BRUSHWORK_DEBUG"):
            import traceback

            traceback.print_exc(file=sys.stderr)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return _record(task, error=f"unexpected {type(err).__name__}: {first}")
    timings = {**result.timings, "item_s": round(time.perf_counter() - started, 3)}
    return _record(task, files=[str(final.relative_to(out)) for final, _ in pairs], seeds=list(result.seeds),
                   timings=timings, tmps=[str(tmp) for _, tmp in pairs])


def run_local(tasks: list[dict[str, Any]], out: Path, settings: Settings) -> Iterator[dict[str, Any]]:
    """One engine, the items in file order."""
    from .engine.core import Engine

    engine = Engine(settings)
    for task in tasks:
        yield run_task(engine, task, out)


# ---- 4. on Ray Data --------------------------------------------------------------------------------------------


class BatchWorker:
    """A Ray Data actor: one engine (one pipeline, its model kept loaded) for all the items Ray gives it."""

    def __init__(self, settings: Settings, out: str):
        from .engine.core import Engine

        self.engine = Engine(settings)
        self.out = Path(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        records = [json.dumps(run_task(self.engine, json.loads(task), self.out)) for task in batch["task"]]
        return {"record": np.array(records, dtype=object)}


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus: float
    gpus: float
    why: str


def check_ray_options(actors: int | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
                      **_: Any) -> None:
    if actors is not None and actors < 1:
        raise BrushworkError(f"--actors must be 1 or more, got {actors}")
    if num_gpus is not None and num_gpus < 0:
        raise BrushworkError(f"--num-gpus must be 0 or more, got {num_gpus:g}")
    if num_cpus is not None and num_cpus <= 0:
        raise BrushworkError(f"--num-cpus must be above 0, got {num_cpus:g}")


def plan_actors(cluster: dict[str, float], nodes: int, *, actors: int | None = None, num_cpus: float | None = None,
                num_gpus: float | None = None) -> ActorPlan:
    """How many actors, with what each: by default one per GPU of the cluster, else one per machine with its
    CPUs (torch uses a machine's cores better than several processes splitting them)."""
    check_ray_options(actors, num_cpus, num_gpus)
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if actors is None:
        actors = max(1, int(gpus // num_gpus)) if num_gpus else max(1, nodes)
    if num_cpus is None:
        num_cpus = 1.0 if num_gpus else max(1.0, float(int(cpus // actors)))
    why = f"{actors} actor{'s' if actors > 1 else ''} of {num_cpus:g} CPU{'s' if num_cpus != 1 else ''}" + (
        f" and {num_gpus:g} GPU" if num_gpus else "") + f" (the cluster: {cpus:g} CPUs, {gpus:g} GPUs)"
    return ActorPlan(actors, num_cpus, num_gpus, why)


def run_ray(tasks: list[dict[str, Any]], out: Path, settings: Settings, *, address: str = "",
            actors: int | None = None, num_cpus: float | None = None, num_gpus: float | None = None,
            quiet: bool = False) -> Iterator[dict[str, Any]]:
    """The items on Ray Data: ``map_batches`` over an actor pool, one engine per actor; records come back as items
    finish (any order). ``address``: "" = Ray's own choice (RAY_ADDRESS, a running local cluster, else a new
    one), else ``ray.init``'s address (``auto``, ``host:6379``, ``ray://host:10001``). The output folder must be
    the same path on every node (shared storage) on a cluster of several machines."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise BrushworkError("--ray needs Ray: pip install 'brushwork[ray]'") from err
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=not quiet)
        except Exception as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise BrushworkError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {first}") from err
    try:
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if num_gpus is None and settings.device in ("cpu", "mps"):  # the settings say: no CUDA GPU for this
            num_gpus = 0.0
        plan = plan_actors(ray.cluster_resources(), nodes, actors=actors, num_cpus=num_cpus, num_gpus=num_gpus)
        if not quiet:
            print(f"ray: {plan.why}", file=sys.stderr)
        context = ray.data.DataContext.get_current()
        if quiet:
            context.enable_progress_bars = False
        # the folders absolute (actors do not run where the command was typed); CPU actors: as many torch threads
        # as CPUs reserved, so that actors sharing a machine do not fight over its cores
        worker_settings = dataclasses.replace(
            settings, home=settings.home.resolve(), models_dir=Path(settings.models_dir).resolve(),
            outputs_dir=settings.outputs_dir.resolve(), threads=settings.threads if plan.gpus else int(plan.cpus))
        dataset = ray.data.from_items([{"task": json.dumps(task)} for task in tasks], override_num_blocks=len(tasks))
        dataset = dataset.map_batches(
            BatchWorker, fn_constructor_args=(worker_settings, str(Path(out).resolve())), batch_size=1,
            # one item at a time per actor: an item takes seconds, and queued ones would idle the others at the end
            compute=ray.data.ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=1),
            num_cpus=plan.cpus, num_gpus=plan.gpus,
        )
        for row in dataset.iter_rows():
            yield json.loads(row["record"])
    finally:
        if started:
            ray.shutdown()

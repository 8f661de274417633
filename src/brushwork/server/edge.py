"""The server's edge: what comes in from outside is read here, once, and refused with a 4xx when it is wrong.

- JSON bodies are read as RFC 8259 has them: ``NaN``, ``Infinity`` and numbers that overflow to
  infinity are refused (Python's ``json`` accepts them, and a stored NaN made every later answer a 500),
  so are lone surrogates (``"\\ud800"``: not text, it cannot be written to the database or a PNG),
  nesting deeper than ``MAX_DEPTH`` and integers of more than 4300 digits.
- The body size is counted as it arrives (``BodyLimit``), so a chunked upload cannot pass the limit that
  a ``content-length`` header would have shown.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute

MAX_DEPTH = 64  # nesting of JSON arrays and objects; A1111's requests are 3 deep


class BadBody(ValueError):
    pass


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadBody(f"the number {text[:40]} is too large (JSON numbers must be finite)")
    return value


def _constant(name: str) -> Any:
    raise BadBody(f"{name} is not a number JSON allows; send a finite number")


def loads(data: bytes | str) -> Any:
    """Strict JSON: raises ``BadBody`` (a ValueError) with a message a caller can act on."""
    try:
        value = json.loads(data, parse_float=_finite, parse_constant=_constant)
    except BadBody:
        raise
    except RecursionError:
        raise BadBody(f"the JSON is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except UnicodeDecodeError:
        raise BadBody("the body is not UTF-8 text") from None
    except ValueError as err:  # JSONDecodeError, and int() of over 4300 digits
        raise BadBody(f"the body is not valid JSON: {str(err)[:200]}") from err
    check(value)
    return value


def check(value: Any) -> None:
    """Refuse lone surrogates and deep nesting in parsed JSON (iteratively: no recursion limit to hit)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "body")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise BadBody(f"the JSON is nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(item, str):
            _text(item, where)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _text(key, where)
                stack.append((sub, depth + 1, f"{where}.{key[:40]}"))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1, f"{where}[{i}]") for i, sub in enumerate(item))


def _text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadBody(f"{where} holds a lone surrogate (\\u{ord(text[err.start]):04x}) at position {err.start}, "
                      "which is not text; send valid UTF-8") from err


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except BadBody as err:
                raise HTTPException(422, str(err)) from err
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are read by ``loads`` (FastAPI reads bodies through ``Request.json``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, counted as the bytes arrive."""

    def __init__(self, app, limit: int, error_body):
        self.app, self.limit, self.error_body = app, limit, error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._refuse(send)
        received, refused, started = 0, False, False

        async def counted_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return  # the 413 has been sent; whatever the app says after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send) -> None:
        body = json.dumps(self.error_body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

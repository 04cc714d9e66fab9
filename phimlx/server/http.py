"""HTTP plumbing of the server: the request body limit, and the errors in the OpenAPI spec."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .convert import error_body


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before the app
    sees it (declared by Content-Length or counted as it arrives)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        # Read the body here (at most max_bytes), then replay it to the app.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            f"the request body is larger than {self.max_bytes} bytes",
            "invalid_request_error",
            code="request_too_large",
        )
        await JSONResponse(body, status_code=413)(scope, receive, send)


_ERRORS = {
    "400": "invalid request (the field is named in error.param)",
    "401": "missing or wrong API key",
    "413": "request body too large",
    "429": "the queue is full (see Retry-After)",
    "503": "the server is shutting down",
}


def openapi_with_errors(app: FastAPI) -> dict[str, Any]:
    """FastAPI's spec with the errors this server answers (OpenAI's error body, 400 where
    FastAPI would say 422)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, summary=app.summary,
                           routes=app.routes)  # fmt: skip
        error = {
            "type": "object",
            "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
            }}},
        }  # fmt: skip
        for path, ops in spec.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):
                    codes = _ERRORS if op is ops.get("post") else {"401": _ERRORS["401"]}
                    for code, text in codes.items():
                        responses[code] = {
                            "description": text,
                            "content": {"application/json": {"schema": error}},
                        }
        app.openapi_schema = spec
    return app.openapi_schema

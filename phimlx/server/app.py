"""The FastAPI application: OpenAI's endpoints over one `Engine`.

Every error is OpenAI's body (``{"error": {"message", "type", "param", "code"}}``):
an invalid request is a 400 naming the field (not FastAPI's 422), a full queue a 429 with
``Retry-After``, a missing or wrong bearer token a 401, a body over the limit a 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .convert import (
    ApiError,
    chat_logprobs,
    chunk_logprobs,
    completion_logprobs,
    error_body,
    finish_reason,
    library_options,
    messages_to_prompt,
    prepare,
    stream_kwargs,
    usage,
)
from .engine import Engine, EngineStoppedError, QueueFullError, Ticket
from .http import BodyLimit, openapi_with_errors
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_SECONDS = 1


def create_app(
    model: Any,
    *,
    model_id: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 32,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cache: bool = True,
    max_context: int | None = None,
    prefill_chunk: int = 256,
    shutdown_grace: float = 0.0,
    warmup: bool = False,
) -> FastAPI:
    """The OpenAI-compatible app serving ``model``; its engine thread runs while the app's
    lifespan does (started at startup, stopped at shutdown).

    Args:
        model: a loaded `phimlx.Model` (the caller closes it after the app is done).
        model_id: the name ``/v1/models`` gives it (requests may name any model).
        api_key: if given, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_batch: requests generating at once (continuous batching).
        max_queue: requests waiting for a slot; more than that is a 429.
        max_body_bytes: the largest request body accepted (413 above).
        cache: reuse kept sessions by their longest common prefix with the prompt.
        max_context: each request's context (default: the model's).
        prefill_chunk: prompt tokens prefilled between two decode rounds.
        shutdown_grace: seconds a stream in flight may go on after the server is told to
            stop (then it is cancelled); keep it under uvicorn's graceful-shutdown timeout.
        warmup: run `Model.warm_up` at startup, before the first request is taken (so
            that it does not wait while the kernels load).
    """
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    supported = library_options(model)
    stop_ids = model.tokenizer.stop_ids
    created = int(time.time())
    fingerprint = f"phimlx-{model.backend}"
    context = max_context or model.config.context_length

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warmup:
            try:
                seconds = await run_in_threadpool(model.warm_up)
                log.info("warmed up in %.1f s", seconds)
            except Exception:  # noqa: BLE001 - the first requests pay instead; still serve
                log.warning("the warm-up failed; serving without it", exc_info=True)
        engine.start()
        log.info("serving %s (%s) with batches of up to %d", model_id, model.backend, max_batch)
        try:
            yield
        finally:
            engine.stop()
            log.info("engine stopped")

    app = FastAPI(
        title="phimlx",
        summary="OpenAI-compatible API over a phimlx model",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.openapi = lambda: openapi_with_errors(app)  # type: ignore[method-assign]

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise ApiError(
                401,
                "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        # pydantic names the union member it tried ("str", "list[...]"): not a field
        loc = [p for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, param = "the body is not valid JSON", None
        text = f"{param}: {msg}" if param else msg
        return JSONResponse(error_body(text, "invalid_request_error", param or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness (503 once the engine has stopped), and how busy the engine is."""
        ok = engine.alive
        body = {"status": "ok" if ok else "stopped", "model": model_id, **engine.load}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        """The one model this server runs."""
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "phimlx"}
        return {"object": "list", "data": [card]}

    async def start(body: Any, prompt: Any) -> Ticket:
        kwargs = stream_kwargs(body, supported=supported, context=context, cache=cache)
        kwargs["max_context"] = max_context
        call = await run_in_threadpool(prepare, model, prompt, kwargs)
        try:
            return engine.submit(call)
        except QueueFullError as e:
            raise ApiError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from e
        except EngineStoppedError as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from e

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat completion (OpenAI's), streamed as server-sent events with ``stream``."""
        ticket = await start(body, messages_to_prompt(body.messages))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_id,
                "system_fingerprint": fingerprint}  # fmt: skip
        with_logprobs = body.logprobs
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def event(choices: list[Any], use: Any = None) -> str:
                out = {**head, "object": "chat.completion.chunk", "choices": choices}
                if include_usage:
                    out["usage"] = use
                return json.dumps(out)

            async def events() -> AsyncIterator[str]:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])  # fmt: skip
                async for chunk in _chunks(ticket):
                    lp = chunk_logprobs(chunk, stop_ids) if with_logprobs else None
                    if chunk.text or lp is not None or chunk.finish_reason:
                        yield event([{
                            "index": 0,
                            "delta": {"content": chunk.text} if chunk.text else {},
                            "logprobs": chat_logprobs([lp]) if lp is not None else None,
                            "finish_reason": finish_reason(chunk.finish_reason),
                        }])  # fmt: skip
                    if chunk.finish_reason and include_usage:
                        yield event([], usage(chunk, ticket.cached_tokens))

            return _sse(events(), ticket, shutdown_grace)
        text, items, last = await _collect(ticket, request)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": chat_logprobs(items) if with_logprobs else None,
            "finish_reason": finish_reason(last.finish_reason),
        }
        return {**head, "object": "chat.completion", "choices": [choice],
                "usage": usage(last, ticket.cached_tokens)}  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Text completion of a raw prompt (no chat template)."""
        ticket = await start(body, body.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": fingerprint}  # fmt: skip
        with_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                offset = 0
                async for chunk in _chunks(ticket):
                    lp = chunk_logprobs(chunk, stop_ids) if with_logprobs else None
                    if chunk.text or lp is not None or chunk.finish_reason:
                        choice = {
                            "index": 0,
                            "text": chunk.text,
                            "logprobs": completion_logprobs([lp], offset) if lp else None,
                            "finish_reason": finish_reason(chunk.finish_reason),
                        }
                        offset += sum(len(t.chosen.text) for t in ([lp] if lp else []))
                        out = {**head, "choices": [choice]}
                        if include_usage:
                            out["usage"] = None
                        yield json.dumps(out)
                    if chunk.finish_reason and include_usage:
                        use = usage(chunk, ticket.cached_tokens)
                        yield json.dumps({**head, "choices": [], "usage": use})

            return _sse(events(), ticket, shutdown_grace)
        text, items, last = await _collect(ticket, request)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": completion_logprobs(items, 0) if with_logprobs else None,
            "finish_reason": finish_reason(last.finish_reason),
        }
        return {**head, "choices": [choice], "usage": usage(last, ticket.cached_tokens)}

    async def _collect(ticket: Ticket, request: Request) -> tuple[str, list[Any], Any]:
        """A whole generation; a client that disconnects meanwhile cancels it."""
        parts: list[str] = []
        items: list[Any] = []

        async def gather() -> Any:
            async for chunk in _chunks(ticket):
                parts.append(chunk.text)
                lp = chunk_logprobs(chunk, stop_ids)
                if lp is not None:
                    items.append(lp)
                if chunk.finish_reason:
                    return chunk

        last = await _unless_disconnected(gather(), request, ticket)
        return "".join(parts), items, last

    return app


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after"}


async def _chunks(ticket: Ticket) -> AsyncIterator[Any]:
    """The ticket's chunks up to the last; an engine-side failure becomes an `ApiError`."""
    while True:
        try:
            chunk = await ticket.get()
        except EngineStoppedError as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from e
        except ApiError:
            raise
        except Exception as e:
            log.exception("a request failed in the engine")
            first = (str(e).splitlines() or [""])[0][:300]  # the log has the whole of it
            raise ApiError(500, f"generation failed: {type(e).__name__}: {first}",
                           type="server_error") from e  # fmt: skip
        yield chunk
        if chunk.finish_reason is not None:
            return


async def _unless_disconnected(work: Awaitable[Any], request: Request, ticket: Ticket) -> Any:
    """Await ``work``; if the client disconnects first, cancel the ticket (and the work)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        ticket.cancel()
        task.cancel()
        raise ApiError(499, "the client disconnected")
    return task.result()


def _sse(events: AsyncIterator[str], ticket: Ticket, grace: float) -> EventSourceResponse:
    """Server-sent events ending with ``data: [DONE]``; an error after the start is sent as
    an ``error`` event (the status is already 200); a client gone cancels the ticket."""

    async def body() -> AsyncIterator[dict[str, str]]:
        try:
            async for data in events:
                yield {"data": data}
            yield {"data": "[DONE]"}
        except ApiError as e:
            yield {"data": json.dumps(e.body())}
        finally:  # normal end, client gone (cancelled) or shutdown: free the slot now
            ticket.cancel()

    return EventSourceResponse(body(), ping=15, shutdown_grace_period=grace)

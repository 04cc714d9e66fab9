"""OpenAI requests to `Model.stream` arguments, and chunks to OpenAI response objects.

OpenAI's semantics, not the library's defaults: temperature 1, no repeat penalty unless
asked (so temperature 0 gives the library's greedy text with ``repeat_penalty=1.0``), a
prompt longer than the context is an error (``context_overflow="error"``), not a
conversation with its oldest turns left out.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ContextLengthError
from ..generate import Chunk
from .schemas import ChatCompletionRequest, CompletionRequest, Message

# The library's options that requests may turn on; each is checked against the installed
# `Model.stream` signature, so a field the library lacks is a clear 400, not a TypeError.
_OPTIONAL = {
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
    "json_schema": "response_format",
    "grammar": "grammar",
    "regex": "regex",
}
_INVALID = re.compile(r"^(\w+)=.*? is invalid: ", re.S)
# llama.cpp-style names the API uses for the library's arguments, where they differ
_API_NAME = {"json_schema": "response_format", "max_tokens": "max_tokens"}


class ApiError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def messages_to_prompt(messages: list[Message]) -> list[dict[str, str]]:
    """The chat messages as the library takes them (``developer`` is a system message,
    text parts are joined)."""
    out = []
    for m in messages:
        content = m.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def stream_kwargs(
    body: ChatCompletionRequest | CompletionRequest,
    *,
    supported: frozenset[str],
    context: int,
    cache: bool,
) -> dict[str, Any]:
    """`Model.stream` keyword arguments for a request.

    Raises:
        ApiError: a field the installed library does not support.
    """
    chat = isinstance(body, ChatCompletionRequest)
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    stop = body.stop
    kw: dict[str, Any] = dict(
        # no max_tokens: until the end of the context (finish reason "length" then)
        max_tokens=max_tokens if max_tokens is not None else context,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=None if body.top_p in (None, 1) else body.top_p,
        top_k=body.top_k or None,
        min_p=body.min_p or None,
        repeat_penalty=1.0 if body.repeat_penalty is None else body.repeat_penalty,
        repeat_last_n=64 if body.repeat_last_n is None else body.repeat_last_n,
        # OpenAI takes any int64 seed; the library's generator takes non-negative ones
        seed=None if body.seed is None else body.seed & (2**64 - 1),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        chat=chat,
        cache=cache,
        context_overflow="error",
        ignore_eos=body.ignore_eos,
    )
    extra: dict[str, Any] = {}
    if body.presence_penalty:
        extra["presence_penalty"] = body.presence_penalty
    if body.frequency_penalty:
        extra["frequency_penalty"] = body.frequency_penalty
    if body.logit_bias:
        extra["logit_bias"] = {int(k): float(v) for k, v in body.logit_bias.items()}
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if body.logprobs:
            extra["logprobs"] = body.top_logprobs or 0
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_object":
            extra["json_schema"] = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ApiError(
                    400,
                    "response_format of type json_schema needs json_schema.schema",
                    param="response_format.json_schema",
                )
            extra["json_schema"] = fmt.json_schema.schema_
    elif body.logprobs is not None:
        extra["logprobs"] = body.logprobs
    if body.json_schema is not None:
        extra["json_schema"] = body.json_schema
    if body.grammar is not None:
        extra["grammar"] = body.grammar
    if body.regex is not None:
        extra["regex"] = body.regex
    if sum(k in extra for k in ("json_schema", "grammar", "regex")) > 1:
        raise ApiError(400, "give one of response_format, json_schema, grammar, regex")
    for name in extra:
        if name not in supported:
            raise ApiError(
                400,
                f"{_OPTIONAL[name]} is not supported yet by this version of phimlx",
                param=_OPTIONAL[name],
                code="unsupported_parameter",
            )
    return {**kw, **extra}


def library_options(model: Any) -> frozenset[str]:
    """The keyword arguments the installed `Model.stream` takes."""
    return frozenset(inspect.signature(model.stream).parameters)


def prepare(model: Any, prompt: Any, kwargs: dict[str, Any]) -> Any:
    """`Model._prepare` for a request (tokenized and checked): the engine's call.

    Raises:
        ApiError: the library rejected a value, or the prompt does not fit the context.
    """
    from .. import backends

    param = "messages" if kwargs.get("chat") else "prompt"
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")  # fmt: skip
    try:
        args = inspect.signature(model.stream).bind(prompt, **kwargs)
        args.apply_defaults()
        call = model._prepare(**args.arguments)
        backends.check_fits(len(call.ids), 0, call.context, model.config.context_length)
    except ContextLengthError as e:
        raise ApiError(400, str(e), param=param, code="context_length_exceeded") from e
    except ValueError as e:  # the library's own checks name the argument
        m = _INVALID.match(str(e))
        name = m.group(1) if m else None
        if type(e).__name__ == "ConstraintError":
            name = "response_format"
        elif type(e).__name__ == "ChatTemplateError":
            name = "messages"
        raise ApiError(400, str(e), param=_API_NAME.get(name or "", name)) from e
    return call


# -- responses -------------------------------------------------------------------------------


def finish_reason(reason: str | None) -> str | None:
    """The library's finish reason in OpenAI's terms (a full context is ``"length"``)."""
    return "length" if reason == "context" else reason


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # OpenAI's stand-in for -inf; JSON has no inf


def chunk_logprobs(chunk: Chunk, stop_ids: frozenset[int]) -> Any:
    """The chunk's `Logprobs`, or None (also for the end-of-generation token, not output)."""
    lp = getattr(chunk, "logprobs", None)
    if lp is None or (chunk.finish_reason == "stop" and chunk.token in stop_ids):
        return None
    return lp


def _entry(t: Any) -> dict[str, Any]:
    return {"token": t.text, "logprob": _logprob(t.logprob), "bytes": list(t.text.encode())}


def chat_logprobs(items: list[Any]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion: ``{"content": [...]}``."""
    return {
        "content": [{**_entry(lp.chosen), "top_logprobs": [_entry(t) for t in lp.top]}
                    for lp in items],
        "refusal": None,
    }  # fmt: skip


def completion_logprobs(items: list[Any], offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion; ``offset``: the text before these."""
    offsets = []
    for lp in items:
        offsets.append(offset)
        offset += len(lp.chosen.text)
    return {
        "tokens": [lp.chosen.text for lp in items],
        "token_logprobs": [_logprob(lp.chosen.logprob) for lp in items],
        "top_logprobs": [{t.text: _logprob(t.logprob) for t in lp.top} for lp in items],
        "text_offset": offsets,
    }


def usage(chunk: Chunk, cached_tokens: int) -> dict[str, Any]:
    """``usage`` from a stream's last chunk; ``cached_tokens`` as the engine found them."""
    stats = chunk.stats
    prompt = stats.prompt_tokens if stats is not None else 0
    completion = stats.generation_tokens if stats is not None else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }

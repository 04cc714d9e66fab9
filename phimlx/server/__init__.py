"""`phimlx serve`: an OpenAI-compatible HTTP API with continuous batching.

Needs the optional extra: ``pip install 'phimlx[server]'`` (FastAPI, uvicorn,
sse-starlette).  `create_app` builds the ASGI app around a loaded model; `serve` runs it
with uvicorn until SIGINT/SIGTERM (in-flight requests get ``shutdown_timeout`` seconds to
finish, then are cancelled; the engine stops last).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from ..errors import PhimlxError

log = logging.getLogger(__name__)

EXTRA = ("fastapi", "uvicorn", "sse_starlette")


class ServerDependencyError(PhimlxError, ImportError):
    """The server's optional dependencies are not installed."""


def require_extra() -> None:
    """Raise `ServerDependencyError` naming the missing packages, if any."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        raise ServerDependencyError(f"phimlx serve needs {names}: pip install 'phimlx[server]'")


def create_app(model: Any, **kwargs: Any) -> Any:
    """The FastAPI app serving ``model`` (see `phimlx.server.app.create_app`).

    Raises:
        ServerDependencyError: the ``server`` extra is not installed.
    """
    require_extra()
    from .app import create_app as create

    return create(model, **kwargs)


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
    warmup: bool = True,
    **kwargs: Any,
) -> None:
    """Serve ``model`` over HTTP until interrupted (SIGINT or SIGTERM).

    Args:
        model: a loaded `phimlx.Model`; still open afterwards (the caller closes it).
        host, port: where to listen (default: this machine only).
        shutdown_timeout: seconds in-flight requests get to finish after the signal.
        log_level: uvicorn's log level.
        warmup: run `Model.warm_up` before taking requests (``phimlx serve
            --no-warmup`` skips it).
        **kwargs: `create_app`'s options (``model_id``, ``api_key``, ``max_batch``, ...).

    Raises:
        ServerDependencyError: the ``server`` extra is not installed.
    """
    # streams in flight get the shutdown timeout too (less a second for the engine to stop)
    kwargs.setdefault("shutdown_grace", max(0.0, shutdown_timeout - 1.0))
    app = create_app(model, warmup=warmup, **kwargs)
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout,
        log_level=log_level,
    )
    uvicorn.Server(config).run()


__all__ = ["ServerDependencyError", "create_app", "require_extra", "serve"]

"""The FastAPI app of ``redpen serve``: OpenAI's chat API over a backend, plain or memory-guided, behind API keys.

Plain, it lets other tools (an AutoGen app, lm-eval-harness, another redpen run through ``--backend openai``) use a
local model and its LoRA adapters the way they would use vLLM: an adapter is chosen by ``model=name``, and requests
go straight to ``backend.complete``, concurrently (the local backend batches them itself).

Memory-guided (``guided``), each chat request is a SALAM examination of the caller's tenant (``agents.serving``)
and ``POST /v1/feedback`` turns a corrected answer into a mistake in that tenant's memory.

The routes live in :mod:`runtime.server.routes`, one router per API; ``build_app`` only wires them to the state
they share (:class:`runtime.server.state.Served`) and answers every error in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import ConfigError, ContextLengthError, Overloaded, RedpenError, RequestRefused
from runtime.models.backend import Backend
from runtime.server import responses, routes
from runtime.server.body_limit import BodyLimit
from runtime.server.errors import APIError
from runtime.server.keys import KeyRing
from runtime.server.limits import ServeLimits
from runtime.server.routes.feedback import Corrections
from runtime.server.state import ClientGone, Guided, PromptScorer, Served

__all__ = ["Guided", "PromptScorer", "build_app", "serve"]

log = logging.getLogger(__name__)


def build_app(
    backend: Backend,
    adapters: Sequence[str] = (),
    *,
    keys: KeyRing | None = None,
    limits: ServeLimits | None = None,
    guided: Guided | None = None,
    stopping: asyncio.Event | None = None,
) -> Any:
    """An ASGI app serving ``backend.model_id`` (the base model) and each adapter name as a model.

    ``keys`` None serves without keys, as one tenant: for in-process tests only (``serve`` refuses it). With
    ``guided`` the backend is the student's, and chat requests are SALAM examinations. Setting ``stopping``
    cancels the requests in flight with 503 (``serve`` sets it as the shutdown grace runs out).
    """
    limits = limits or ServeLimits()
    if guided is not None and guided.roles.student is not backend:
        raise ConfigError("a memory-guided app serves its student's backend: pass guided.roles.student")
    # No /docs, /redoc or /openapi.json: they would show anyone without a key the served models and the API.
    app = FastAPI(
        title="redpen",
        summary=f"OpenAI-compatible server for {backend.model_id}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.keys = keys
    app.state.served = Served(backend, tuple(adapters), limits, guided, stopping or asyncio.Event())
    app.state.corrections = Corrections()
    for router in (routes.models.router, routes.chat.router, routes.completions.router, routes.feedback.router):
        app.include_router(router)
    for error, handler in _HANDLERS.items():
        app.add_exception_handler(error, handler)
    return BodyLimit(app, limits.max_body_bytes)


def _error_response(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    body = responses.error_body(message, type_, code)
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"))


async def _api_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return _error_response(error.status, error.message, error.type, error.code)


async def _invalid_request(_: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    return _error_response(400, problems, "invalid_request_error", None)


async def _http_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    code = "request_too_large" if error.status_code == 413 else None
    return _error_response(error.status_code, str(error.detail), "invalid_request_error", code)


async def _context_exceeded(_: Request, error: Exception) -> Response:
    return _error_response(400, str(error), "invalid_request_error", "context_length_exceeded")


async def _refused_upstream(_: Request, error: Exception) -> Response:
    # The upstream server's 400 (through the openai backend) is the client's: what it asked was passed on as asked.
    return _error_response(400, str(error), "invalid_request_error", None)


async def _overloaded(_: Request, error: Exception) -> Response:
    assert isinstance(error, Overloaded)
    response = _error_response(429, str(error), "rate_limit_error", "overloaded")
    response.headers["Retry-After"] = str(error.retry_after_s)
    return response


async def _backend_failed(_: Request, error: Exception) -> Response:
    log.error("request failed: %s", error)
    return _error_response(500, str(error), "server_error", None)


async def _client_gone(_: Request, error: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it


# Each error a route may raise, answered in OpenAI's error shape (the most specific class that matches wins).
_HANDLERS = {
    APIError: _api_error,
    RequestValidationError: _invalid_request,
    StarletteHTTPException: _http_error,
    ContextLengthError: _context_exceeded,
    RequestRefused: _refused_upstream,
    Overloaded: _overloaded,
    RedpenError: _backend_failed,
    ClientGone: _client_gone,
}


class _Server(uvicorn.Server):
    """uvicorn's server, which also sets ``exiting`` when a signal stops it (the signal handler runs between two
    steps of the event loop's thread, so the event is set through the loop)."""

    def __init__(self, config: uvicorn.Config, exiting: asyncio.Event) -> None:
        super().__init__(config)
        self.exiting = exiting
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.exiting.set)


def serve(
    backend: Backend,
    *,
    keys: KeyRing,
    host: str = "127.0.0.1",
    port: int = 8000,
    adapters: Sequence[str] = (),
    limits: ServeLimits | None = None,
    guided: Guided | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C: requests in flight get ``limits.shutdown_grace_s`` to finish, then the
    backends, the memory and the ledger are closed."""
    if not len(keys):
        raise ConfigError(f"no API keys in {keys.path}: make one with `redpen serve keys add NAME`")
    limits = limits or ServeLimits()
    stopping = asyncio.Event()
    app = build_app(backend, adapters, keys=keys, limits=limits, guided=guided, stopping=stopping)
    # No access log: a gathering run sends thousands of requests and the log would drown everything else.
    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, timeout_graceful_shutdown=limits.shutdown_grace_s
    )
    exiting = asyncio.Event()  # a signal asked the server to stop
    server = _Server(config, exiting)
    # uvicorn re-raises the signal it stopped on once it is done; for SIGTERM with the default handler that would
    # end the process before the memory and the backends are closed, so SIGTERM is a no-op by then.
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: drained"))

    async def drain() -> None:
        """Once a signal stops the server: the requests in flight get the grace period (less the half second
        their 503 takes to be sent), then are answered 503 rather than cut by uvicorn with a bare 500."""
        await exiting.wait()
        await asyncio.sleep(max(limits.shutdown_grace_s - 0.5, 0))
        stopping.set()

    async def run() -> None:
        log.info("serving %s at http://%s:%d/v1", ", ".join([backend.model_id, *adapters]), host, port)
        server.loop = asyncio.get_running_loop()
        drainer = asyncio.get_running_loop().create_task(drain())
        try:
            await server.serve()
        finally:
            drainer.cancel()
            await backend.aclose()
            if guided is not None:
                if guided.roles.assistant is not backend:
                    await guided.roles.assistant.aclose()
                guided.memory.close()
                guided.ledger.close()

    asyncio.run(run())

"""What every route of the server shares, kept in the app's state: the backend and the models it serves, the
limits, the memory-guided roles, and the rules of work in flight (a key's places, the request timeout, the
client's disconnection, the server's shutdown). Routes get it as a dependency (``Server``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol, TypeVar, runtime_checkable

from autogen_core import CancellationToken
from fastapi import Depends, Request

from agents.team import Roles
from memory.store import MistakeMemory
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD
from runtime.models import scheduling
from runtime.models.backend import Backend, too_long
from runtime.server.errors import APIError
from runtime.server.keys import Caller
from runtime.server.limits import ServeLimits
from runtime.server.schema import ChatRequest, CompletionRequest, unsupported
from runtime.server.transcripts import Ledger

log = logging.getLogger(__name__)

T = TypeVar("T")


@runtime_checkable
class PromptScorer(Protocol):
    """A backend that can give the log-prob of every token of a prompt (what option scoring needs)."""

    async def prompt_logprobs(self, prompt: str, adapter: str | None = None) -> list[tuple[str, float | None, int]]:
        """Each token as (text, log-prob given the tokens before it or None for the first, character offset)."""
        ...


@dataclass
class Guided:
    """What memory-guided serving needs: the two roles, the mistake memory, the ledger, and how to retrieve."""

    roles: Roles
    memory: MistakeMemory
    ledger: Ledger
    k: int = RETRIEVAL_K
    threshold: float | None = RETRIEVAL_THRESHOLD
    shared: bool = True  # retrieval also reads the records of no tenant (``redpen gather``'s), read-only


class ClientGone(Exception):
    """The client disconnected: its work was cancelled and nobody reads an answer."""


@dataclass
class Served:
    """The server's shared state: one per app, in ``app.state.served``."""

    backend: Backend
    adapters: Sequence[str]
    limits: ServeLimits
    guided: Guided | None
    stopping: asyncio.Event  # set: the requests in flight are answered 503
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: dict[str, int] = field(default_factory=dict)  # key hash -> requests in flight

    @property
    def models(self) -> list[str]:
        return [self.backend.model_id, *self.adapters]

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for a model not served."""
        if model == self.backend.model_id:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(self.models)
        raise APIError(404, f"The model '{model}' does not exist; served: {served}", code="model_not_found")

    def needs(self, request: ChatRequest | CompletionRequest, fields: dict[str, str]) -> None:
        """Refuse, by name, the fields the request sets that the backend cannot honour (field -> feature)."""
        backend = self.backend
        refused = unsupported(request)
        refused += [
            f"{name} (the {backend.kind} backend cannot)" for name, f in fields.items() if f not in backend.features
        ]
        if refused:
            raise APIError(400, f"unsupported by redpen's server: {', '.join(refused)}", code="unsupported_parameter")

    def too_long_prompt(self, prompt_tokens: int, reply_tokens: int) -> str | None:
        context = self.backend.context_length
        return None if context is None else too_long(prompt_tokens, reply_tokens, context, self.backend.model_id)

    async def guarded(self, request: Request, work: Callable[[CancellationToken], Awaitable[T]]) -> T:
        """Run ``work`` under the request timeout; cancel it (and its model calls) if the client disconnects or
        the server stops."""
        timeout = self.limits.request_timeout_s
        token = CancellationToken()
        task = asyncio.ensure_future(work(token))
        watcher = asyncio.ensure_future(_disconnected(request))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({task, watcher, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            stop.cancel()
            if not task.done():
                token.cancel()
                task.cancel()
        if task in done:
            return task.result()
        if watcher in done:
            log.info("client disconnected; its request was cancelled")
            raise ClientGone()
        if stop in done:
            raise APIError(503, "the server is shutting down; send the request again", "server_error", "shutting_down")
        raise APIError(
            504,
            f"no answer within {timeout:g} s (--request-timeout-s); ask for a shorter reply (max_tokens) "
            "or retry later",
            "timeout",
            "timeout",
        )

    def take(self, caller: Caller) -> None:
        """One of the caller's in-flight places; 429 when its key has none left."""
        limit = self.limits.in_flight_per_key
        if self.in_flight.get(caller.key_id, 0) >= limit:
            raise APIError(
                429,
                f"this key has {limit} requests in flight already (--in-flight-per-key); wait for one to finish",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
        self.in_flight[caller.key_id] = self.in_flight.get(caller.key_id, 0) + 1

    def release(self, caller: Caller) -> None:
        self.in_flight[caller.key_id] -= 1

    @contextlib.contextmanager
    def on_behalf_of(self, caller: Caller) -> Iterator[None]:
        """Model work started in the block is the key's (its fair share of a local model) and due within the
        request timeout."""
        with scheduling.on_behalf_of(caller.key_id, time.monotonic() + self.limits.request_timeout_s):
            yield

    @contextlib.contextmanager
    def slot(self, caller: Caller) -> Iterator[None]:
        """Hold one of the caller's in-flight places for the block (429 when its key has none left), the block's
        model work on the key's behalf."""
        self.take(caller)
        try:
            with self.on_behalf_of(caller):
                yield
        finally:
            self.release(caller)


def served(request: Request) -> Served:
    """The app's shared state (a route's dependency)."""
    state: Served = request.app.state.served
    return state


Server = Annotated[Served, Depends(served)]


async def _disconnected(request: Request) -> None:
    """Return when the client has gone: the body is read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""The FastAPI app of ``redpen serve``: OpenAI's chat API over a backend, plain or memory-guided, behind API keys.

Plain, it lets other tools (an AutoGen app, lm-eval-harness, another redpen run through ``--backend openai``) use a
local model and its LoRA adapters the way they would use vLLM: an adapter is chosen by ``model=name``, and requests
go straight to ``backend.generate``, concurrently (the local backend batches them itself).

Memory-guided (``guided``), each chat request is a SALAM examination of the caller's tenant (``agents.serving``)
and ``POST /v1/feedback`` turns a corrected answer into a mistake in that tenant's memory.

``/v1/completions`` serves only prompt scoring (``echo=true`` with ``logprobs``), the one use redpen has for it,
and only over a backend that can score prompts (:class:`PromptScorer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any, Protocol, TypeVar, runtime_checkable

import uvicorn
from autogen_core import CancellationToken
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.gathering import MemoryWriter
from agents.serving import answer_chat, chat_example, learn_from_correction, question_of
from agents.team import Roles
from memory.store import MistakeMemory, TenantMemory
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD
from runtime.errors import ConfigError, ContextLengthError, Overloaded, RedpenError
from runtime.models import scheduling
from runtime.models.backend import (
    Backend,
    Decoding,
    Generation,
    GenerationSettings,
    Message,
    TokenLogprob,
    overflow,
    too_long,
)
from runtime.server import responses
from runtime.server.chat import closed_schema, forced_call_schema, render, tool_calls
from runtime.server.errors import APIError
from runtime.server.keys import KeyRing, key_hash
from runtime.server.ledger import Completion, Feedback, Ledger
from runtime.server.limits import BodyLimit, ServeLimits
from runtime.server.schema import ChatRequest, CompletionRequest, unsupported

log = logging.getLogger(__name__)

T = TypeVar("T")

OPEN_TENANT = "default"  # the one tenant of an app built without keys (in-process tests); `redpen serve` has keys


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


class FeedbackRequest(BaseModel):
    """``correct: true``, or the right answer as ``gold`` (and an optional ``note`` for the study assistant)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=200)
    correct: bool | None = None
    gold: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


@dataclass(frozen=True)
class Caller:
    key_id: str  # the key's hash: what in-flight requests are counted by
    tenant: str


class _ClientGone(Exception):
    """The client disconnected: its work was cancelled and nobody reads an answer."""


def authenticate(request: Request) -> Caller:
    """The caller of a request, by its bearer key (the app's ``state.keys``); 401 for a missing or unknown key."""
    keys: KeyRing | None = request.app.state.keys
    if keys is None:
        return Caller(key_id="", tenant=OPEN_TENANT)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer KEY' "
            "(make one with `redpen serve keys add NAME`)",
            code="invalid_api_key",
        )
    tenant = keys.tenant_of(key)
    if tenant is None:
        raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return Caller(key_id=key_hash(key), tenant=tenant)


Authorized = Annotated[Caller, Depends(authenticate)]


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
    stopping = stopping or asyncio.Event()
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
    served = [backend.model_id, *adapters]
    created = int(time.time())
    in_flight: dict[str, int] = {}
    feedback_locks: dict[str, asyncio.Lock] = {}
    feedback_users: dict[str, int] = {}  # requests holding or awaiting a completion's lock
    writers: dict[str, MemoryWriter] = {}

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error.status, error.message, error.type, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error_response(400, problems, "invalid_request_error", None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if error.status_code == 413 else None
        return _error_response(error.status_code, str(error.detail), "invalid_request_error", code)

    @app.exception_handler(ContextLengthError)
    async def context_exceeded(_: Request, error: ContextLengthError) -> JSONResponse:
        return _error_response(400, str(error), "invalid_request_error", "context_length_exceeded")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, error: Overloaded) -> JSONResponse:
        response = _error_response(429, str(error), "rate_limit_error", "overloaded")
        response.headers["Retry-After"] = str(error.retry_after_s)
        return response

    @app.exception_handler(RedpenError)
    async def backend_failed(_: Request, error: RedpenError) -> JSONResponse:
        log.error("request failed: %s", error)
        return _error_response(500, str(error), "server_error", None)

    @app.exception_handler(_ClientGone)
    async def client_gone(_: Request, error: _ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    def adapter_for(model: str) -> str | None:
        if model == backend.model_id:
            return None
        if model in adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist; served: {', '.join(served)}", code="model_not_found")

    async def guarded(request: Request, work: Callable[[CancellationToken], Awaitable[T]]) -> T:
        """Run ``work`` under the request timeout; cancel it (and its model calls) if the client disconnects or
        the server stops."""
        token = CancellationToken()
        task = asyncio.ensure_future(work(token))
        watcher = asyncio.ensure_future(_disconnected(request))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {task, watcher, stop}, timeout=limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
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
            raise _ClientGone()
        if stop in done:
            raise APIError(503, "the server is shutting down; send the request again", "server_error", "shutting_down")
        raise APIError(
            504,
            f"no answer within {limits.request_timeout_s:g} s (--request-timeout-s); ask for a shorter reply "
            "(max_tokens) or retry later",
            "timeout",
            "timeout",
        )

    def take(caller: Caller) -> None:
        """One of the caller's in-flight places; 429 when its key has none left."""
        if in_flight.get(caller.key_id, 0) >= limits.in_flight_per_key:
            raise APIError(
                429,
                f"this key has {limits.in_flight_per_key} requests in flight already (--in-flight-per-key); "
                "wait for one to finish",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
        in_flight[caller.key_id] = in_flight.get(caller.key_id, 0) + 1

    def release(caller: Caller) -> None:
        in_flight[caller.key_id] -= 1

    @contextlib.contextmanager
    def on_behalf_of(caller: Caller) -> Iterator[None]:
        """Model work started in the block is the key's (its fair share of a local model) and due within the
        request timeout."""
        with scheduling.on_behalf_of(caller.key_id, time.monotonic() + limits.request_timeout_s):
            yield

    @contextlib.contextmanager
    def slot(caller: Caller) -> Iterator[None]:
        """Hold one of the caller's in-flight places for the block (429 when its key has none left), the block's
        model work on the key's behalf."""
        take(caller)
        try:
            with on_behalf_of(caller):
                yield
        finally:
            release(caller)

    @app.get("/health")
    async def health() -> dict[str, str]:
        # No key: what orchestrators and redpen's managed servers poll. The port listens only once the model is
        # loaded, so an answer means ready (vLLM's and llama.cpp's /health mean the same); it tells nothing else.
        return {"status": "ok"}

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "redpen"}

    @app.get("/v1/models")
    async def list_models(caller: Authorized) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in served]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str, caller: Authorized) -> dict[str, Any]:
        adapter_for(model)
        return model_card(model)

    def needs(request: ChatRequest | CompletionRequest, fields: dict[str, str]) -> None:
        """Refuse, by name, the fields the request sets that the backend cannot honour (field -> feature)."""
        refused = unsupported(request)
        refused += [
            f"{name} (the {backend.kind} backend cannot)" for name, f in fields.items() if f not in backend.features
        ]
        if refused:
            raise APIError(400, f"unsupported by redpen's server: {', '.join(refused)}", code="unsupported_parameter")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, request: ChatRequest, caller: Authorized) -> Any:
        adapter = adapter_for(request.model)
        n = _count(request.n)
        tools = request.tools or [] if request.tool_choice != "none" else []
        forced = forced_call_schema(tools, request.tool_choice) if tools else None
        schema = _response_schema(request)
        if forced is not None and schema is not None:
            raise APIError(400, "response_format and a required tool call (tool_choice) cannot both shape a reply")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true")
        decoding = Decoding(
            logprobs=(request.top_logprobs or 0) if request.logprobs else None, json_schema=forced or schema
        )
        # Any backend streams: one that cannot decode piece by piece gives its text in one piece.
        asked = {"logprobs": "logprobs" if request.logprobs else None}
        asked["response_format"] = "json_schema" if schema is not None else None
        asked["tool_choice"] = "json_schema" if forced is not None else None
        needs(request, {name: feature for name, feature in asked.items() if feature is not None})
        if guided is not None:
            plain = {
                "n": n > 1,
                "tools": bool(tools),
                "response_format": schema is not None,
                "logprobs": request.logprobs,
            }
            extra = [name for name, set_ in plain.items() if set_]
            if extra:
                raise APIError(400, f"memory-guided serving answers plain chats: {', '.join(extra)} unsupported")
        if request.stream and (n > 1 or request.logprobs):
            raise APIError(400, "stream with n > 1 or logprobs is unsupported: ask without stream")
        messages = render(request.messages, tools)
        settings = _settings(
            request.temperature,
            request.top_p,
            request.seed,
            request.stop,
            limits,
            request.max_completion_tokens or request.max_tokens,
            "max_tokens",
        )
        reserve = limits.guidance_tokens if guided is not None else 0
        too_long = overflow(backend, messages, settings.max_new_tokens + reserve)
        if too_long is not None:
            room = f" and {reserve} tokens of guidance" if reserve else ""
            raise APIError(400, f"{too_long}{room}; shorten the messages", code="context_length_exceeded")
        if request.user or request.safety_identifier:
            log.info("chat for end user %s", request.safety_identifier or request.user)
        id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream and guided is None:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return stream_chat(
                http, caller, id, request.model, messages, settings, adapter, decoding, tools, include_usage
            )
        with slot(caller):
            if guided is None:
                generations = await guarded(
                    http,
                    lambda _: asyncio.gather(
                        *(backend.complete(messages, _nth(settings, i), adapter, decoding) for i in range(n))
                    ),
                )
                parallel = request.parallel_tool_calls is not False
                choices = [
                    responses.chat_choice(
                        i,
                        g,
                        tool_calls(g.text, tools, forced=forced is not None, parallel=parallel),
                        logprobs=bool(request.logprobs),
                    )
                    for i, g in enumerate(generations)
                ]
                prompt_tokens = generations[0].usage.prompt_tokens
                usage = responses.usage(prompt_tokens, sum(g.usage.completion_tokens for g in generations))
                extension = None
            else:
                text, usage, finish, extension = await examine(http, id, caller, messages, settings, adapter)
                choices = [responses.chat_choice(0, Generation(text, finish_reason=finish))]
        body = responses.chat_completion(id, request.model, choices, usage, extension)
        return _one_chunk(body) if request.stream else body

    def stream_chat(
        http: Request,
        caller: Caller,
        id: str,
        model: str,
        messages: list[Message],
        settings: GenerationSettings,
        adapter: str | None,
        decoding: Decoding,
        tools: list[Any],
        include_usage: bool,
    ) -> StreamingResponse:
        """Server-sent chunks of one reply, a chunk for each piece of text as the backend decodes it. A reply that
        may call tools is sent once whole: until it ends nobody knows whether it is text or a call."""
        take(caller)  # now: a 429 must come before the 200 of a stream; released once the stream is done
        head = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return responses.event(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events() -> AsyncIterator[str]:
            with on_behalf_of(caller):  # entered and left in this generator's own context
                pieces: asyncio.Queue[str] = asyncio.Queue()
                sent = ""

                def grew(text: str) -> None:
                    if not tools:
                        pieces.put_nowait(text)

                yield chunk({"role": "assistant", "content": ""})
                work = asyncio.ensure_future(
                    guarded(http, lambda _: backend.complete(messages, settings, adapter, decoding, grew))
                )
                async for piece in grown_text(work, pieces):
                    yield chunk({"content": piece})
                    sent += piece
                try:
                    generation = work.result()
                except APIError as error:
                    yield responses.event({"error": {"message": error.message, "type": error.type, "code": error.code}})
                    return
                except RedpenError as error:
                    yield responses.event({"error": {"message": str(error), "type": "server_error", "code": None}})
                    return
                calls = tool_calls(generation.text, tools, forced=decoding.json_schema is not None) if tools else []
                if calls:
                    deltas = [{"index": i} | call for i, call in enumerate(calls)]
                    yield chunk({"tool_calls": deltas})
                elif generation.text.startswith(sent):
                    if len(generation.text) > len(sent):
                        yield chunk({"content": generation.text[len(sent) :]})
                else:  # the stripped whole disagrees with the pieces (cannot happen; say so rather than garble)
                    log.warning("streamed text is not a prefix of the reply")
                yield chunk({}, "tool_calls" if calls else generation.finish_reason)
                if include_usage:
                    u = generation.usage
                    usage = responses.usage(u.prompt_tokens, u.completion_tokens)
                    yield responses.event(head | {"choices": [], "usage": usage})
                yield responses.DONE

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release, caller))

    async def examine(
        http: Request,
        id: str,
        caller: Caller,
        messages: list[Message],
        settings: GenerationSettings,
        adapter: str | None,
    ) -> tuple[str, dict[str, int], str, dict[str, Any]]:
        assert guided is not None
        roles = dataclasses.replace(guided.roles, student_settings=settings, student_adapter=adapter)
        question = question_of(messages)
        example = chat_example(id, question, messages)
        memory = TenantMemory(guided.memory, caller.tenant, shared=guided.shared)
        result = await guarded(
            http,
            lambda token: answer_chat(
                example, roles, memory, k=guided.k, threshold=guided.threshold, cancellation_token=token
            ),
        )
        # Committed before the answer is sent: feedback on it may come after a restart.
        completion = Completion(id, caller.tenant, roles.student_id, question, result.reply)
        await asyncio.to_thread(guided.ledger.add_completion, completion)
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        extension = {
            "retrieved": [{"id": r.id, "score": r.score} for r in result.retrieved or []],
            "guidance": result.guidance or "",
        }
        return result.reply, usage, result.finish_reason or "stop", extension

    @app.post("/v1/feedback")
    async def feedback(http: Request, request: FeedbackRequest, caller: Authorized) -> Any:
        if guided is None:
            raise APIError(404, "this server keeps no memory: feedback needs `redpen serve --memory`", code="not_found")
        with slot(caller):  # a correction runs the study assistant: it counts against the key like a chat
            return await record_feedback(http, request, caller, guided)

    async def record_feedback(http: Request, request: FeedbackRequest, caller: Caller, guided: Guided) -> Any:
        gold = (request.gold or "").strip()
        if not (request.correct is True and not gold) and not (gold and request.correct is not True):
            raise APIError(400, "give either correct: true, or the right answer as gold (with an optional note)")
        ledger = guided.ledger
        completion = await asyncio.to_thread(ledger.completion, request.completion_id, caller.tenant)
        if completion is None:  # another tenant's completion reads as absent, so its ids reveal nothing
            raise APIError(404, f"no completion {request.completion_id!r} was served to this key's tenant")
        lock = feedback_locks.setdefault(completion.id, asyncio.Lock())
        feedback_users[completion.id] = feedback_users.get(completion.id, 0) + 1
        try:
            async with lock:  # the same completion twice at once: the second waits, then finds the first
                stored = await asyncio.to_thread(ledger.feedback, completion.id)
                if stored is not None:
                    return _ack(stored, duplicate=True)
                mistake_id = None
                if gold:
                    mistake_id = await guarded(http, lambda token: learn(completion, gold, request.note or "", token))
                entry = Feedback(completion.id, caller.tenant, not gold, gold or None, request.note, mistake_id)
                return _ack(await asyncio.to_thread(ledger.add_feedback, entry), duplicate=False)
        finally:
            # Dropped only when no request awaits it: a woken waiter has not re-acquired yet when the holder
            # releases, and a third request must not get a fresh lock and run beside it.
            feedback_users[completion.id] -= 1
            if not feedback_users[completion.id]:
                del feedback_users[completion.id], feedback_locks[completion.id]

    async def learn(completion: Completion, gold: str, note: str, token: CancellationToken) -> str | None:
        """The mistake of a corrected answer, in the tenant's memory and on disk; its id, or None if it was right."""
        assert guided is not None
        example = chat_example(completion.id, completion.question, gold=gold)
        record = await learn_from_correction(
            example,
            completion.answer,
            guided.roles,
            model_id=completion.model_id,
            tenant=completion.tenant,
            note=note,
            cancellation_token=token,
        )
        if record is None:
            return None
        writer = writers.get(completion.tenant)
        if writer is None:
            writer = writers[completion.tenant] = MemoryWriter(TenantMemory(guided.memory, completion.tenant), True)
        await writer.write(record)
        return record.id

    @app.post("/v1/completions")
    async def completions(http: Request, request: CompletionRequest, caller: Authorized) -> Any:
        adapter = adapter_for(request.model)
        if "token_prompt" not in backend.features and isinstance(backend, PromptScorer):
            return await score_prompt(http, request, caller, adapter)
        asked = {"prompt": "token_prompt", "logprobs": "logprobs" if request.logprobs is not None else None}
        needs(request, {name: feature for name, feature in asked.items() if feature is not None})
        prompts = _prompts(request.prompt)
        if not prompts or not all(prompts):
            raise APIError(400, "prompt is empty")
        n = _count(request.n)
        if request.stream and (request.echo or request.logprobs is not None or n > 1 or len(prompts) > 1):
            raise APIError(400, "stream with echo, logprobs, n > 1 or several prompts is unsupported")
        # OpenAI's default of 16 tokens; 0 with echo scores the prompt alone.
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        if max_tokens == 0 and not request.echo:
            raise APIError(400, "max_tokens 0 asks for nothing: it is for echo=true (scoring the prompt)")
        settings = _settings(
            request.temperature, request.top_p, request.seed, request.stop, limits, max_tokens or 1, "max_tokens"
        )
        local: Any = backend  # the features checked above are the local backend's methods
        ids = [p if isinstance(p, list) else local.encode(p) for p in prompts]
        for p in ids:
            too_long = too_long_prompt(len(p), max_tokens)
            if too_long is not None:
                raise APIError(400, f"{too_long}; shorten the prompt", code="context_length_exceeded")
        decoding = Decoding(logprobs=request.logprobs)
        id = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            return stream_completion(http, caller, id, request.model, ids[0], settings, adapter)

        async def one(prompt: list[int], i: int) -> dict[str, Any]:
            prompt_text = "".join(local.token_text(t) for t in prompt) if request.echo else ""
            tokens, generation = [], Generation("", finish_reason="length")
            if request.echo and request.logprobs is not None:
                tokens, greedy_next = await local.prompt_token_logprobs(prompt, request.logprobs, adapter)
                if max_tokens == 1 and settings.greedy and not settings.stop:
                    generation = greedy_next  # the scoring forward gave it: no second pass over the prompt
            if max_tokens and not generation.logprobs:
                generation = await backend.complete(prompt, _nth(settings, i), adapter, decoding)
            tokens += generation.logprobs or []
            choice: dict[str, Any] = {"index": 0, "text": prompt_text + generation.text, "logprobs": None}
            if request.logprobs is not None:
                choice["logprobs"] = responses.legacy_logprobs(tokens, 0 if request.echo else len(prompt_text))
            choice["finish_reason"] = generation.finish_reason
            choice["usage"] = (len(prompt), generation.usage.completion_tokens)
            return choice

        with slot(caller):
            choices = await guarded(http, lambda _: asyncio.gather(*(one(p, j) for p in ids for j in range(n))))
        for index, choice in enumerate(choices):
            choice["index"] = index
        spent = [choice.pop("usage") for choice in choices]
        return {
            "id": id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": responses.usage(sum(len(p) for p in ids), sum(c for _, c in spent)),
        }

    def too_long_prompt(prompt_tokens: int, reply_tokens: int) -> str | None:
        context = backend.context_length
        return None if context is None else too_long(prompt_tokens, reply_tokens, context, backend.model_id)

    def stream_completion(
        http: Request,
        caller: Caller,
        id: str,
        model: str,
        prompt: list[int],
        settings: GenerationSettings,
        adapter: str | None,
    ) -> StreamingResponse:
        take(caller)
        head = {"id": id, "object": "text_completion", "created": int(time.time()), "model": model}

        def chunk(text: str, finish: str | None = None) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return responses.event(head | {"choices": [choice]})

        async def events() -> AsyncIterator[str]:
            with on_behalf_of(caller):  # entered and left in this generator's own context
                pieces: asyncio.Queue[str] = asyncio.Queue()
                sent = ""
                work = asyncio.ensure_future(
                    guarded(http, lambda _: backend.complete(prompt, settings, adapter, Decoding(), pieces.put_nowait))
                )
                async for piece in grown_text(work, pieces):
                    yield chunk(piece)
                    sent += piece
                try:
                    generation = work.result()
                except (APIError, RedpenError) as error:
                    yield responses.event({"error": {"message": str(error), "type": "server_error", "code": None}})
                    return
                rest = generation.text[len(sent) :] if generation.text.startswith(sent) else ""
                yield chunk(rest, generation.finish_reason)
                yield responses.DONE

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release, caller))

    async def score_prompt(http: Request, request: CompletionRequest, caller: Caller, adapter: str | None) -> Any:
        """Prompt scoring over a backend that scores prompts but cannot continue raw text (an upstream server
        reached through the openai backend): only the echoed prompt's tokens, with their log-probs."""
        if not (request.echo and request.logprobs is not None) or not isinstance(request.prompt, str):
            raise APIError(
                400,
                f"the {backend.kind} backend answers /v1/completions only to score one text prompt (echo=true, "
                "logprobs=N); use /v1/chat/completions to generate",
            )
        needs(request, {})
        if not request.prompt:
            raise APIError(400, "the prompt is empty")
        scorer: Any = backend
        with slot(caller):
            tokens = await guarded(http, lambda _: scorer.prompt_logprobs(request.prompt, adapter))
        logprobs = responses.legacy_logprobs([TokenLogprob(t, lp) for t, lp, _ in tokens], 0)
        logprobs["text_offset"] = [offset for _, _, offset in tokens]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "text": request.prompt, "logprobs": logprobs, "finish_reason": "length"}],
            "usage": responses.usage(len(tokens), 0),
        }

    return BodyLimit(app, limits.max_body_bytes)


async def _disconnected(request: Request) -> None:
    """Return when the client has gone: the body is read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _count(n: int | None) -> int:
    """Choices asked for (``n``): 1 to 16, a bound that keeps one request from filling the batch."""
    if n is not None and not 1 <= n <= 16:
        raise APIError(400, f"n must be between 1 and 16, got {n}")
    return n or 1


def _nth(settings: GenerationSettings, i: int) -> GenerationSettings:
    """The settings of choice ``i`` of n: a seeded request's choices differ from one another, and repeat."""
    return settings if i == 0 or settings.seed is None else dataclasses.replace(settings, seed=settings.seed + i)


def _response_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` holds the reply to; None for free text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise APIError(400, "response_format.json_schema is missing for type json_schema")
    schema = fmt.json_schema.schema_ or {"type": "object"}
    return closed_schema(schema) if fmt.json_schema.strict else schema


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Each prompt of a completions request: a text, or a list of token ids."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [prompt]  # type: ignore[list-item]  # one text, or one list of ids
    return list(prompt)  # type: ignore[arg-type]  # several texts or several lists of ids


def _settings(
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
    limits: ServeLimits,
    max_tokens: int | None,
    name: str,
) -> GenerationSettings:
    """Sampling settings, checked against OpenAI's ranges and the server's reply cap."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"{name} must be >= 1, got {max_tokens}")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"{name} {max_tokens} is over this server's cap of {limits.max_tokens} (--max-tokens)")
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {seed}")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > 4:
        raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}")
    return GenerationSettings(
        max_new_tokens=max_tokens or limits.default_max_tokens,
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        stop=tuple(stops),
    )


def _one_chunk(body: dict[str, Any]) -> StreamingResponse:
    """A finished completion as server-sent events, the text in one chunk: memory-guided replies are examined
    whole (retrieval, guidance, answer) before any of their text exists."""
    choice = body["choices"][0]
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    delta = {"role": "assistant", "content": choice["message"]["content"]}
    content = {"index": 0, "delta": delta, "finish_reason": None}
    last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    tail = {k: body[k] for k in ("usage", "redpen") if k in body}
    events = [head | {"choices": [content]}, head | {"choices": [last]} | tail]

    async def chunks() -> AsyncIterator[str]:
        for event in events:
            yield responses.event(event)
        yield responses.DONE

    return StreamingResponse(chunks(), media_type="text/event-stream")


def _ack(feedback: Feedback, *, duplicate: bool) -> dict[str, Any]:
    return {
        "object": "feedback",
        "completion_id": feedback.completion_id,
        "correct": feedback.correct,
        "recorded": feedback.mistake_id is not None,
        "mistake_id": feedback.mistake_id,
        "duplicate": duplicate,
    }


def _error_response(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "code": code}})


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


async def grown_text(work: asyncio.Future[Any], pieces: asyncio.Queue[str]) -> AsyncIterator[str]:
    """What a streamed reply's text gained since the last piece, while ``work`` runs; ``pieces`` receives the
    whole text so far each time it grows (only the latest of those waiting counts)."""
    sent = ""
    while not work.done():
        waiter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            continue
        text = waiter.result()
        while not pieces.empty():
            text = pieces.get_nowait()
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent) :]
            sent = text

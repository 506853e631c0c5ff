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
import json
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.gathering import MemoryWriter
from agents.serving import answer_chat, chat_example, learn_from_correction, question_of
from agents.team import Roles
from memory.store import MistakeMemory, TenantMemory
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD
from runtime.errors import ConfigError, ContextLengthError, Overloaded, RedpenError
from runtime.models import scheduling
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, overflow
from runtime.server.keys import KeyRing, key_hash
from runtime.server.ledger import Completion, Feedback, Ledger
from runtime.server.limits import BodyLimit, ServeLimits

log = logging.getLogger(__name__)

T = TypeVar("T")

# The roles a request may use, as the backends take them; "developer" is OpenAI's newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
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


class ChatMessageIn(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = None


class FeedbackRequest(BaseModel):
    """``correct: true``, or the right answer as ``gold`` (and an optional ``note`` for the study assistant)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=200)
    correct: bool | None = None
    gold: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


class APIError(Exception):
    """An error answered with OpenAI's body shape, so OpenAI clients raise their usual exception types."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


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

    @contextlib.contextmanager
    def slot(caller: Caller) -> Iterator[None]:
        """Hold one of the caller's in-flight places for the block; 429 when its key has none left. Model work
        started in the block is the key's (its fair share of a local model) and due within the request timeout."""
        if in_flight.get(caller.key_id, 0) >= limits.in_flight_per_key:
            raise APIError(
                429,
                f"this key has {limits.in_flight_per_key} requests in flight already (--in-flight-per-key); "
                "wait for one to finish",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
        in_flight[caller.key_id] = in_flight.get(caller.key_id, 0) + 1
        try:
            with scheduling.on_behalf_of(caller.key_id, time.monotonic() + limits.request_timeout_s):
                yield
        finally:
            in_flight[caller.key_id] -= 1

    @app.get("/health")
    async def health() -> dict[str, str]:
        # No key: what orchestrators and redpen's managed servers poll. The port listens only once the model is
        # loaded, so an answer means ready (vLLM's and llama.cpp's /health mean the same); it tells nothing else.
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(caller: Authorized) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "redpen"} for name in served],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request, request: ChatRequest, caller: Authorized) -> Any:
        adapter = adapter_for(request.model)
        if request.n != 1:
            raise APIError(400, "redpen's server answers with one choice (n=1)")
        messages = _messages(request)
        settings = _settings(request, limits)
        reserve = limits.guidance_tokens if guided is not None else 0
        too_long = overflow(backend, messages, settings.max_new_tokens + reserve)
        if too_long is not None:
            room = f" and {reserve} tokens of guidance" if reserve else ""
            raise APIError(400, f"{too_long}{room}; shorten the messages", code="context_length_exceeded")
        id = f"chatcmpl-{uuid.uuid4().hex}"
        with slot(caller):
            if guided is None:
                generation = await guarded(http, lambda _: backend.generate(messages, settings, adapter))
                text, usage, finish, extension = generation.text, _usage(generation), generation.finish_reason, None
            else:
                text, usage, finish, extension = await examine(http, id, caller, messages, settings, adapter)
        body = _completion(id, request.model, text, finish, usage, extension)
        return _stream(body) if request.stream else body

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
        memory = TenantMemory(guided.memory, caller.tenant)
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
    async def completions(http: Request, request: CompletionRequest, caller: Authorized) -> dict[str, Any]:
        adapter = adapter_for(request.model)
        if not (request.echo and request.logprobs is not None):
            raise APIError(
                400,
                "redpen's server answers /v1/completions only to score a prompt (echo=true, logprobs=N); "
                "use /v1/chat/completions to generate",
            )
        if not isinstance(backend, PromptScorer):
            raise APIError(400, f"the {backend.kind} backend cannot score prompts; use /v1/chat/completions")
        if not request.prompt:
            raise APIError(400, "the prompt is empty")
        scorer = backend
        with slot(caller):
            tokens = await guarded(http, lambda _: scorer.prompt_logprobs(request.prompt, adapter))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    # Only the echoed prompt: the backend interface cannot continue raw text, and scoring
                    # clients read the prompt's tokens only.
                    "text": request.prompt,
                    "logprobs": {
                        "tokens": [token for token, _, _ in tokens],
                        "token_logprobs": [logprob for _, logprob, _ in tokens],
                        "text_offset": [offset for _, _, offset in tokens],
                        "top_logprobs": None,
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
        }

    return BodyLimit(app, limits.max_body_bytes)


async def _disconnected(request: Request) -> None:
    """Return when the client has gone: the body is read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _messages(request: ChatRequest) -> list[Message]:
    """The request's messages as the backend takes them; 400 for what no model can answer."""
    if not request.messages:
        raise APIError(400, "messages is empty: send at least one user message")
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}")
        messages.append(Message(role=ROLES[m.role], content=_text(m.content)))
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise APIError(400, "no user message has any text: there is nothing to answer")
    return messages


def _settings(request: ChatRequest, limits: ServeLimits) -> GenerationSettings:
    """Sampling settings, checked against OpenAI's ranges and the server's reply cap."""
    max_tokens = request.max_completion_tokens or request.max_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise APIError(400, f"{name} must be >= 1, got {value}")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {limits.max_tokens} (--max-tokens)")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {request.temperature}")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {request.top_p}")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {request.seed}")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    return GenerationSettings(
        max_new_tokens=max_tokens or limits.default_max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=tuple(stop),
    )


def _completion(
    id: str, model: str, text: str, finish: str, usage: dict[str, int], extension: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage,
    }
    if extension is not None:
        # The extension field: OpenAI clients keep unknown fields (completion.model_extra["redpen"]).
        body["redpen"] = extension
    return body


def _stream(body: dict[str, Any]) -> StreamingResponse:
    """A finished completion as server-sent events: the backends do not stream, so the text comes in one chunk."""
    choice = body["choices"][0]
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    delta = {"role": "assistant", "content": choice["message"]["content"]}
    content = {"index": 0, "delta": delta, "finish_reason": None}
    last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    tail = {k: body[k] for k in ("usage", "redpen") if k in body}
    events = [head | {"choices": [content]}, head | {"choices": [last]} | tail]

    async def chunks() -> AsyncIterator[str]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

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


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text; OpenAI clients may send it as a list of typed parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" for part in content):
        raise APIError(400, "redpen's server takes text message parts only")
    return "".join(str(part.get("text", "")) for part in content)


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.usage.prompt_tokens, generation.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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

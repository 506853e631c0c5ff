"""``POST /v1/chat/completions``: a chat answered by the backend, or (memory-guided) as a SALAM examination of the
caller's tenant; whole, or streamed as server-sent chunks while the reply is decoded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from agents.serving import answer_chat, chat_example, question_of
from memory.store import TenantMemory
from runtime.errors import RedpenError
from runtime.models.backend import (
    Backend,
    Decoding,
    Generation,
    GenerationSettings,
    Message,
    Prompt,
    overflow,
)
from runtime.server import responses
from runtime.server.chat import closed_schema, forced_call_schema, render, tool_calls
from runtime.server.errors import APIError
from runtime.server.keys import Authorized, Caller
from runtime.server.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    Guidance,
    Retrieved,
    ToolCallDelta,
    Usage,
)
from runtime.server.schema import ChatRequest, Tool, choice_count, nth, sampling
from runtime.server.state import Guided, Served, Server
from runtime.server.transcripts import Completion

log = logging.getLogger(__name__)

router = APIRouter()


@dataclasses.dataclass(frozen=True)
class Chat:
    """A chat request as checked and rendered for the backend."""

    id: str
    model: str
    messages: list[Message]
    settings: GenerationSettings
    adapter: str | None
    decoding: Decoding
    tools: list[Tool]
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class Examined:
    """A memory-guided reply: its text, why it ended, its tokens, and what guided it."""

    text: str
    finish_reason: str
    usage: Usage
    guidance: Guidance


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    http: Request, request: ChatRequest, server: Server, caller: Authorized
) -> ChatCompletion | StreamingResponse:
    backend, guided, limits = server.backend, server.guided, server.limits
    adapter = server.adapter_for(request.model)
    n = choice_count(request.n)
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
    server.needs(request, {name: feature for name, feature in asked.items() if feature is not None})
    if guided is not None:
        plain = {"n": n > 1, "tools": bool(tools), "response_format": schema is not None, "logprobs": request.logprobs}
        extra = [name for name, set_ in plain.items() if set_]
        if extra:
            raise APIError(400, f"memory-guided serving answers plain chats: {', '.join(extra)} unsupported")
    if request.stream and (n > 1 or request.logprobs):
        raise APIError(400, "stream with n > 1 or logprobs is unsupported: ask without stream")
    messages = render(request.messages, tools)
    settings = sampling(request, limits, request.max_completion_tokens or request.max_tokens)
    reserve = limits.guidance_tokens if guided is not None else 0
    too_long = overflow(backend, messages, settings.max_new_tokens + reserve)
    if too_long is not None:
        room = f" and {reserve} tokens of guidance" if reserve else ""
        raise APIError(400, f"{too_long}{room}; shorten the messages", code="context_length_exceeded")
    if request.user or request.safety_identifier:
        log.info("chat for end user %s", request.safety_identifier or request.user)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    chat = Chat(
        f"chatcmpl-{uuid.uuid4().hex}", request.model, messages, settings, adapter, decoding, tools, include_usage
    )
    if request.stream:
        return _stream(http, server, caller, chat)
    with server.slot(caller):
        if guided is not None:
            examined = await _examine(http, server, guided, caller, chat)
            choice = responses.chat_choice(0, Generation(examined.text, finish_reason=examined.finish_reason))
            return ChatCompletion(
                id=chat.id, model=chat.model, choices=[choice], usage=examined.usage, redpen=examined.guidance
            )
        generations = await server.guarded(
            http,
            lambda _: asyncio.gather(
                *(backend.complete(messages, nth(settings, i), adapter, decoding) for i in range(n))
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
    usage = responses.usage(generations[0].usage.prompt_tokens, sum(g.usage.completion_tokens for g in generations))
    return ChatCompletion(id=chat.id, model=chat.model, choices=choices, usage=usage)


def _stream(http: Request, server: Served, caller: Caller, chat: Chat) -> StreamingResponse:
    """Server-sent chunks of one reply, a chunk for each piece of text as the student decodes it (memory-guided:
    once retrieval and the assistant's guidance are done, the student's reply as it is decoded). A reply that may
    call tools is sent once whole: until it ends nobody knows whether it is text or a call."""
    server.take(caller)  # now: a 429 must come before the 200 of a stream; released once the stream is done
    created = int(time.time())
    guided = server.guided

    def chunk(delta: Delta, finish: str | None = None, **tail: Any) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return responses.event(
            ChatCompletionChunk(id=chat.id, created=created, model=chat.model, choices=[choice], **tail)
        )

    async def events() -> AsyncIterator[str]:
        with server.on_behalf_of(caller):  # entered and left in this generator's own context
            pieces: asyncio.Queue[str] = asyncio.Queue()
            sent = ""

            def grew(text: str) -> None:
                if not chat.tools:
                    pieces.put_nowait(text)

            yield chunk(Delta(role="assistant", content=""))
            work: asyncio.Future[Any]
            if guided is None:
                work = asyncio.ensure_future(
                    server.guarded(
                        http,
                        lambda _: server.backend.complete(
                            chat.messages, chat.settings, chat.adapter, chat.decoding, grew
                        ),
                    )
                )
            else:
                work = asyncio.ensure_future(_examine(http, server, guided, caller, chat, grew))
            async for piece in responses.grown_text(work, pieces):
                yield chunk(Delta(content=piece))
                sent += piece
            try:
                reply: Generation | Examined = work.result()
            except APIError as error:
                yield responses.event(responses.error_body(error.message, error.type, error.code))
                return
            except RedpenError as error:
                yield responses.event(responses.error_body(str(error), "server_error", None))
                return
            text = reply.text
            calls = tool_calls(text, chat.tools, forced=chat.decoding.json_schema is not None) if chat.tools else []
            if calls:
                deltas = [ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls)]
                yield chunk(Delta(tool_calls=deltas))
            elif text.startswith(sent):
                if len(text) > len(sent):
                    yield chunk(Delta(content=text[len(sent) :]))
            else:  # the stripped whole disagrees with the pieces (cannot happen; say so rather than garble)
                log.warning("streamed text is not a prefix of the reply")
            finish = "tool_calls" if calls else reply.finish_reason
            if isinstance(reply, Examined):  # as before the stream was token by token: usage and guidance last
                yield chunk(Delta(), finish, usage=reply.usage, redpen=reply.guidance)
            else:
                yield chunk(Delta(), finish)
                if chat.include_usage:
                    usage = responses.usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
                    yield responses.event(
                        ChatCompletionChunk(id=chat.id, created=created, model=chat.model, choices=[], usage=usage)
                    )
            yield responses.DONE

    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(server.release, caller)
    )


async def _examine(
    http: Request,
    server: Served,
    guided: Guided,
    caller: Caller,
    chat: Chat,
    on_text: Callable[[str], None] | None = None,
) -> Examined:
    """The chat as a SALAM examination of the caller's tenant, committed to the ledger before it is answered;
    ``on_text`` receives the student's reply so far each time it grows."""
    student: Backend = guided.roles.student if on_text is None else _Teeing(guided.roles.student, on_text)
    roles = dataclasses.replace(
        guided.roles, student=student, student_settings=chat.settings, student_adapter=chat.adapter
    )
    question = question_of(chat.messages)
    example = chat_example(chat.id, question, chat.messages)
    memory = TenantMemory(guided.memory, caller.tenant, shared=guided.shared)
    result = await server.guarded(
        http,
        lambda token: answer_chat(
            example, roles, memory, k=guided.k, threshold=guided.threshold, cancellation_token=token
        ),
    )
    # Committed before the answer is sent: feedback on it may come after a restart.
    completion = Completion(chat.id, caller.tenant, roles.student_id, question, result.reply)
    await asyncio.to_thread(guided.ledger.add_completion, completion)
    return Examined(
        text=result.reply,
        finish_reason=result.finish_reason or "stop",
        usage=responses.usage(result.prompt_tokens, result.completion_tokens),
        guidance=Guidance(
            retrieved=[Retrieved(id=r.id, score=r.score) for r in result.retrieved or []],
            guidance=result.guidance or "",
        ),
    )


class _Teeing(Backend):
    """The student's backend, its replies also handed, as they grow, to ``on_text``: what lets a memory-guided
    reply stream token by token through the examination, which asks the backend for whole replies."""

    def __init__(self, inner: Backend, on_text: Callable[[str], None]) -> None:
        self.inner, self.on_text = inner, on_text
        self.kind, self.model_id, self.features = inner.kind, inner.model_id, inner.features

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        return await self.inner.complete(messages, settings, adapter, Decoding(), self.on_text)

    async def complete(
        self,
        prompt: Prompt,
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        return await self.inner.complete(prompt, settings, adapter, decoding, on_text or self.on_text)

    @property
    def context_length(self) -> int | None:
        return self.inner.context_length

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        return self.inner.prompt_tokens(messages)


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

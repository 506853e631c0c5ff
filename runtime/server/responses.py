"""OpenAI's response bodies and stream chunks as typed models, built from the backend's generations.

A field OpenAI leaves out when it has nothing to say (a message's ``tool_calls``, a chunk's ``usage``) is listed in
its model's ``omitted_when_none`` and left out when None; every other field is always written, null included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from runtime.models.backend import Generation, TokenLogprob


class Body(BaseModel):
    """A response body or a part of one."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self.omitted_when_none)}


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ErrorDetail(Body):
    message: str
    type: str
    code: str | None = None


class ErrorBody(Body):
    """OpenAI's error shape, so OpenAI clients raise their usual exception types."""

    error: ErrorDetail


def error_body(message: str, type_: str, code: str | None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=type_, code=code))


# -- models ------------------------------------------------------------------------------------------------------------


class ModelCard(Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "redpen"


class ModelList(Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- chat --------------------------------------------------------------------------------------------------------------


class FunctionCallOut(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(Body):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Body):
    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Body):
    content: list[ChatTokenLogprob]
    refusal: None = None


class AssistantMessage(Body):
    omitted_when_none = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Body):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class Retrieved(Body):
    id: str
    score: float


class Guidance(Body):
    """redpen's extension of a memory-guided reply: the mistakes retrieved and the guidance they gave.
    OpenAI clients keep unknown fields (``completion.model_extra["redpen"]``)."""

    retrieved: list[Retrieved]
    guidance: str


class ChatCompletion(Body):
    omitted_when_none = frozenset({"redpen"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    redpen: Guidance | None = None


def chat_choice(
    index: int, generation: Generation, calls: Sequence[ToolCallOut] = (), *, logprobs: bool = False
) -> ChatChoice:
    """One choice of a chat completion; a reply that calls tools has no content and ends in "tool_calls"."""
    return ChatChoice(
        index=index,
        message=AssistantMessage(content=None if calls else generation.text, tool_calls=list(calls) or None),
        finish_reason="tool_calls" if calls else generation.finish_reason,
        logprobs=ChoiceLogprobs(content=chat_logprobs(generation.logprobs or ())) if logprobs else None,
    )


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
    """Chat's per-token log-probs: each token with its bytes and its most likely alternatives."""
    return [
        ChatTokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=list(s.encode())) for s, lp in t.top],
        )
        for t in tokens
    ]


class ToolCallDelta(ToolCallOut):
    index: int


class Delta(Body):
    omitted_when_none = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Body):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(Body):
    omitted_when_none = frozenset({"usage", "redpen"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    redpen: Guidance | None = None


# -- completions -------------------------------------------------------------------------------------------------------


class LegacyLogprobs(Body):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def legacy_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> LegacyLogprobs:
    """The legacy completions API's log-probs: parallel lists, character offsets from ``offset`` on, and for each
    token a dict of the most likely tokens that also holds the token itself (vLLM's shape; a prompt's first token,
    which nothing precedes, has None in both lists).

    >>> legacy_logprobs([TokenLogprob("a", None), TokenLogprob("b", -0.5, (("c", -0.3),))], 0).top_logprobs
    [None, {'c': -0.3, 'b': -0.5}]
    """
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return LegacyLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[None if t.logprob is None else dict(t.top) | {t.token: t.logprob} for t in tokens],
        text_offset=offsets,
    )


class TextChoice(Body):
    index: int = 0
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class TextCompletion(Body):
    """A completions response, or (without usage) one chunk of a streamed one."""

    omitted_when_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


# -- feedback ----------------------------------------------------------------------------------------------------------


class FeedbackAck(Body):
    object: Literal["feedback"] = "feedback"
    completion_id: str
    correct: bool
    recorded: bool  # a mistake went into the tenant's memory
    mistake_id: str | None
    duplicate: bool  # this completion's feedback was given before; the first one stands


# -- server-sent events ------------------------------------------------------------------------------------------------


def event(body: Body) -> str:
    """One server-sent event (its JSON spaced as ``json.dumps`` writes it, as the stream always was)."""
    return f"data: {json.dumps(body.model_dump(mode='json'))}\n\n"


DONE = "data: [DONE]\n\n"


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

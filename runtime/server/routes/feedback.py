"""``POST /v1/feedback`` (memory-guided servers): a served answer marked right, or corrected with the right answer,
which the study assistant turns into a mistake in the caller's tenant's memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from autogen_core import CancellationToken
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from agents.gathering import MemoryWriter
from agents.serving import chat_example, learn_from_correction
from memory.store import TenantMemory
from runtime.server.errors import APIError
from runtime.server.keys import Authorized, Caller
from runtime.server.responses import FeedbackAck
from runtime.server.state import Guided, Served, Server
from runtime.server.transcripts import Completion, Feedback

router = APIRouter()


class FeedbackRequest(BaseModel):
    """``correct: true``, or the right answer as ``gold`` (and an optional ``note`` for the study assistant)."""

    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=200)
    correct: bool | None = None
    gold: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


@dataclass
class Corrections:
    """What feedback shares across requests of one app: a lock per completion being corrected, and a memory
    writer per tenant."""

    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)  # requests holding or awaiting a completion's lock
    writers: dict[str, MemoryWriter] = field(default_factory=dict)


def corrections(request: Request) -> Corrections:
    kept: Corrections = request.app.state.corrections
    return kept


@router.post("/v1/feedback")
async def feedback(
    http: Request,
    request: FeedbackRequest,
    server: Server,
    caller: Authorized,
    book: Annotated[Corrections, Depends(corrections)],
) -> FeedbackAck:
    if server.guided is None:
        raise APIError(404, "this server keeps no memory: feedback needs `redpen serve --memory`", code="not_found")
    with server.slot(caller):  # a correction runs the study assistant: it counts against the key like a chat
        return await _record(http, server, server.guided, book, request, caller)


async def _record(
    http: Request, server: Served, guided: Guided, book: Corrections, request: FeedbackRequest, caller: Caller
) -> FeedbackAck:
    gold = (request.gold or "").strip()
    if not (request.correct is True and not gold) and not (gold and request.correct is not True):
        raise APIError(400, "give either correct: true, or the right answer as gold (with an optional note)")
    ledger = guided.ledger
    completion = await asyncio.to_thread(ledger.completion, request.completion_id, caller.tenant)
    if completion is None:  # another tenant's completion reads as absent, so its ids reveal nothing
        raise APIError(404, f"no completion {request.completion_id!r} was served to this key's tenant")
    lock = book.locks.setdefault(completion.id, asyncio.Lock())
    book.users[completion.id] = book.users.get(completion.id, 0) + 1
    try:
        async with lock:  # the same completion twice at once: the second waits, then finds the first
            stored = await asyncio.to_thread(ledger.feedback, completion.id)
            if stored is not None:
                return _ack(stored, duplicate=True)
            mistake_id = None
            if gold:
                note = request.note or ""
                mistake_id = await server.guarded(
                    http, lambda token: _learn(guided, book, completion, gold, note, token)
                )
            entry = Feedback(completion.id, caller.tenant, not gold, gold or None, request.note, mistake_id)
            return _ack(await asyncio.to_thread(ledger.add_feedback, entry), duplicate=False)
    finally:
        # Dropped only when no request awaits it: a woken waiter has not re-acquired yet when the holder
        # releases, and a third request must not get a fresh lock and run beside it.
        book.users[completion.id] -= 1
        if not book.users[completion.id]:
            del book.users[completion.id], book.locks[completion.id]


async def _learn(
    guided: Guided, book: Corrections, completion: Completion, gold: str, note: str, token: CancellationToken
) -> str | None:
    """The mistake of a corrected answer, in the tenant's memory and on disk; its id, or None if it was right."""
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
    writer = book.writers.get(completion.tenant)
    if writer is None:
        writer = book.writers[completion.tenant] = MemoryWriter(TenantMemory(guided.memory, completion.tenant), True)
    await writer.write(record)
    return record.id


def _ack(feedback: Feedback, *, duplicate: bool) -> FeedbackAck:
    return FeedbackAck(
        completion_id=feedback.completion_id,
        correct=feedback.correct,
        recorded=feedback.mistake_id is not None,
        mistake_id=feedback.mistake_id,
        duplicate=duplicate,
    )

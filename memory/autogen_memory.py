"""The mistake memory as an ``autogen_core.memory.Memory``, so any AutoGen agent can recall past mistakes.

Whatever this adapter hands to an agent leaves out the gold answer: a small student copies answer letters from
whatever it is shown, so it sees the past question, its wrong answer, the reason and the guideline, never the gold.
"""

import asyncio
import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

from autogen_core import CancellationToken
from autogen_core.memory import Memory, MemoryContent, MemoryMimeType, MemoryQueryResult, UpdateContextResult
from autogen_core.model_context import ChatCompletionContext
from autogen_core.models import SystemMessage, UserMessage

from memory.record import MistakeRecord, make_record
from memory.store import Hit, MistakeMemory, RecordFilter
from runtime.defaults import RETRIEVAL_K
from runtime.models.torch_thread import run_torch

_MAX_QUERY, _MAX_ANSWER = 400, 120  # characters shown of a past question and answer: enough to recognise them


@cache
def _template(name: str) -> str:
    return (files("memory") / "prompts" / f"{name}.txt").read_text(encoding="utf-8").rstrip("\n")


def format_mistakes(hits: Sequence[Hit]) -> str:
    """Retrieved mistakes, numbered, as a model reads them: question, wrong answer, reason, guideline; never the gold.

    The one rendering of past mistakes: the SALAM examining assistant and its student see it, and so does any
    AutoGen agent given a ``MistakeMemoryAdapter``. Long questions and answers are clipped, to keep prefill cheap.
    """
    return "\n".join(
        _template("past_mistake").format(
            n=i,
            query=_clip(h.record.query, _MAX_QUERY),
            wrong_answer=_clip(h.record.wrong_answer, _MAX_ANSWER),
            reason=h.record.reason or "-",
            guideline=h.record.guideline,
        )
        for i, h in enumerate(hits, 1)
    )


def mistakes_message(hits: Sequence[Hit]) -> str:
    """The system message ``update_context`` adds: what the list is and how to use it, then the list."""
    return _template("past_mistakes_header") + "\n\n" + format_mistakes(hits)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_content(hit: Hit) -> MemoryContent:
    return MemoryContent(
        content=hit.record.model_dump(mode="json", exclude={"gold"}),
        mime_type=MemoryMimeType.JSON,
        metadata={"id": hit.record.id, "score": hit.score},
    )


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the string parts of a multimodal list."""
    if isinstance(content, str):
        return content
    return "\n".join(part for part in content if isinstance(part, str))


class MistakeMemoryAdapter(Memory):
    """Retrieval from a ``MistakeMemory`` for AutoGen agents, scoped by model and source at construction.

    The adapter does not own the store: ``close()`` leaves it open, because one store is usually shared by several
    agents; close the ``MistakeMemory`` where it was opened.
    """

    def __init__(
        self,
        store: MistakeMemory,
        *,
        model_id: str | None = None,
        source: str | None = None,
        k: int = RETRIEVAL_K,
        threshold: float | None = None,
        name: str = "mistake_memory",
    ) -> None:
        # threshold None keeps the k nearest however far they are: an agent outside SALAM decides for itself.
        self.store = store
        self.model_id = model_id
        self.source = source
        self.scope = RecordFilter(model_id=model_id, source=source)
        self.k = k
        self.threshold = threshold
        self.name = name

    def _search(self, text: str) -> list[Hit]:
        return self.store.search(text, k=self.k, threshold=self.threshold, where=self.scope)

    async def update_context(self, model_context: ChatCompletionContext) -> UpdateContextResult:
        """Search with the latest user message and, if anything matches, add the mistakes as a system message."""
        messages = await model_context.get_messages()
        question = next((_text_of(m.content) for m in reversed(messages) if isinstance(m, UserMessage)), "")
        if not question.strip():
            return UpdateContextResult(memories=MemoryQueryResult(results=[]))
        # Embedding and search block for milliseconds to tens of ms; keep them off the event loop.
        hits = await run_torch(self._search, question)
        if hits:
            await model_context.add_message(SystemMessage(content=mistakes_message(hits)))
        return UpdateContextResult(memories=MemoryQueryResult(results=[_as_content(h) for h in hits]))

    async def query(
        self,
        query: str | MemoryContent,
        cancellation_token: CancellationToken | None = None,
        **kwargs: Any,
    ) -> MemoryQueryResult:
        """The nearest past mistakes to ``query`` (text, or a MemoryContent holding text or a record's fields).

        Each result's content is the record without ``gold``; metadata holds its ``id`` and ``score``.
        """
        if isinstance(query, MemoryContent):
            query = query.content["query"] if isinstance(query.content, dict) else str(query.content)
        hits = await run_torch(self._search, query)
        return MemoryQueryResult(results=[_as_content(h) for h in hits])

    async def add(self, content: MemoryContent, cancellation_token: CancellationToken | None = None) -> None:
        """Store one mistake: ``content.content`` is a MistakeRecord's fields, as a dict or JSON text.

        Without an ``id`` the id is computed from model_id, source, task, query and gold, as ``make_record`` does.
        """
        fields = json.loads(content.content) if isinstance(content.content, str | bytes) else content.content
        if not isinstance(fields, dict):
            raise ValueError(f"a mistake must be a dict of MistakeRecord fields, not {type(fields).__name__}")
        record = MistakeRecord.model_validate(fields) if "id" in fields else make_record(**fields)
        await run_torch(self.store.upsert, [record])

    async def clear(self) -> None:
        """Delete the mistakes in this adapter's scope (its model_id/source), or all of them if it has none."""
        if self.model_id is None and self.source is None:
            await asyncio.to_thread(self.store.clear)
        else:
            await asyncio.to_thread(self.store.delete, where=self.scope)

    async def close(self) -> None:
        """Nothing to release: the store belongs to whoever opened it."""

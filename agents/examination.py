"""Examination: answer without the gold, as a baseline or assisted by retrieved mistakes; and its controls.

- baseline: student -> examiner.
- assisted: assistant (with the retrieved mistakes) -> student -> examiner.
- retrieval-only (a control, no model): the majority gold answer of the retrieved mistakes. When it matches
  the assisted score, the gain came from near-duplicate questions in memory, not from guidance.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import BaseChatMessage
from autogen_core import CancellationToken

from agents.roles import (
    ASSISTANT,
    STUDENT,
    ExaminerAgent,
    ExaminingAssistant,
    Grade,
    RoleAgent,
    StudentAgent,
    contents,
    run_team,
)
from agents.team import Roles, usage_of
from memory.store import Hit, MistakeMemory, RecordFilter
from runtime.data.kinds import grade
from runtime.data.records import ItemResult, Retrieved
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.models.torch_thread import run_torch

Mode = Literal["baseline", "assisted"]


async def exam_item(
    example: Example,
    roles: Roles,
    mode: Mode,
    hits: Sequence[Hit] = (),
    cancellation_token: CancellationToken | None = None,
) -> ItemResult:
    """Examine one example as an AutoGen team; the result has the same fields as ``redpen eval``'s.

    ``cancellation_token`` stops the team and its model calls (a served client that disconnected).
    """
    student, examiner = StudentAgent(example, roles.student_client()), ExaminerAgent(example)
    agents: list[RoleAgent] = [student, examiner]
    if mode == "assisted":
        agents.insert(0, ExaminingAssistant(example, roles.assistant_client(), hits))
    started = time.perf_counter()
    result = await run_team(agents, MaxMessageTermination(1 + len(agents)), example.input, cancellation_token)
    messages = [m for m in result.messages if isinstance(m, BaseChatMessage)]
    [verdict] = contents(messages, Grade)
    return ItemResult(
        id=example.id,
        source=example.source,
        mode=mode,
        verdict=verdict.verdict,
        predicted=verdict.predicted,
        target=example.target,
        n_options=len(example.options),
        reply=next(m.to_text() for m in messages if m.source == STUDENT),
        error=verdict.error,
        guidance=next((m.to_text() for m in messages if m.source == ASSISTANT), ""),
        retrieved=[Retrieved(id=h.record.id, score=round(h.score, 4), source=h.record.source) for h in hits],
        **usage_of(messages),
        latency_s=round(time.perf_counter() - started, 3),
        finish_reason=student.finish_reason,
    )


def retrieve(
    memory: MistakeMemory,
    examples: Sequence[Example],
    model_id: str,
    task: str,
    k: int,
    threshold: float | None,
    skip_absorbed: bool = False,
    queries: Any = None,
) -> dict[str, list[Hit]]:
    """The mistakes each example's assistant sees: this student's, on this task, most similar first.

    ``skip_absorbed`` leaves out mistakes a fine-tuned student has already learned into its weights; ``queries``
    are the examples' queries embedded beforehand (``embed_queries``), else they are embedded here.
    """
    vectors = memory.embedder.embed([e.input for e in examples]) if queries is None else queries
    where = RecordFilter(model_id=model_id, task=task, skip_absorbed=skip_absorbed)
    found = memory.search_vectors(vectors, k=k, threshold=threshold, where=where)
    return {e.id: hits for e, hits in zip(examples, found, strict=True)}


async def embed_queries(memory: MistakeMemory, examples: Sequence[Example]) -> Any:
    """The examples' retrieval queries, embedded on the torch thread. The questions are known before any mistake
    is: started beside gathering, this takes the embedding off the path from the last episode to the exam (4.2 s
    of a 20 s pass of 256 + 256 items against a served model)."""
    if not examples:
        return []
    return await run_torch(memory.embedder.embed, [e.input for e in examples])


async def run_exam(
    examples: Sequence[Example],
    roles: Roles,
    run: RunDir,
    results_file: str,
    *,
    mode: Mode,
    hits: dict[str, list[Hit]] | None = None,
    concurrency: int | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
) -> list[ItemResult]:
    """Examine every example not yet in ``results_file``; return all results of ``examples`` in input order.

    ``concurrency``: items in flight, by default as many as the student's backend serves at once.
    """

    async def one(example: Example) -> ItemResult:
        return await exam_item(example, roles, mode, (hits or {}).get(example.id, []))

    width = concurrency or roles.student.capacity
    return await complete_pending(run, results_file, ItemResult, examples, one, concurrency=width, on_record=on_result)


def retrieval_only(examples: Sequence[Example], hits: dict[str, list[Hit]]) -> list[ItemResult]:
    """The control with no model: answer with the most common gold among the retrieved mistakes.

    Ties go to the most similar mistake's gold; an example with nothing retrieved has no answer.
    """
    results = []
    for example in examples:
        found = hits.get(example.id, [])
        golds = Counter(h.record.gold for h in found)
        answer = max(golds, key=golds.__getitem__) if golds else ""  # Counter keeps similarity order for ties
        result = grade(example, f"The answer is {answer}" if answer else "")
        results.append(
            ItemResult(
                id=example.id,
                source=example.source,
                mode="retrieval_only",
                verdict=result.verdict,
                predicted=result.predicted,
                target=example.target,
                n_options=len(example.options),
                reply=answer,
            )
        )
    return results

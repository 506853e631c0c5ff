"""SALAM for a served chat (``redpen serve --memory``): each request is an examination, each correction a mistake.

A chat request becomes an :class:`Example` whose input is its last user message and whose metadata carries the
client's whole chat: the tenant's most similar past mistakes are retrieved, the study assistant turns them into
guidance, and the student answers the client's own messages with that guidance before the question
(:func:`agents.examination.exam_item`, the same team as ``redpen exam --mode assisted``). When the client later
gives the right answer, the study assistant writes the reason and guideline, as in gathering
(:func:`agents.gathering.mistake_from_feedback`), and the mistake goes into that tenant's memory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from autogen_core import CancellationToken

from agents.examination import exam_item
from agents.gathering import mistake_from_feedback
from agents.student import CHAT
from agents.team import Roles
from memory.record import MistakeRecord
from memory.store import RecordFilter, TenantMemory
from runtime.data.kinds import CHOICE, NUMBER, TEXT, AnswerKind, grade, kind_of, parse_options
from runtime.data.records import ItemResult
from runtime.data.tasks import Example
from runtime.models.backend import Message
from runtime.models.torch_thread import run_torch

# Served mistakes are filed under this task and source, apart from any benchmark's.
TASK = "serve"
SOURCE = "chat"

_LETTER = re.compile(r"^\(?([A-Z])\)?$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def question_of(messages: Sequence[Message]) -> str:
    """What a chat asks: its last user message (the text retrieval embeds and a mistake records)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def chat_example(id: str, question: str, messages: Sequence[Message] = (), gold: str = "") -> Example:
    """A served question as an ``Example``; with ``gold`` (feedback) graded like a benchmark item.

    It is multiple choice when it lists options ("(A) ...") and the gold is a letter, a number when the gold is
    one, else free text.

    >>> ex = chat_example("c1", "Who?\\nOptions:\\n(A) Ann\\n(B) Bo", gold="B")
    >>> ex.answer_kind, ex.target, ex.options
    ('choice', '(B)', ('Ann', 'Bo'))
    >>> chat_example("c2", "2 + 2?", gold="4").answer_kind
    'number'
    """
    options = parse_options(question)
    gold = gold.strip()
    kind: AnswerKind = TEXT
    letter = _LETTER.match(gold)
    if options and (not gold or (letter is not None and ord(letter.group(1)) - ord("A") < len(options))):
        kind, gold = CHOICE, f"({letter.group(1)})" if letter else ""
    elif _NUMBER.match(gold):
        kind = NUMBER
    metadata = {CHAT: list(messages)} if messages else {}
    return Example(id, SOURCE, question, gold, kind.name, kind.options_of(question), metadata, f"completion {id}")


async def answer_chat(
    example: Example,
    roles: Roles,
    memory: TenantMemory,
    *,
    k: int,
    threshold: float | None,
    cancellation_token: CancellationToken | None = None,
) -> ItemResult:
    """Retrieve this tenant's mistakes most like the question, then examine: assistant guidance, student answer.

    With nothing similar in memory the assistant says nothing and the student answers the chat as it is.
    """
    where = RecordFilter(model_id=roles.student_id, task=TASK)
    search = functools.partial(memory.search, k=k, threshold=threshold, where=where)
    hits = await run_torch(search, example.input)
    return await exam_item(example, roles, "assisted", hits, cancellation_token)


async def learn_from_correction(
    example: Example,
    answer: str,
    roles: Roles,
    *,
    model_id: str,
    tenant: str,
    note: str = "",
    cancellation_token: CancellationToken | None = None,
) -> MistakeRecord | None:
    """The mistake record of an answer the client corrected with ``example.target``; None when the grader finds the
    answer was right after all (a multiple-choice letter or a number equal to the gold: nothing to learn).

    Free-text answers are taken as wrong on the client's word: the text grader's exact match would call most right
    chat answers wrong, and the client knows.
    """
    if kind_of(example).closed and grade(example, answer).verdict == "correct":
        return None
    return await mistake_from_feedback(
        example,
        answer,
        roles,
        model_id=model_id,
        task=TASK,
        tenant=tenant,
        note=note,
        cancellation_token=cancellation_token,
    )

"""Gathering: student -> examiner -> assistant rounds until the examiner says CORRECT or the round limit.

Each conversation becomes one episode record, its turns the (state, action, reward) steps the assistant is later
trained on; each first-answer mistake becomes a ``MistakeRecord``. Episodes run concurrently (bounded), so the
local backend batches their requests. Memory is written before the episode is appended: a run killed between the
two redoes that episode, and the deterministic record id makes the second write a no-op.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import BaseChatMessage, TextMessage
from autogen_core import CancellationToken

from agents.feedback import ANSWER_STATEMENT, leak_patterns, scrub
from agents.prompts import gathering_messages, load_prompt
from agents.roles import (
    CORRECT,
    EXAMINER,
    STUDENT,
    WRONG,
    Advice,
    ExaminerAgent,
    GatheringAssistant,
    Grade,
    StudentAgent,
    contents,
    llm_messages,
    run_team,
)
from agents.team import Roles, usage_of
from memory.record import MistakeRecord
from memory.store import MistakeMemory, TenantMemory
from runtime.data.records import Action, Episode, State, Turn
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.defaults import ROUNDS
from runtime.models.backend import Message
from runtime.models.torch_thread import run_torch

EPISODES = "episodes.jsonl"


async def gather_episode(example: Example, roles: Roles, task: str, rounds: int = ROUNDS) -> Episode:
    """Run one gathering conversation as an AutoGen team and return it as an episode record."""
    agents = [
        StudentAgent(example, roles.student_client()),
        ExaminerAgent(example),
        GatheringAssistant(example, roles.assistant_client()),
    ]
    # The task message, then (student, examiner) for every attempt and an assistant turn between attempts.
    termination = TextMentionTermination(CORRECT, sources=[EXAMINER]) | MaxMessageTermination(
        1 + 2 * (rounds + 1) + rounds
    )
    started = time.perf_counter()
    result = await run_team(agents, termination, example.input)
    messages = [m for m in result.messages if isinstance(m, BaseChatMessage)]
    return episode_record(example, roles, task, messages, time.perf_counter() - started)


def episode_record(
    example: Example, roles: Roles, task: str, messages: list[BaseChatMessage], elapsed_s: float
) -> Episode:
    """Turn a gathering conversation into turns of (state, action, reward).

    state = (query, the student's wrong response, the feedback given before it); action = the assistant's feedback;
    reward = 1 if the student's next answer is right.
    """
    answers = [m.to_text() for m in messages if m.source == STUDENT]
    grades = contents(messages, Grade)
    advice = contents(messages, Advice)
    turns = [
        Turn(
            round=i + 1,
            state=State(query=example.input, response=answers[i], context=[a.feedback.guideline for a in advice[:i]]),
            action=Action(
                reason=given.feedback.reason,
                guideline=given.feedback.guideline,
                text=given.text,
                leaked=given.feedback.leaked,
                parsed=given.feedback.parsed,
                stereotyped=given.feedback.stereotyped,
                generic=given.feedback.generic,
                echoed=given.feedback.echoed,
            ),
            reward=int(grades[i + 1].verdict == "correct"),
            next_response=answers[i + 1],
        )
        for i, given in enumerate(advice)
        if i + 1 < len(grades)  # else the run stopped before the student answered this feedback
    ]
    final = grades[-1] if grades else Grade(word=WRONG, verdict="no_answer", predicted=None)
    return Episode(
        id=example.id,
        source=example.source,
        task=task,
        model_id=roles.student_id,
        assistant_id=roles.assistant_id,
        query=example.input,
        gold=example.target,
        first_answer=answers[0] if answers else "",
        first_verdict=grades[0].verdict if grades else "no_answer",
        turns=turns,
        verdict=final.verdict,
        predicted=final.predicted,
        rounds=len(turns),
        corrected=bool(turns) and final.verdict == "correct",
        leaks=sum(t.action.leaked for t in turns),
        **usage_of(messages),
        time_s=round(elapsed_s, 3),
    )


def mistake_from(episode: Episode) -> MistakeRecord | None:
    """The memory record of an episode whose first answer was wrong; its feedback is the last one given."""
    if episode.first_verdict == "correct":
        return None
    last = episode.turns[-1].action if episode.turns else None
    return MistakeRecord.make(
        model_id=episode.model_id,
        source=episode.source,
        task=episode.task,
        query=episode.query,
        wrong_answer=episode.first_answer,
        gold=episode.gold,
        reason=last.reason if last else "",
        guideline=last.guideline if last else "",
        outcome="corrected" if episode.corrected else "uncorrected",
        rounds=episode.rounds,
    )


async def mistake_from_feedback(
    example: Example,
    answer: str,
    roles: Roles,
    *,
    model_id: str,
    task: str,
    tenant: str,
    note: str = "",
    cancellation_token: CancellationToken | None = None,
) -> MistakeRecord:
    """The memory record of a served answer that its client corrected (``redpen serve``'s feedback): one
    gathering turn on it. The assistant sees the gold the client gave (``example.target``) and its ``note``,
    explains the error and writes a guideline, through the same leak filter as in gathering. The student is not
    asked again: the client has the right answer already, so the outcome is "uncorrected".
    """
    assistant = GatheringAssistant(example, roles.assistant_client(), note=note)
    response = await assistant.on_messages(
        [TextMessage(content=answer, source=STUDENT)], cancellation_token or CancellationToken()
    )
    [advice] = contents([response.chat_message], Advice)
    reason = advice.feedback.reason
    if not reason:  # a record's guidance shows why the answer was wrong: ask for that, as gathering's JSON does
        reason = await _reason(example, answer, advice.feedback.guideline, roles, note, cancellation_token)
    return MistakeRecord.make(
        model_id=model_id,
        source=example.source,
        task=task,
        query=example.input,
        wrong_answer=answer,
        gold=example.target,
        reason=reason,
        guideline=advice.feedback.guideline,
        outcome="uncorrected",
        rounds=1,
        tenant=tenant,
    )


async def _reason(
    example: Example,
    answer: str,
    guideline: str,
    roles: Roles,
    note: str,
    cancellation_token: CancellationToken | None,
) -> str:
    """Why a corrected answer was wrong, when the assistant's feedback gave only a guideline: asked once more,
    kept out of leaks as its feedback is; else the client's own note; else that the client corrected it."""
    chat = gathering_messages(example.input, answer, example.target, note=note)
    chat += [
        Message(role="assistant", content=guideline),
        Message(role="user", content=load_prompt("assistant_reason")),
    ]
    result = await roles.assistant_client().create(llm_messages(chat), cancellation_token=cancellation_token)
    patterns = [*leak_patterns(example), ANSWER_STATEMENT]
    for candidate in (str(result.content), note):
        reason = scrub(candidate, patterns)[0].strip()
        if reason:
            return reason
    return "The client said this answer was wrong."


class MemoryWriter:
    """Batch mistake upserts: episodes that end close together share one embedding call and one upsert.

    ``write`` returns once the record is stored, so callers can still append the episode only after its mistake;
    with ``durable`` it returns once the memory has also flushed it to disk (a server acknowledging feedback).
    """

    def __init__(self, memory: MistakeMemory | TenantMemory, durable: bool = False) -> None:
        self.memory = memory
        self.durable = durable
        self.pending: list[tuple[MistakeRecord, asyncio.Future[None]]] = []
        self.flushes = 0
        self._task: asyncio.Task[None] | None = None

    async def write(self, record: MistakeRecord) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((record, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self.pending:  # records that arrive during an upsert go in the next one
            batch, self.pending = self.pending, []
            try:
                await run_torch(self.memory.upsert, [record for record, _ in batch])
                if self.durable:
                    await run_torch(self.memory.flush)
            except Exception as exc:  # every waiting episode fails, none is appended without its mistake
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self.flushes += 1
            for _, future in batch:
                future.set_result(None)


async def run_gathering(
    examples: Sequence[Example],
    roles: Roles,
    memory: MistakeMemory,
    run: RunDir,
    *,
    task: str,
    rounds: int = ROUNDS,
    concurrency: int | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> list[Episode]:
    """Gather every example not yet in the run's episodes; return all episodes of ``examples`` in input order.

    ``concurrency``: episodes in flight, by default as many as the student's backend serves at once.
    """
    writer = MemoryWriter(memory)

    async def one(example: Example) -> Episode:
        episode = await gather_episode(example, roles, task, rounds)
        record = mistake_from(episode)
        if record is not None:
            await writer.write(record)  # stored before the episode is appended: see the module's docstring
        return episode

    width = concurrency or roles.student.capacity
    return await complete_pending(run, EPISODES, Episode, examples, one, concurrency=width, on_record=on_episode)

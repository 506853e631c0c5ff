"""Gathering: student -> examiner -> assistant rounds until the examiner says CORRECT or the round limit.

Each conversation becomes one episode record, its turns the (state, action, reward) steps the assistant is later
trained on; each first-answer mistake becomes a ``MistakeRecord``. Episodes run concurrently (bounded), so the
local backend batches their requests. Memory is written before the episode is appended: a run killed between the
two redoes that episode, and the deterministic record id makes the second write a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import BaseChatMessage
from autogen_agentchat.teams import RoundRobinGroupChat

from agents.roles import ASSISTANT, CORRECT, EXAMINER, STUDENT, ExaminerAgent, GatheringAssistant, StudentAgent
from agents.team import Roles, usage_of
from memory.record import MistakeRecord
from memory.store import MistakeMemory
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.models.torch_thread import run_torch

log = logging.getLogger(__name__)

EPISODES = "episodes.jsonl"
DEFAULT_ROUNDS = 3  # the SALAM paper's limit on feedback rounds per question


async def gather_episode(example: Example, roles: Roles, task: str, rounds: int = DEFAULT_ROUNDS) -> dict[str, Any]:
    """Run one gathering conversation as an AutoGen team and return it as an episode record."""
    team = RoundRobinGroupChat(
        [
            StudentAgent(example, roles.student_client()),
            ExaminerAgent(example),
            GatheringAssistant(example, roles.assistant_client()),
        ],
        # The task message, then (student, examiner) for every attempt and an assistant turn between attempts.
        termination_condition=TextMentionTermination(CORRECT, sources=[EXAMINER])
        | MaxMessageTermination(1 + 2 * (rounds + 1) + rounds),
    )
    started = time.perf_counter()
    result = await team.run(task=example.input)
    messages = [m for m in result.messages if isinstance(m, BaseChatMessage)]
    return episode_record(example, roles, task, messages, time.perf_counter() - started)


def episode_record(
    example: Example, roles: Roles, task: str, messages: list[BaseChatMessage], elapsed_s: float
) -> dict[str, Any]:
    """Turn a gathering conversation into turns of (state, action, reward).

    state = (query, the student's wrong response, the feedback given before it); action = the assistant's feedback;
    reward = 1 if the student's next answer is right.
    """
    answers = [m for m in messages if m.source == STUDENT]
    verdicts = [m.metadata for m in messages if m.source == EXAMINER]
    feedback = [m for m in messages if m.source == ASSISTANT]
    turns = []
    for i, action in enumerate(feedback):
        if i + 1 >= len(verdicts):  # the run stopped before the student answered this feedback
            break
        turns.append(
            {
                "round": i + 1,
                "state": {
                    "query": example.input,
                    "response": answers[i].to_text(),
                    "context": [f.metadata["guideline"] for f in feedback[:i]],
                },
                "action": {k: action.metadata[k] for k in ("reason", "guideline")}
                | {
                    "text": action.to_text(),
                    "leaked": action.metadata["leaked"] == "true",
                    "parsed": action.metadata["parsed"] == "true",
                },
                "reward": int(verdicts[i + 1]["verdict"] == "correct"),
                "next_response": answers[i + 1].to_text(),
            }
        )
    final = verdicts[-1] if verdicts else {"verdict": "no_answer", "predicted": ""}
    return {
        "id": example.id,
        "source": example.source,
        "task": task,
        "model_id": roles.student_id,
        "assistant_id": roles.assistant_id,
        "query": example.input,
        "gold": example.target,
        "first_answer": answers[0].to_text() if answers else "",
        "first_verdict": verdicts[0]["verdict"] if verdicts else "no_answer",
        "turns": turns,
        "verdict": final["verdict"],
        "predicted": final["predicted"] or None,
        "rounds": len(turns),
        "corrected": bool(turns) and final["verdict"] == "correct",
        "leaks": sum(t["action"]["leaked"] for t in turns),
        **usage_of(messages),
        "time_s": round(elapsed_s, 3),
    }


def mistake_from(episode: dict[str, Any]) -> MistakeRecord | None:
    """The memory record of an episode whose first answer was wrong; its feedback is the last one given."""
    if episode["first_verdict"] == "correct":
        return None
    last = episode["turns"][-1]["action"] if episode["turns"] else {"reason": "", "guideline": ""}
    return MistakeRecord.make(
        model_id=episode["model_id"],
        source=episode["source"],
        task=episode["task"],
        query=episode["query"],
        wrong_answer=episode["first_answer"],
        gold=episode["gold"],
        reason=last["reason"],
        guideline=last["guideline"],
        outcome="corrected" if episode["corrected"] else "uncorrected",
        rounds=episode["rounds"],
    )


class MemoryWriter:
    """Batch mistake upserts: episodes that end close together share one embedding call and one upsert.

    ``write`` returns once the record is stored, so callers can still append the episode only after its mistake.
    """

    def __init__(self, memory: MistakeMemory) -> None:
        self.memory = memory
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
    rounds: int = DEFAULT_ROUNDS,
    concurrency: int = 32,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Gather every example not yet in the run's episodes; return all episodes of ``examples`` in input order."""
    writer = MemoryWriter(memory)

    async def one(example: Example) -> dict[str, Any]:
        episode = await gather_episode(example, roles, task, rounds)
        record = mistake_from(episode)
        if record is not None:
            await writer.write(record)  # stored before the episode is appended: see the module's docstring
        return episode

    return await complete_pending(run, EPISODES, examples, one, concurrency=concurrency, on_record=on_episode)

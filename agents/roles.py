"""The roles as autogen-agentchat agents: student, examiner (a grader, no model) and study assistant.

Each agent is built for one example (the gold and the retrieved mistakes are per-example facts) and talks to its
model through an AutoGen ``ChatCompletionClient``, so any backend serves it. The facts an episode needs later travel
typed, as AutoGen structured messages: the examiner sends a :class:`Grade`, the assistant an :class:`Advice`; each
message's text (what the other agents read) is rendered from its content.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import TypeVar

from autogen_agentchat.agents import BaseChatAgent
from autogen_agentchat.base import Response, TaskResult, TerminationCondition
from autogen_agentchat.messages import BaseAgentEvent, BaseChatMessage, StructuredMessage, TextMessage
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import CancellationToken
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    SystemMessage,
    UserMessage,
)
from pydantic import BaseModel, ConfigDict

from agents.feedback import Feedback, exam_guideline, parse_feedback, without_leaks
from agents.prompts import exam_guidance, examining_messages, gathering_messages
from agents.student import student_messages
from memory.autogen_memory import format_mistakes
from memory.store import Hit
from runtime.data.graders import Verdict
from runtime.data.kinds import grade_async
from runtime.data.tasks import Example
from runtime.errors import RedpenError
from runtime.models.backend import Message

STUDENT, EXAMINER, ASSISTANT = "student", "examiner", "assistant"
CORRECT, WRONG = "CORRECT", "WRONG"  # examiner verdict words; neither contains the other


class Grade(BaseModel):
    """The examiner's message: the verdict word the team stops on, and the grade behind it."""

    model_config = ConfigDict(frozen=True)

    word: str
    verdict: Verdict
    predicted: str | None
    error: str | None = None  # code items that failed: why, and the program's stderr tail


class Advice(BaseModel):
    """The assistant's message: what the student reads, and the feedback it came from."""

    model_config = ConfigDict(frozen=True)

    text: str
    feedback: Feedback


Content = TypeVar("Content", bound=BaseModel)


def contents(messages: Sequence[BaseChatMessage], kind: type[Content]) -> list[Content]:
    """The typed contents of the structured messages of one kind, in order (``contents(messages, Grade)``)."""
    return [m.content for m in messages if isinstance(m, StructuredMessage) and isinstance(m.content, kind)]


def _text(result: CreateResult) -> str:
    return result.content if isinstance(result.content, str) else str(result.content)


def _last_from(messages: Sequence[BaseChatMessage], source: str) -> BaseChatMessage | None:
    return next((m for m in reversed(messages) if m.source == source), None)


class RoleAgent(BaseChatAgent):
    error: RedpenError | None = None  # what this agent raised on purpose, for run_team to raise as itself

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (TextMessage,)

    async def on_messages_stream(
        self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken
    ) -> AsyncGenerator[BaseAgentEvent | BaseChatMessage | Response, None]:
        try:
            async for event in super().on_messages_stream(messages, cancellation_token):
                yield event
        except RedpenError as exc:
            self.error = exc
            raise

    async def on_reset(self, cancellation_token: CancellationToken) -> None:  # noqa: B027 - roles keep no state
        """Nothing to forget: each agent serves one example."""


async def run_team(
    agents: Sequence[RoleAgent],
    termination: TerminationCondition,
    task: str,
    cancellation_token: CancellationToken | None = None,
) -> TaskResult:
    """Run the agents as a round-robin AutoGen team; an error an agent raised on purpose is raised as itself.

    AutoGen catches what an agent raises and raises a ``RuntimeError`` of its text and whole traceback instead, so a
    ``BackendError`` (an unreachable server) would reach the user as hundreds of lines rather than one line and
    exit 2. Each agent keeps the ``RedpenError`` it raised; that one is raised here, AutoGen's wrapper dropped.
    """
    team = RoundRobinGroupChat(list(agents), termination_condition=termination)
    try:
        return await team.run(task=task, cancellation_token=cancellation_token)
    except RuntimeError:
        raised = next((agent.error for agent in agents if agent.error is not None), None)
        if raised is None:
            raise
        raise raised from None


class StudentAgent(RoleAgent):
    """Answers the example; the latest assistant message, if any, is its guidance."""

    def __init__(self, example: Example, client: ChatCompletionClient) -> None:
        super().__init__(STUDENT, "answers the question")
        self.example, self.client = example, client
        self.guidance: str | None = None
        self.finish_reason: str | None = None  # of its last reply: "stop", or "length" when cut at the reply budget

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        advice = _last_from(messages, ASSISTANT)
        if advice is not None:
            self.guidance = advice.to_text()
        result = await self.client.create(
            llm_messages(student_messages(self.example, self.guidance)), cancellation_token=cancellation_token
        )
        self.finish_reason = "length" if result.finish_reason == "length" else "stop"
        return Response(chat_message=TextMessage(content=_text(result), source=self.name, models_usage=result.usage))


class ExaminerAgent(RoleAgent):
    """Grades the student's last answer with the benchmark's grader: no model, no opinion (code runs sandboxed)."""

    def __init__(self, example: Example) -> None:
        super().__init__(EXAMINER, "grades the student's answer against the gold")
        self.example = example

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (StructuredMessage[Grade],)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        answer = _last_from(messages, STUDENT)
        result = await grade_async(self.example, answer.to_text() if answer else "")
        word = CORRECT if result.verdict == "correct" else WRONG
        content = Grade(word=word, verdict=result.verdict, predicted=result.predicted, error=result.error)
        return Response(
            chat_message=StructuredMessage[Grade](content=content, source=self.name, format_string="{word}")
        )


class GatheringAssistant(RoleAgent):
    """Sees the gold; explains the student's error and gives a guideline that never names the answer."""

    def __init__(self, example: Example, client: ChatCompletionClient, note: str = "") -> None:
        super().__init__(ASSISTANT, "explains the mistake without revealing the answer")
        self.example, self.client, self.note = example, client, note
        self.given: list[Feedback] = []

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (StructuredMessage[Advice],)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        answer = _last_from(messages, STUDENT)
        chat = gathering_messages(
            self.example.input,
            answer.to_text() if answer else "",
            self.example.target,
            [f.guideline for f in self.given],
            self.note,
        )
        result = await self.client.create(llm_messages(chat), cancellation_token=cancellation_token)
        feedback = without_leaks(parse_feedback(_text(result)), self.example)
        self.given.append(feedback)
        return Response(chat_message=_advice(feedback.as_guidance(), feedback, self.name, result))


class ExaminingAssistant(RoleAgent):
    """No gold: turns retrieved past mistakes into guidance before the student answers."""

    def __init__(self, example: Example, client: ChatCompletionClient, hits: Sequence[Hit]) -> None:
        super().__init__(ASSISTANT, "guides the student with similar past mistakes")
        self.example, self.client, self.hits = example, client, list(hits)

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (StructuredMessage[Advice], TextMessage)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        if not self.hits:  # nothing similar was ever missed: the student answers as in the baseline
            return Response(chat_message=TextMessage(content="", source=self.name))
        mistakes = format_mistakes(self.hits)
        chat = examining_messages(mistakes, self.example.input)
        result = await self.client.create(llm_messages(chat), cancellation_token=cancellation_token)
        feedback = parse_feedback(_text(result))
        guideline = exam_guideline(feedback.guideline)
        feedback = Feedback(feedback.reason, guideline, feedback.parsed)
        return Response(chat_message=_advice(exam_guidance(mistakes, guideline), feedback, self.name, result))


def llm_messages(chat: Sequence[Message]) -> list[LLMMessage]:
    """A chat as AutoGen's model messages: a role's system + user prompt, or a served client's whole chat."""
    return [
        SystemMessage(content=m["content"])
        if m["role"] == "system"
        else AssistantMessage(content=m["content"], source="assistant")
        if m["role"] == "assistant"
        else UserMessage(content=m["content"], source="user")
        for m in chat
    ]


def _advice(text: str, feedback: Feedback, source: str, result: CreateResult) -> StructuredMessage[Advice]:
    return StructuredMessage[Advice](
        content=Advice(text=text, feedback=feedback), source=source, models_usage=result.usage, format_string="{text}"
    )

"""The roles as autogen-agentchat agents: student, examiner (a grader, no model) and study assistant.

Each agent is built for one example (the gold and the retrieved mistakes are per-example facts) and talks to its
model through an AutoGen ``ChatCompletionClient``, so any backend serves it. Structured facts an episode needs
later (verdicts, feedback fields, leaks) travel in the messages' ``metadata``.
"""

from __future__ import annotations

from collections.abc import Sequence

from autogen_agentchat.agents import BaseChatAgent
from autogen_agentchat.base import Response
from autogen_agentchat.messages import BaseChatMessage, TextMessage
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient, CreateResult, LLMMessage, SystemMessage, UserMessage

from agents.feedback import (
    ANSWER_STATEMENT,
    FALLBACK_GUIDELINE,
    Feedback,
    parse_feedback,
    scrub,
    without_leaks,
)
from agents.prompts import load_prompt
from agents.student import student_messages
from memory.store import Hit
from runtime.data.graders import grade
from runtime.data.tasks import Example

STUDENT, EXAMINER, ASSISTANT = "student", "examiner", "assistant"
CORRECT, WRONG = "CORRECT", "WRONG"  # examiner verdict words; neither contains the other
_MAX_PAST_QUERY = 400  # characters of a past question shown again: enough to recognise it, cheap to prefill


def _text(result: CreateResult) -> str:
    return result.content if isinstance(result.content, str) else str(result.content)


def _last_from(messages: Sequence[BaseChatMessage], source: str) -> BaseChatMessage | None:
    return next((m for m in reversed(messages) if m.source == source), None)


class _RoleAgent(BaseChatAgent):
    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (TextMessage,)

    async def on_reset(self, cancellation_token: CancellationToken) -> None:  # noqa: B027 - roles keep no state
        """Nothing to forget: each agent serves one example."""


class StudentAgent(_RoleAgent):
    """Answers the example; the latest assistant message, if any, is its guidance."""

    def __init__(self, example: Example, client: ChatCompletionClient) -> None:
        super().__init__(STUDENT, "answers the question")
        self.example, self.client = example, client
        self.guidance: str | None = None

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        advice = _last_from(messages, ASSISTANT)
        if advice is not None:
            self.guidance = advice.to_text()
        chat = student_messages(self.example, self.guidance)
        llm: list[LLMMessage] = [
            SystemMessage(content=chat[0]["content"]),
            UserMessage(content=chat[1]["content"], source="user"),
        ]
        result = await self.client.create(llm, cancellation_token=cancellation_token)
        return Response(chat_message=TextMessage(content=_text(result), source=self.name, models_usage=result.usage))


class ExaminerAgent(_RoleAgent):
    """Grades the student's last answer with the benchmark's grader: no model, no opinion."""

    def __init__(self, example: Example) -> None:
        super().__init__(EXAMINER, "grades the student's answer against the gold")
        self.example = example

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        answer = _last_from(messages, STUDENT)
        result = grade(self.example, answer.to_text() if answer else "")
        word = CORRECT if result.verdict == "correct" else WRONG
        metadata = {"verdict": result.verdict, "predicted": result.predicted or ""}
        return Response(chat_message=TextMessage(content=word, source=self.name, metadata=metadata))


class GatheringAssistant(_RoleAgent):
    """Sees the gold; explains the student's error and gives a guideline that never names the answer."""

    def __init__(self, example: Example, client: ChatCompletionClient) -> None:
        super().__init__(ASSISTANT, "explains the mistake without revealing the answer")
        self.example, self.client = example, client
        self.given: list[Feedback] = []

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        answer = _last_from(messages, STUDENT)
        previous = ""
        if self.given:
            previous = "\nYour earlier guidelines did not help yet:\n" + "\n".join(
                f"- {f.guideline}" for f in self.given
            )
        user = load_prompt("assistant_gather_user").format(
            query=self.example.input,
            response=answer.to_text() if answer else "",
            gold=self.example.target,
            previous=previous,
        )
        llm: list[LLMMessage] = [
            SystemMessage(content=load_prompt("assistant_gather")),
            UserMessage(content=user, source="user"),
        ]
        result = await self.client.create(llm, cancellation_token=cancellation_token)
        feedback = without_leaks(parse_feedback(_text(result)), self.example)
        self.given.append(feedback)
        return Response(chat_message=_feedback_message(feedback, self.name, result))


class ExaminingAssistant(_RoleAgent):
    """No gold: turns retrieved past mistakes into guidance before the student answers."""

    def __init__(self, example: Example, client: ChatCompletionClient, hits: Sequence[Hit]) -> None:
        super().__init__(ASSISTANT, "guides the student with similar past mistakes")
        self.example, self.client, self.hits = example, client, list(hits)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        if not self.hits:  # nothing similar was ever missed: the student answers as in the baseline
            return Response(chat_message=TextMessage(content="", source=self.name, metadata={"retrieved": "0"}))
        user = load_prompt("assistant_exam_user").format(mistakes=past_mistakes(self.hits), query=self.example.input)
        llm: list[LLMMessage] = [
            SystemMessage(content=load_prompt("assistant_exam")),
            UserMessage(content=user, source="user"),
        ]
        result = await self.client.create(llm, cancellation_token=cancellation_token)
        feedback = parse_feedback(_text(result))
        # No gold here, but a stated answer letter would be copied: "assisted" would measure the assistant answering.
        guideline = scrub(feedback.guideline, [ANSWER_STATEMENT])[0] or FALLBACK_GUIDELINE
        feedback = Feedback(feedback.reason, guideline, feedback.parsed)
        guidance = f"Past mistakes on similar questions:\n{past_mistakes(self.hits)}\n\nGuideline: {feedback.guideline}"
        message = _feedback_message(feedback, self.name, result, content=guidance)
        message.metadata["retrieved"] = str(len(self.hits))
        return Response(chat_message=message)


def past_mistakes(hits: Sequence[Hit]) -> str:
    """Retrieved mistakes as the assistant and the student read them: never the past gold answers."""
    template = load_prompt("past_mistakes")
    return "\n".join(
        template.format(
            n=i,
            query=_clip(h.record.query),
            wrong_answer=_clip(h.record.wrong_answer, 120),
            reason=h.record.reason or "-",
            guideline=h.record.guideline,
        )
        for i, h in enumerate(hits, 1)
    )


def _clip(text: str, limit: int = _MAX_PAST_QUERY) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _feedback_message(feedback: Feedback, source: str, result: CreateResult, content: str | None = None) -> TextMessage:
    metadata = {
        "reason": feedback.reason,
        "guideline": feedback.guideline,
        "parsed": str(feedback.parsed).lower(),
        "leaked": str(feedback.leaked).lower(),
    }
    return TextMessage(
        content=content if content is not None else feedback.as_guidance(),
        source=source,
        models_usage=result.usage,
        metadata=metadata,
    )

"""The student's prompt: the question, an answer-format instruction by answer kind, and optional guidance."""

from __future__ import annotations

from agents.prompts import load_prompt
from runtime.data.tasks import Example
from runtime.models.backend import Message


def student_messages(example: Example, guidance: str | None = None) -> list[Message]:
    """The chat a student answers; ``guidance`` (a study assistant's advice) goes before the question."""
    system = load_prompt(f"student_{example.answer_kind}")
    user = (
        load_prompt("student_guided").format(guidance=guidance, question=example.input) if guidance else example.input
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def labelled_options(example: Example) -> list[str]:
    """Options as the student would write them, "(A) text", for likelihood scoring."""
    return [f"({chr(ord('A') + i)}) {text}" for i, text in enumerate(example.options)]

"""The student's prompt: the question, an answer-format instruction by answer kind, and optional guidance."""

from __future__ import annotations

from collections.abc import Iterable

from agents.prompts import load_prompt
from runtime.data.kinds import kind_of
from runtime.data.tasks import Example
from runtime.errors import DataError
from runtime.models.backend import Backend, Message, overflow

# Example.metadata key of a served request's own chat (``redpen serve --memory``): the student answers it, not the
# task's prompt, so the client's system prompt and earlier turns are kept.
CHAT = "chat"


def student_messages(example: Example, guidance: str | None = None) -> list[Message]:
    """The chat a student answers; ``guidance`` (a study assistant's advice) goes before the question.

    A served example answers the client's chat, the guidance put before its last user message:

    >>> from runtime.data.tasks import Example
    >>> chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    >>> served = Example("c1", "chat", "2 + 2?", "", "text", metadata={CHAT: chat})
    >>> [m["content"] for m in student_messages(served, "Guideline: add.")]
    ['Be brief.', 'Guideline: add.\\n\\nQuestion:\\n2 + 2?']
    """
    if CHAT in example.metadata:
        messages = [Message(role=m["role"], content=m["content"]) for m in example.metadata[CHAT]]
        if guidance:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            question = messages[last]["content"]
            messages[last]["content"] = load_prompt("student_guided").format(guidance=guidance, question=question)
        return messages
    system = load_prompt(kind_of(example).student_prompt)
    user = (
        load_prompt("student_guided").format(guidance=guidance, question=example.input) if guidance else example.input
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def labelled_options(example: Example) -> list[str]:
    """Options as the student would write them, "(A) text", for likelihood scoring."""
    return [f"({chr(ord('A') + i)}) {text}" for i, text in enumerate(example.options)]


def check_prompts_fit(examples: Iterable[Example], backend: Backend, reply_tokens: int) -> None:
    """Refuse, before any model call, an example whose student prompt and reply cannot fit the model's context.

    The error names the row (``file:line`` of a JSONL file) so it can be fixed; the backend refuses such a prompt
    too, but only when the run reaches it. A backend that cannot count tokens checks nothing here.
    """
    for example in examples:
        reason = overflow(backend, student_messages(example), reply_tokens)
        if reason is not None:
            raise DataError(
                f"{example.where or 'item ' + example.id}: {reason}; shorten this row, or give a smaller "
                "--max-new-tokens"
            )

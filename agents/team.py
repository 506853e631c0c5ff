"""Who plays each role: a backend (and adapter, and sampling settings) for the student and for the assistant."""

from __future__ import annotations

from dataclasses import dataclass, field

from autogen_agentchat.messages import BaseChatMessage

from runtime.models.autogen_client import BackendChatCompletionClient
from runtime.models.backend import Backend, GenerationSettings

# 128: room for a short reason before "The answer is (X)"; past that the 135M default mostly repeats itself.
STUDENT_SETTINGS = GenerationSettings(max_new_tokens=128)
# 160: a JSON reason + guideline fits; longer replies from a small model ramble and leak.
ASSISTANT_SETTINGS = GenerationSettings(max_new_tokens=160)


@dataclass
class Roles:
    student: Backend
    assistant: Backend
    student_adapter: str | None = None
    assistant_adapter: str | None = None
    student_settings: GenerationSettings = field(default_factory=lambda: STUDENT_SETTINGS)
    assistant_settings: GenerationSettings = field(default_factory=lambda: ASSISTANT_SETTINGS)

    @property
    def student_id(self) -> str:
        """What mistakes are attributed to: the model, and its adapter if one is used."""
        return self.student.model_id + (f"+{self.student_adapter}" if self.student_adapter else "")

    @property
    def assistant_id(self) -> str:
        return self.assistant.model_id + (f"+{self.assistant_adapter}" if self.assistant_adapter else "")

    def student_client(self) -> BackendChatCompletionClient:
        return BackendChatCompletionClient(self.student, self.student_adapter, self.student_settings)

    def assistant_client(self) -> BackendChatCompletionClient:
        return BackendChatCompletionClient(self.assistant, self.assistant_adapter, self.assistant_settings)


def usage_of(messages: list[BaseChatMessage]) -> dict[str, int]:
    """Tokens the models spent on a conversation."""
    prompt = sum(m.models_usage.prompt_tokens for m in messages if m.models_usage)
    completion = sum(m.models_usage.completion_tokens for m in messages if m.models_usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion}

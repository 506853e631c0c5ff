"""AutoGen agents on a redpen backend through BackendChatCompletionClient, with a scripted backend."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import TextMessage
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_core import FunctionCall, Image
from autogen_core.models import (
    AssistantMessage,
    CreateResult,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    RequestUsage,
    SystemMessage,
    UserMessage,
)

from runtime.errors import BackendError
from runtime.models.autogen_client import BackendChatCompletionClient, to_messages
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage

DEFAULT_SETTINGS = GenerationSettings()  # frozen, so one shared default is safe


class ScriptedBackend(Backend):
    """Replies from a script in order and records every call."""

    kind = "scripted"
    model_id = "tiny-student"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[list[Message], GenerationSettings, str | None]] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = DEFAULT_SETTINGS,
        adapter: str | None = None,
    ) -> Generation:
        self.calls.append((list(messages), settings, adapter))
        return Generation(text=self.replies.pop(0), usage=Usage(prompt_tokens=10, completion_tokens=3))


async def test_assistant_agent_answers_a_task_and_counts_usage() -> None:
    backend = ScriptedBackend(["2 + 2 = 4. The answer is 4.", "Still 4."])
    settings = GenerationSettings(max_new_tokens=64)
    client = BackendChatCompletionClient(backend, adapter="student-lora", settings=settings)
    agent = AssistantAgent("student", model_client=client, system_message="You are a careful student.")

    first = await agent.run(task="What is 2 + 2?")
    second = await agent.run(task="Are you sure?")

    answer = first.messages[-1]
    assert isinstance(answer, TextMessage)
    assert answer.content == "2 + 2 = 4. The answer is 4."
    assert answer.models_usage == RequestUsage(prompt_tokens=10, completion_tokens=3)
    assert second.messages[-1].to_text() == "Still 4."
    # The agent's memory of the first exchange reaches the backend as plain chat messages.
    messages, sent_settings, adapter = backend.calls[1]
    assert messages == [
        {"role": "system", "content": "You are a careful student."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."},
        {"role": "user", "content": "Are you sure?"},
    ]
    assert sent_settings == settings
    assert adapter == "student-lora"
    assert client.total_usage() == RequestUsage(prompt_tokens=20, completion_tokens=6)
    assert client.actual_usage() == client.total_usage()


async def test_two_agents_take_turns_until_the_assistant_approves() -> None:
    # One backend, two adapters: the student and its study assistant, as in a gathering loop.
    backend = ScriptedBackend(["The answer is 5.", "Recount the apples. ", "The answer is 4.", "CORRECT"])
    student = AssistantAgent("student", model_client=BackendChatCompletionClient(backend))
    assistant = AssistantAgent("assistant", model_client=BackendChatCompletionClient(backend, adapter="assistant"))
    team = RoundRobinGroupChat(
        [student, assistant], termination_condition=TextMentionTermination("CORRECT") | MaxMessageTermination(8)
    )

    result = await team.run(task="Two apples and two apples: how many apples?")

    assert [m.to_text() for m in result.messages[1:]] == [
        "The answer is 5.",
        "Recount the apples. ",
        "The answer is 4.",
        "CORRECT",
    ]
    assert [adapter for _, _, adapter in backend.calls] == [None, "assistant", None, "assistant"]


async def test_create_stream_yields_the_text_then_the_result() -> None:
    client = BackendChatCompletionClient(ScriptedBackend(["hi"]))
    chunks = [chunk async for chunk in client.create_stream([UserMessage(content="hello", source="user")])]

    assert chunks[0] == "hi"
    assert isinstance(chunks[1], CreateResult)
    assert chunks[1].content == "hi"
    assert chunks[1].finish_reason == "stop"
    assert not chunks[1].cached


async def test_extra_create_args_override_settings() -> None:
    backend = ScriptedBackend(["a", "b"])
    client = BackendChatCompletionClient(backend, settings=GenerationSettings(max_new_tokens=32))
    await client.create([UserMessage(content="x", source="user")], extra_create_args={"temperature": 0.7, "seed": 1})

    assert backend.calls[0][1] == GenerationSettings(max_new_tokens=32, temperature=0.7, seed=1)
    with pytest.raises(BackendError, match="GenerationSettings fields only"):
        await client.create([UserMessage(content="x", source="user")], extra_create_args={"logit_bias": {}})


def test_tool_calls_and_images_are_refused_clearly() -> None:
    call = AssistantMessage(content=[FunctionCall(id="1", name="f", arguments="{}")], source="student")
    result = FunctionExecutionResultMessage(content=[FunctionExecutionResult(content="1", name="f", call_id="1")])
    image = UserMessage(content=["look", Image.from_base64(_PNG)], source="user")

    with pytest.raises(BackendError, match="no tool calling"):
        to_messages([call])
    with pytest.raises(BackendError, match="FunctionExecutionResultMessage .* no tool calling"):
        to_messages([result])
    with pytest.raises(BackendError, match="image"):
        to_messages([image])


def test_token_estimates_and_model_info() -> None:
    client = BackendChatCompletionClient(ScriptedBackend([]), context_window=100)
    messages = [SystemMessage(content="x" * 40), UserMessage(content="y" * 40, source="user")]

    assert client.count_tokens(messages) == 28
    assert client.remaining_tokens(messages) == 72
    assert client.model_info["function_calling"] is False
    assert client.model_info["vision"] is False


# A 1x1 transparent PNG.
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="

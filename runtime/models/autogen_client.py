"""An AutoGen ``ChatCompletionClient`` over a redpen backend, so autogen-agentchat agents run on either backend.

Several agents usually share one backend (the student and the assistant may be the same model with different
adapters); each gets its own client, and the backend's owner closes the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Literal

from autogen_core import CancellationToken
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    ModelCapabilities,
    ModelFamily,
    ModelInfo,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from runtime.errors import BackendError
from runtime.models.backend import Backend, GenerationSettings, Message

DEFAULT_SETTINGS = GenerationSettings()  # frozen, so one shared default is safe

# redpen's roles talk in plain text: no tools, images or JSON mode.
MODEL_INFO = ModelInfo(
    vision=False,
    function_calling=False,
    json_output=False,
    family=ModelFamily.UNKNOWN,
    structured_output=False,
    multiple_system_messages=True,
)


class BackendChatCompletionClient(ChatCompletionClient):
    """Send an agent's messages to ``backend.generate`` with ``adapter`` and ``settings``.

    ``extra_create_args`` may override any :class:`GenerationSettings` field for one call (``temperature``,
    ``seed``...). Token counts are estimates (about four characters a token): the backend interface has no
    tokenizer, and only AutoGen's token-limited contexts read them.
    """

    def __init__(
        self,
        backend: Backend,
        adapter: str | None = None,
        settings: GenerationSettings = DEFAULT_SETTINGS,
        context_window: int = 8192,  # what the small default models are trained for
    ) -> None:
        self.backend = backend
        self.adapter = adapter
        self.settings = settings
        self.context_window = context_window
        self._usage = RequestUsage(prompt_tokens=0, completion_tokens=0)

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],  # noqa: B006 - the abstract method's signature
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},  # noqa: B006 - the abstract method's signature
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        if tools or json_output:
            raise BackendError("redpen's backends do not call tools or force JSON; give the agent neither")
        try:
            settings = dataclasses.replace(self.settings, **extra_create_args)
        except TypeError as error:
            raise BackendError(f"extra_create_args take GenerationSettings fields only: {error}") from error
        task = asyncio.ensure_future(self.backend.generate(to_messages(messages), settings, self.adapter))
        if cancellation_token is not None:
            cancellation_token.link_future(task)
        generation = await task
        usage = RequestUsage(generation.usage.prompt_tokens, generation.usage.completion_tokens)
        self._usage = RequestUsage(
            self._usage.prompt_tokens + usage.prompt_tokens, self._usage.completion_tokens + usage.completion_tokens
        )
        return CreateResult(finish_reason=generation.finish_reason, content=generation.text, usage=usage, cached=False)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],  # noqa: B006 - the abstract method's signature
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},  # noqa: B006 - the abstract method's signature
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """The whole reply as one chunk, then the result: the backends do not stream."""
        result = await self.create(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            json_output=json_output,
            extra_create_args=extra_create_args,
            cancellation_token=cancellation_token,
        )
        if result.content:
            yield result.content  # type: ignore[misc]  # always text: no tool calls
        yield result

    async def close(self) -> None:
        """Nothing to release: the backend is shared and closed by its owner."""

    def actual_usage(self) -> RequestUsage:
        return dataclasses.replace(self._usage)

    def total_usage(self) -> RequestUsage:
        return dataclasses.replace(self._usage)  # nothing is cached, so actual and total agree

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:  # noqa: B006
        # ~4 characters a token for English text, plus a few tokens of chat-template markup per message.
        return sum(len(m["content"]) // 4 + 4 for m in to_messages(messages))

    def remaining_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:  # noqa: B006
        return self.context_window - self.count_tokens(messages)

    @property
    def capabilities(self) -> ModelCapabilities:  # deprecated by AutoGen, still abstract
        return MODEL_INFO  # a superset of the old capabilities keys

    @property
    def model_info(self) -> ModelInfo:
        return MODEL_INFO


def to_messages(messages: Sequence[LLMMessage]) -> list[Message]:
    """AutoGen messages as redpen chat messages (text only)."""
    converted: list[Message] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            converted.append(Message(role="system", content=message.content))
        elif isinstance(message, UserMessage):
            if not isinstance(message.content, str) and not all(isinstance(p, str) for p in message.content):
                raise BackendError(f"message from {message.source} carries an image; redpen's backends read text only")
            text = message.content if isinstance(message.content, str) else "\n".join(message.content)  # type: ignore[arg-type]
            converted.append(Message(role="user", content=text))
        elif isinstance(message, AssistantMessage) and isinstance(message.content, str):
            converted.append(Message(role="assistant", content=message.content))
        else:
            raise BackendError(
                f"{message.type} is a tool call or result; redpen's backends have no tool calling, "
                "give the agent no tools"
            )
    return converted

"""``redpen serve`` driven by the clients its users have: the openai SDK, AutoGen, LangChain and LiteLLM.

A tiny random chat model behind an API key. Each test makes the calls a user of that client makes first: a chat,
a stream, structured output, a forced tool call and the tool's result sent back. (lm-eval-harness has its own test,
tests/test_serve_lm_eval.py.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from runtime.models.local import LocalBackend
from runtime.server import KeyRing, ServeLimits, build_app
from tests.helpers import build_tiny_model, running

MODEL = "tiny"
QUESTION = "Who was late to the meeting?"
# What AutoGen needs to know of a model that is not one of OpenAI's (README, "AutoGen").
MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": True,
    "structured_output": True,
    "family": "unknown",
}


# Closed choices: a random model given a free string or number writes until max_tokens.
class Verdict(BaseModel):
    answer: Literal["A", "B", "C"]
    confident: bool


def get_weather(city: Literal["Paris", "Oslo"]) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("clients")
    backend = LocalBackend(build_tiny_model(folder / MODEL), max_batch_size=8)
    keys = KeyRing(folder / "keys.json")
    key = keys.add("acme")
    # A long timeout: the server refuses (429) work it expects to miss it by, and a loaded CI machine is slow.
    with running(build_app(backend, keys=keys, limits=ServeLimits(request_timeout_s=900))) as base_url:
        yield base_url, key


def test_openai_sdk(served: tuple[str, str]) -> None:
    base_url, key = served
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
    reply = client.chat.completions.create(**chat)  # type: ignore[call-overload]
    stream = client.chat.completions.create(**chat, stream=True)  # type: ignore[call-overload]
    parsed = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=120,
        response_format=Verdict,
        temperature=0,
    )
    assert reply.choices[0].message.content is not None
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()


def test_autogen_client_chats_calls_tools_and_gives_structured_output(served: tuple[str, str]) -> None:
    from autogen_core import FunctionCall
    from autogen_core.models import (
        AssistantMessage,
        FunctionExecutionResult,
        FunctionExecutionResultMessage,
        UserMessage,
    )
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    base_url, key = served
    client = OpenAIChatCompletionClient(
        model=MODEL,
        base_url=base_url,
        api_key=key,
        model_info=MODEL_INFO,
        max_tokens=120,  # type: ignore[arg-type]
    )
    tool = FunctionTool(get_weather, description="The weather in a city")

    async def calls() -> None:
        question = [UserMessage(content="Weather in Paris?", source="user")]
        plain = await client.create([UserMessage(content=QUESTION, source="user")])
        assert isinstance(plain.content, str)
        called = await client.create(question, tools=[tool], tool_choice="required")
        assert isinstance(called.content, list) and called.finish_reason == "function_calls"
        call = called.content[0]
        assert isinstance(call, FunctionCall) and call.name == "get_weather"
        result = FunctionExecutionResult(content="sunny", call_id=call.id, name=call.name, is_error=False)
        after = await client.create(
            [
                *question,
                AssistantMessage(content=[call], source="assistant"),
                FunctionExecutionResultMessage(content=[result]),
            ],
            tools=[tool],
            tool_choice="none",
        )
        assert isinstance(after.content, str)
        structured = await client.create([UserMessage(content=QUESTION, source="user")], json_output=Verdict)
        assert isinstance(structured.content, str)
        Verdict.model_validate_json(structured.content)
        chunks = [chunk async for chunk in client.create_stream([UserMessage(content=QUESTION, source="user")])]
        assert len(chunks) > 1
        await client.close()

    asyncio.run(calls())


def test_langchain_chat_openai_binds_tools_and_gives_structured_output(served: tuple[str, str]) -> None:
    from langchain_openai import ChatOpenAI

    base_url, key = served
    chat = ChatOpenAI(model=MODEL, base_url=base_url, api_key=key, max_tokens=120, max_retries=0)  # type: ignore[arg-type]
    assert isinstance(chat.invoke(QUESTION).content, str)
    assert len(list(chat.stream(QUESTION))) > 1
    calls = chat.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?").tool_calls  # type: ignore[attr-defined]
    assert calls and calls[0]["name"] == "get_weather" and set(calls[0]["args"]) == {"city"}
    verdict = chat.with_structured_output(Verdict, method="json_schema").invoke(QUESTION)
    assert isinstance(verdict, Verdict)


def test_litellm_completion(served: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its bundled cost map: no test needs a network
    import litellm

    litellm.suppress_debug_info = True

    base_url, key = served
    common = {"model": f"openai/{MODEL}", "api_base": base_url, "api_key": key, "max_tokens": 120}
    reply = litellm.completion(messages=[{"role": "user", "content": QUESTION}], **common)
    assert isinstance(reply.choices[0].message.content, str)
    schema = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": Verdict.model_json_schema()}}
    shaped = litellm.completion(messages=[{"role": "user", "content": QUESTION}], response_format=schema, **common)
    Verdict.model_validate_json(shaped.choices[0].message.content)
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]
    called = litellm.completion(
        messages=[{"role": "user", "content": "Weather?"}], tools=tools, tool_choice="required", **common
    )
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    json.loads(called.choices[0].message.tool_calls[0].function.arguments)


def test_keys_are_needed(served: tuple[str, str], tmp_path: Path) -> None:
    base_url, _ = served
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="nope", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}]
        )

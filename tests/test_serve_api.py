"""OpenAI's chat and completions APIs over the local backend: every field honoured or refused by name.

A tiny random chat model served in a thread; requests through the openai SDK and raw HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from runtime.models.local import LocalBackend
from runtime.server import ServeLimits, build_app
from tests.helpers import build_tiny_model, running

MODEL = "tiny"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    folder = build_tiny_model(tmp_path_factory.mktemp("model") / MODEL)
    return LocalBackend(folder, max_batch_size=8)


@pytest.fixture(scope="module")
def url(backend: LocalBackend) -> Iterator[str]:
    with running(build_app(backend)) as base_url:
        yield base_url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


CHAT = [{"role": "user", "content": "Who was late to the meeting?"}]


def test_unknown_and_unsupported_fields_are_refused_by_name(url: str) -> None:
    unknown = post(url, "/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2, "frobnicate": 1})
    penalty = post(url, "/chat/completions", {"model": MODEL, "messages": CHAT, "presence_penalty": 0.5})
    neutral = post(url, "/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2, "presence_penalty": 0})
    suffix = post(url, "/completions", {"model": MODEL, "prompt": "The", "suffix": "dog"})
    audio = post(url, "/chat/completions", {"model": MODEL, "messages": CHAT, "modalities": ["text", "audio"]})

    assert unknown.status_code == 400 and "frobnicate" in unknown.json()["error"]["message"]
    assert penalty.status_code == 400 and "presence_penalty" in penalty.json()["error"]["message"]
    assert neutral.status_code == 200  # the value that asks for nothing is no reason to refuse
    assert suffix.status_code == 400 and "suffix" in suffix.json()["error"]["message"]
    assert audio.status_code == 400 and "modalities" in audio.json()["error"]["message"]


def expected_logprobs(backend: LocalBackend, ids: list[int]) -> list[float]:
    """Each token's log-prob given the ones before it, by one plain forward of the model."""
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids])).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_completions_echo_the_prompt_then_max_tokens_generated_as_vllm(url: str, backend: LocalBackend) -> None:
    ids = backend.encode("The quick brown fox jumps")
    body = post(
        url,
        "/completions",
        {"model": MODEL, "prompt": [ids, ids[:3]], "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0},
    ).json()

    first, second = body["choices"]
    lp = first["logprobs"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert len(lp["tokens"]) == len(ids) + 1  # the prompt's tokens, then one generated
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected_logprobs(backend, ids), abs=1e-4)
    # Each place's dict holds its 2 most likely tokens and the token itself; a greedy token is the likeliest.
    assert all(isinstance(top, dict) and 1 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    assert first["text"].startswith("The quick brown fox jumps")
    assert lp["text_offset"][: len(ids)] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    assert len(second["logprobs"]["tokens"]) == 4
    assert body["usage"]["prompt_tokens"] == len(ids) + 3


def test_completions_without_echo_generate_max_tokens(url: str, backend: LocalBackend) -> None:
    body = post(url, "/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 5, "temperature": 0}).json()
    choice = body["choices"][0]
    assert choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= 5
    assert choice["finish_reason"] in ("stop", "length")


def test_chat_logprobs_top_logprobs_and_n(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=6,
        temperature=0.8,
        seed=3,
        n=3,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        for token in choice.logprobs.content:
            assert len(token.top_logprobs) == 2
            assert token.logprob <= token.top_logprobs[0].logprob + 1e-6
    assert (
        reply.usage is not None
        and reply.usage.completion_tokens == sum(len(c.logprobs.content or []) for c in reply.choices if c.logprobs)
        or reply.usage.completion_tokens >= 3
    )


def test_streaming_sends_the_reply_piece_by_piece(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2  # not the whole text in one chunk
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_response_format_json_schema_is_decoded_under_the_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 12},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )
    parsed = json.loads(reply.choices[0].message.content or "")
    assert set(parsed) == {"answer", "confidence"} and isinstance(parsed["confidence"], int)
    anything = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert anything.choices[0].finish_reason == "length" or isinstance(
        json.loads(anything.choices[0].message.content or ""), dict
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_a_required_tool_call_comes_back_in_openais_shape_and_its_result_is_taken(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]
    answered = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_tokens=4,
    )
    assert answered.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_model_is_retrieved_by_id(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_the_first_streamed_piece_comes_before_the_whole_reply(url: str) -> None:
    """Time to the first streamed text against time to the whole reply, medians of 5 (the first arrives sooner)."""

    async def once(http: httpx.AsyncClient) -> tuple[float, float]:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 64, "temperature": 0, "stream": True}
        started, first = time.perf_counter(), None
        async with http.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if first is None and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started

    async def measure() -> list[tuple[float, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return [await once(http) for _ in range(5)]

    times = asyncio.run(measure())
    first = sorted(t for t, _ in times)[2]
    whole = sorted(t for _, t in times)[2]
    assert 0 < first < whole / 2


def test_an_upstream_server_honours_what_the_openai_backend_passes_on(url: str, client: openai.OpenAI) -> None:
    """redpen in front of redpen: the second server's model is the first's, reached through the openai backend;
    response_format, a required tool call, logprobs and streaming are honoured upstream and come back the same."""
    from runtime.models.openai_backend import OpenAIBackend

    upstream = OpenAIBackend(MODEL, base_url=url, api_key="unused", max_retries=0)
    with running(build_app(upstream, limits=ServeLimits(max_tokens=4096))) as proxy_url:
        proxy = openai.OpenAI(base_url=proxy_url, api_key="unused", max_retries=0)
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "string", "maxLength": 12}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        shaped = proxy.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
        called = proxy.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=60,
            temperature=0,
        )
        ask: Any = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "temperature": 0}
        scored = proxy.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
        direct = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
        chunks = list(proxy.chat.completions.create(**ask | {"max_tokens": 24}, stream=True))
        whole = client.chat.completions.create(**ask | {"max_tokens": 24})
        refused = post(proxy_url, "/chat/completions", ask | {"max_tokens": 2048})  # over the upstream's cap

    assert set(json.loads(shaped.choices[0].message.content or "")) == {"answer"}
    call = (called.choices[0].message.tool_calls or [])[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]
    through, here = scored.choices[0].logprobs, direct.choices[0].logprobs
    assert through is not None and here is not None and through.content and here.content
    assert [t.token for t in through.content] == [t.token for t in here.content]
    assert [t.logprob for t in through.content] == pytest.approx([t.logprob for t in here.content], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in through.content)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content  # streamed upstream too
    assert refused.status_code == 400 and "max_tokens 2048" in refused.json()["error"]["message"]

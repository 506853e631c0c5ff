"""OpenAIBackend against redpen's own server (over a scripted backend) and small misbehaving servers.

Every server runs on a free loopback port in a background thread, started by the test itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from runtime.errors import BackendError, ConfigError
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage
from runtime.models.openai_backend import OpenAIBackend
from runtime.server import build_app
from runtime.server.limits import ServeLimits
from tests.helpers import running

DEFAULT_SETTINGS = GenerationSettings()  # frozen, so one shared default is safe

QUESTION: list[Message] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "hello there"},
]


class ScriptedBackend(Backend):
    """Answers with the last message upper-cased, tagged with the adapter; records what it was asked."""

    kind = "scripted"

    def __init__(self, model_id: str = "tiny-student", delay_s: float = 0.0) -> None:
        self.model_id = model_id
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[tuple[list[Message], GenerationSettings, str | None]] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = DEFAULT_SETTINGS,
        adapter: str | None = None,
    ) -> Generation:
        self.calls.append((list(messages), settings, adapter))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        prompt = messages[-1]["content"]
        text = f"[{adapter or 'base'}] {prompt.upper()}"
        return Generation(text=text, usage=Usage(len(prompt.split()), len(text.split())))


class ScoringBackend(ScriptedBackend):
    """Also scores prompts: one token per character, and a "B" is far likelier than anything else."""

    async def prompt_logprobs(self, prompt: str, adapter: str | None = None) -> list[tuple[str, float | None, int]]:
        return [(ch, None if i == 0 else -0.1 if ch == "B" else -2.0, i) for i, ch in enumerate(prompt)]


@pytest.fixture
def scripted() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def url(scripted: ScriptedBackend) -> Iterator[str]:
    with running(build_app(scripted, adapters=("tutor",))) as base_url:
        yield base_url


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_text_and_usage_round_trip(url: str, scripted: ScriptedBackend) -> None:
    backend = OpenAIBackend("tiny-student", base_url=url)
    settings = GenerationSettings(max_new_tokens=32, temperature=0.0, top_p=0.9, seed=3, stop=("\n\n",))
    generation = await backend.generate(QUESTION, settings)
    await backend.aclose()

    assert generation.text == "[base] HELLO THERE"
    assert generation.usage == Usage(prompt_tokens=2, completion_tokens=3)
    assert generation.finish_reason == "stop"
    # Every setting crossed the wire and came back as the same GenerationSettings.
    messages, received, adapter = scripted.calls[0]
    assert messages == QUESTION
    assert received == settings
    assert adapter is None


async def test_many_requests_with_bounded_concurrency(url: str, scripted: ScriptedBackend) -> None:
    scripted.delay_s = 0.05
    backend = OpenAIBackend("tiny-student", base_url=url, max_concurrency=4)
    conversations = [[Message(role="user", content=f"question {i}")] for i in range(24)]
    generations = await backend.generate_many(conversations)
    await backend.aclose()

    assert [g.text for g in generations] == [f"[base] QUESTION {i}" for i in range(24)]
    assert scripted.max_in_flight == 4


@pytest.mark.parametrize("limit", [None, 70])  # None: the default, vLLM's max_num_seqs (256); 70: pools 32+32+6
async def test_default_limits_keep_a_vllm_batch_in_flight_over_kept_connections(limit: int | None) -> None:
    """Defaults sized for vLLM: a whole default batch of requests is in flight at once (the server answers none
    until all have arrived), and a second batch reuses the first one's connections instead of opening new ones.
    The connections are split over several pools; no request may wait for a connection of a full one."""
    n = limit or 256
    arrived, ports = [0], set()
    batches = [asyncio.Event(), asyncio.Event()]
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        assert request.client is not None
        ports.add(request.client.port)
        batch = batches[arrived[0] // n]
        arrived[0] += 1
        if arrived[0] % n == 0:
            batch.set()
        await asyncio.wait_for(batch.wait(), 10)
        message = {"role": "assistant", "content": "ok"}
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    with running(app) as base_url:
        backend = OpenAIBackend("m", base_url=base_url, timeout_s=20, max_retries=0, max_concurrency=n)
        for _ in batches:
            generations = await backend.generate_many([QUESTION] * n)
            assert [g.text for g in generations] == ["ok"] * n
        await backend.aclose()
    assert len(ports) == n


async def test_a_server_that_takes_fewer_at_once_lowers_the_limit_instead_of_failing(scripted: ScriptedBackend) -> None:
    """redpen serve takes 32 requests per key at once and answers the rest 429: the default client (256 in flight)
    learns that limit from the 429s and keeps to it, and no request spends a retry on it."""
    scripted.delay_s = 0.05
    with running(build_app(scripted, limits=ServeLimits(in_flight_per_key=4))) as base_url:
        backend = OpenAIBackend("tiny-student", base_url=base_url, max_retries=0)
        conversations = [[Message(role="user", content=f"question {i}")] for i in range(24)]
        generations = await backend.generate_many(conversations)
        await backend.aclose()
    assert [g.text for g in generations] == [f"[base] QUESTION {i}" for i in range(24)]
    assert scripted.max_in_flight == 4


async def test_adapter_is_sent_as_the_model_name(url: str, scripted: ScriptedBackend) -> None:
    backend = OpenAIBackend("tiny-student", base_url=url)
    generation = await backend.generate(QUESTION, adapter="tutor")
    await backend.aclose()

    assert generation.text == "[tutor] HELLO THERE"
    assert scripted.calls[0][2] == "tutor"


async def test_unknown_model_names_the_served_ones(url: str) -> None:
    backend = OpenAIBackend("tiny-student", base_url=url)
    with pytest.raises(BackendError) as caught:
        await backend.generate(QUESTION, adapter="nope")
    await backend.aclose()

    message = str(caught.value)
    assert message == f"model 'nope' is not served at {url}; served: tiny-student, tutor"


async def test_unreachable_server_fails_fast_with_one_line() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = OpenAIBackend("tiny-student", base_url=base_url, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(BackendError) as caught:
        await backend.generate(QUESTION)
    await backend.aclose()

    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert message.startswith(f"cannot reach the OpenAI-compatible server at {base_url}: ")
    assert message.endswith("start it or fix --base-url / OPENAI_BASE_URL")
    assert "\n" not in message


async def test_timeout_is_retried_then_explained() -> None:
    with running(build_app(ScriptedBackend(delay_s=0.5))) as base_url:
        backend = OpenAIBackend("tiny-student", base_url=base_url, timeout_s=0.2, max_retries=1, backoff_s=0.01)
        with pytest.raises(BackendError, match=r"did not answer within 0\.2s \(1 retries\)"):
            await backend.generate(QUESTION)
        await backend.aclose()


def flaky_app(failures: int, status: int) -> tuple[FastAPI, list[int]]:
    """A chat endpoint that fails ``failures`` times with ``status``, then answers "ok"; counts its calls."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:
        calls.append(1)
        if len(calls) <= failures:
            error = {"message": "the engine is restarting", "type": "server_error", "code": None}
            return JSONResponse(status_code=status, content={"error": error})
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        return JSONResponse(body)

    return app, calls


async def test_retries_on_503_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    app, calls = flaky_app(failures=2, status=503)
    with running(app) as base_url, caplog.at_level(logging.INFO, logger="runtime.models.openai_backend"):
        backend = OpenAIBackend("m", base_url=base_url, max_retries=3, backoff_s=0.01)
        generation = await backend.generate(QUESTION)
        await backend.aclose()

    assert generation.text == "ok"
    assert generation.finish_reason == "length"
    assert generation.usage == Usage(5, 1)
    assert len(calls) == 3
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2
    assert retries[0].startswith("the engine is restarting from http://127.0.0.1:")
    assert "retry 1/3" in retries[0]


async def test_retries_give_up_with_the_server_message() -> None:
    app, calls = flaky_app(failures=10, status=429)
    with running(app) as base_url:
        backend = OpenAIBackend("m", base_url=base_url, max_retries=2, backoff_s=0.01)
        with pytest.raises(BackendError, match="answered 429: the engine is restarting"):
            await backend.generate(QUESTION)
        await backend.aclose()
    assert len(calls) == 3


async def test_client_errors_are_not_retried() -> None:
    app, calls = flaky_app(failures=10, status=400)
    with running(app) as base_url:
        backend = OpenAIBackend("m", base_url=base_url, max_retries=3, backoff_s=0.01)
        with pytest.raises(BackendError, match="answered 400"):
            await backend.generate(QUESTION)
        await backend.aclose()
    assert len(calls) == 1


def test_settings_come_from_the_environment_and_the_key_is_never_described(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gpu-box:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    backend = OpenAIBackend("tiny-student", max_concurrency=8)

    described = backend.describe()
    assert described["kind"] == "openai"
    assert described["model_id"] == "tiny-student"
    assert described["base_url"] == "http://gpu-box:8000/v1"
    assert described["max_concurrency"] == 8
    assert "sk-very-secret" not in repr(described)
    assert not backend.supports_option_scoring


def test_a_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load a tokenizer from .*--tokenizer"):
        OpenAIBackend("tiny-student", base_url="http://127.0.0.1:1/v1", tokenizer=str(tmp_path / "missing"))


def tiny_tokenizer(folder: Path) -> str:
    """A word-level tokenizer with a chat template and a BOS the template renders, saved as an HF folder."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        unk_token="[UNK]",
        bos_token="<s>",
    )
    tokenizer.chat_template = (
        "<s>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


async def test_option_scoring_through_the_completions_endpoint(tmp_path: Path) -> None:
    scoring = ScoringBackend()
    with running(build_app(scoring)) as base_url:
        backend = OpenAIBackend("tiny-student", base_url=base_url, tokenizer=tiny_tokenizer(tmp_path))
        assert backend.supports_option_scoring
        messages = [Message(role="user", content="Which letter? (A) (B) (C)")]
        scores = await backend.score_options(messages, ["A", "B", "C", "BB"])
        tokens = await backend.prompt_logprobs("xyz")
        await backend.aclose()

    # Only the option's own characters count, not the B in the question; the rendered BOS was dropped.
    assert scores == pytest.approx([-2.0, -0.1, -2.0, -0.2])
    assert tokens == [("x", None, 0), ("y", -2.0, 1), ("z", -2.0, 2)]


async def test_server_speaks_openai_errors(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        models = (await http.get("/models")).json()
        unknown = await http.post("/chat/completions", json={"model": "nope", "messages": []})
        streamed = await http.post(
            "/chat/completions", json={"model": "tiny-student", "messages": QUESTION, "stream": True}
        )
        malformed = await http.post("/chat/completions", json={"model": "tiny-student"})
        # The scripted backend neither scores prompts nor continues raw text.
        scoring = await http.post(
            "/completions", json={"model": "tiny-student", "prompt": "x", "echo": True, "logprobs": 1}
        )
        generating = await http.post("/completions", json={"model": "tiny-student", "prompt": "x"})

    assert [m["id"] for m in models["data"]] == ["tiny-student", "tutor"]
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {
            "message": "The model 'nope' does not exist; served: tiny-student, tutor",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    }
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")  # one chunk, then DONE
    assert malformed.status_code == 400
    assert "messages" in malformed.json()["error"]["message"]
    assert scoring.status_code == 400
    assert "prompt (the scripted backend cannot)" in scoring.json()["error"]["message"]
    assert generating.status_code == 400


async def test_server_reports_usage_and_takes_text_parts(url: str, scripted: ScriptedBackend) -> None:
    request = {
        "model": "tutor",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "words"}]}
        ],
        "max_tokens": 7,
        "stop": "###",
    }
    async with httpx.AsyncClient(base_url=url) as http:
        body = (await http.post("/chat/completions", json=request)).json()

    assert body["model"] == "tutor"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "[tutor] TWO WORDS"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    # Unset sampling fields take OpenAI's defaults, not redpen's greedy ones.
    assert scripted.calls[0][1:] == (GenerationSettings(max_new_tokens=7, temperature=1.0, stop=("###",)), "tutor")

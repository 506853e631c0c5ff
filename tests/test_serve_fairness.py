"""The server under hostile or greedy callers: a bad request fails alone, one key's long prompts do not starve
another key, cancelled work stops, and what the server cannot serve in time is refused before any work.

The model is a tiny random Llama (``tests.helpers.build_tiny_model``) in the local backend, so rows really share
its continuous batch; the server runs on loopback in a thread (``tests.test_serve_memory.running``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.store import MistakeMemory
from runtime.cli import app as cli_app
from runtime.defaults import LOCAL_MAX_BATCH
from runtime.errors import BackendError, Overloaded
from runtime.models import scheduling
from runtime.models.backend import Backend, Generation, GenerationSettings, Message
from runtime.models.local import LocalBackend
from runtime.server import Guided, KeyRing, Ledger, ServeLimits, build_app
from tests.helpers import FakeAssistant, build_tiny_model
from tests.test_serve_memory import SlowStudent, auth, running

GREEDY = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def backend(tiny_model: Path) -> LocalBackend:
    return LocalBackend(tiny_model, device="cpu", dtype="float32", chunk_tokens=64)


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys.json")


def chat(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def body(backend: Backend, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": backend.model_id, "messages": chat(text), **extra}


async def as_owner(owner: str, work: Any) -> Any:
    """Await ``work`` (a coroutine) as a request of ``owner``, as the server sends it."""
    with scheduling.on_behalf_of(owner, None):
        return await work


async def until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.001)


def long_text(backend: LocalBackend, tokens: int) -> str:
    """Text of about ``tokens`` tokens once templated."""
    text = " ".join(f"w{i % 97}" for i in range(tokens))
    while backend.prompt_tokens(chat(text)) > tokens:
        text = text[: int(len(text) * 0.95)]
    return text


# ---- a bad request fails alone ----------------------------------------------------------------------------------


async def test_an_unusable_seed_fails_its_own_request_and_not_its_batch(backend: LocalBackend) -> None:
    normal = [backend.generate(chat(f"hello {i}"), GREEDY) for i in range(3)]
    hostile = backend.generate(chat("hi"), GenerationSettings(max_new_tokens=8, temperature=1.0, seed=2**64))
    results = await asyncio.gather(*normal, hostile, return_exceptions=True)
    assert all(isinstance(r, Generation) for r in results[:3]), results
    assert isinstance(results[3], BackendError) and "seed" in str(results[3])


@pytest.mark.parametrize("seed", [2**64, 2**70, -1, 1.5, "x"])
async def test_a_bad_seed_is_a_400_naming_it_and_other_tenants_are_answered(
    backend: LocalBackend, ring: KeyRing, seed: Any
) -> None:
    attacker, other = ring.add("attacker"), ring.add("other")
    with running(build_app(backend, keys=ring)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            hostile = http.post(
                "/chat/completions", json=body(backend, "hi", temperature=1.0, seed=seed), headers=auth(attacker)
            )
            normal = [
                http.post("/chat/completions", json=body(backend, f"question {i}", max_tokens=8), headers=auth(other))
                for i in range(6)
            ]
            responses = await asyncio.gather(hostile, *normal)
    assert responses[0].status_code == 400 and "seed" in responses[0].json()["error"]["message"]
    assert [r.status_code for r in responses[1:]] == [200] * 6


def test_an_echo_prompt_past_the_context_is_a_400_naming_its_length(backend: LocalBackend, ring: KeyRing) -> None:
    key = ring.add("acme")
    prompt = " ".join(f"w{i}" for i in range(20_000))  # ~40k tokens of the tiny tokenizer, under the body limit
    with running(build_app(backend, keys=ring)) as base_url:
        response = httpx.post(
            f"{base_url}/completions",
            json={"model": backend.model_id, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0},
            headers=auth(key),
            timeout=60,
        )
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "the prompt is" in error["message"] and "tokens" in error["message"]


def test_the_api_schema_and_docs_need_a_key(ring: KeyRing) -> None:
    ring.add("acme")
    with running(build_app(SlowStudent(0), keys=ring)) as base_url:
        root = base_url.removesuffix("/v1")
        responses = [httpx.get(f"{root}{path}") for path in ("/docs", "/redoc", "/openapi.json")]
    assert [r.status_code in (401, 404) for r in responses] == [True] * 3
    assert not any("fake-student" in r.text or "chat/completions" in r.text for r in responses)


# ---- one key cannot crowd out another ---------------------------------------------------------------------------


def test_one_key_cannot_fill_the_batch() -> None:
    assert ServeLimits().in_flight_per_key < LOCAL_MAX_BATCH


async def test_feedback_counts_against_the_keys_in_flight_limit(ring: KeyRing, tmp_path: Path) -> None:
    acme, zeta = ring.add("acme"), ring.add("zeta")
    student, memory = SlowStudent(30), MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    guided = Guided(Roles(student, FakeAssistant()), memory, Ledger(tmp_path / "ledger.sqlite"))
    app = build_app(student, keys=ring, limits=ServeLimits(in_flight_per_key=1), guided=guided)
    try:
        with running(app) as base_url:
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                held = asyncio.ensure_future(
                    http.post("/chat/completions", json=body(student, "a question?"), headers=auth(acme))
                )
                await until(lambda: student.started > 0)
                unknown = {"completion_id": "chatcmpl-none", "correct": True}
                limited = await http.post("/feedback", json=unknown, headers=auth(acme))
                other = await http.post("/feedback", json=unknown, headers=auth(zeta))
                held.cancel()
    finally:
        memory.close()
    assert limited.status_code == 429 and "in flight" in limited.json()["error"]["message"]
    assert other.status_code == 404


async def test_a_small_request_is_answered_while_another_keys_long_prompt_prefills(backend: LocalBackend) -> None:
    hog_prompt = chat(long_text(backend, 1900))
    hog_tokens = backend.prompt_tokens(hog_prompt)
    hog = asyncio.ensure_future(as_owner("hog", backend.generate(hog_prompt, GREEDY)))
    await until(lambda: backend.stats["forwards"] > 0)
    small = await as_owner("small", backend.generate(chat("hello"), GenerationSettings(max_new_tokens=4)))
    computed_when_small_done = backend.stats["prefill_tokens"] - small.usage.prompt_tokens
    assert computed_when_small_done < hog_tokens  # the hog's prompt was still being computed
    answer = await hog
    assert answer.usage.prompt_tokens == hog_tokens


async def test_a_long_prompt_decodes_the_same_prefilled_in_chunks(tiny_model: Path, backend: LocalBackend) -> None:
    whole = LocalBackend(tiny_model, device="cpu", dtype="float32", chunk_tokens=4096)
    prompts = [chat(long_text(backend, n)) for n in (300, 900)]
    chunked = await asyncio.gather(*(backend.generate(p, GREEDY) for p in prompts))
    assert backend.stats["forwards"] > 900 / 64
    assert [g.text for g in chunked] == [(await whole.generate(p, GREEDY)).text for p in prompts]


async def test_a_cancelled_request_stops_computing(backend: LocalBackend) -> None:
    prompt = chat(long_text(backend, 1900))
    task = asyncio.ensure_future(backend.generate(prompt, GREEDY))
    await until(lambda: backend.stats["forwards"] > 0)
    task.cancel()
    await until(lambda: not any(len(b) for b in backend._batches.values()))
    computed = backend.stats["prefill_tokens"]
    await asyncio.sleep(0.2)
    assert backend.stats["prefill_tokens"] == computed < backend.prompt_tokens(prompt)


# ---- what cannot be served in time is refused first --------------------------------------------------------------


async def test_a_request_that_cannot_finish_by_its_deadline_is_refused_before_any_work(backend: LocalBackend) -> None:
    await backend.generate(chat("warm up"), GREEDY)  # the backend has measured its speed
    before = dict(backend.stats)
    with scheduling.on_behalf_of("late", time.monotonic() + 1e-4), pytest.raises(Overloaded) as refused:
        await backend.generate(chat(long_text(backend, 1500)), GenerationSettings(max_new_tokens=200))
    assert refused.value.retry_after_s >= 1
    assert backend.stats == before


class Refusing(Backend):
    kind, model_id = "refusing", "refusing"

    async def generate(
        self, messages: Sequence[Message], settings: GenerationSettings = GenerationSettings(), adapter: Any = None
    ) -> Generation:
        raise Overloaded("the server is busy", retry_after_s=7)


def test_an_overloaded_backend_is_a_429_with_retry_after(ring: KeyRing) -> None:
    key = ring.add("acme")
    with running(build_app(Refusing(), keys=ring)) as base_url:
        response = httpx.post(f"{base_url}/chat/completions", json=body(Refusing(), "hi"), headers=auth(key))
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "overloaded"


# ---- small ------------------------------------------------------------------------------------------------------


def test_keys_list_prints_its_count_on_its_own_line(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys.json")
    ring.add("acme")
    ring.add("zeta")
    result = CliRunner().invoke(cli_app, ["serve", "keys", "list", "--state", str(tmp_path)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and len(lines) == 3
    assert [line.split()[0] for line in lines[:2]] == ["acme", "zeta"] and lines[2].startswith("2 keys in ")

"""``redpen serve`` as a library app on loopback (uvicorn in a thread): keys and tenants, memory-guided answers,
feedback, limits and bad requests, through the real ``openai`` client and AutoGen's ``OpenAIChatCompletionClient``.

The student and the study assistant are the scripted fakes of ``tests.helpers``: the student answers (C), wrong,
until a guideline is in its prompt, then (B); the memory is qdrant-client's in-process engine with the hashing
embedder, so every test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agents.serving import TASK
from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.record import MistakeRecord
from memory.store import MistakeMemory, RecordFilter, TenantMemory
from runtime.models.backend import Backend, Decoding, Generation, GenerationSettings, Message, Prompt
from runtime.server import Guided, KeyRing, Ledger, ServeLimits, build_app
from runtime.server.transcripts import Completion
from tests.helpers import STUDENT_RIGHT, STUDENT_WRONG, FakeAssistant, FakeStudent, running

QUESTION = (
    "At the park, a grandmother and her grandson were talking. Who forgot the way home?\n"
    "Options:\n(A) Cannot be determined\n(B) The grandmother\n(C) The grandson"
)
SIMILAR = QUESTION.replace("At the park", "At the market")


class SlowStudent(FakeStudent):
    """The fake student, ``delay_s`` late; counts the calls that were cancelled while it waited."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s, self.started, self.cancelled = delay_s, 0, 0
        self.gone = threading.Event()  # set on a cancellation; the server runs in another thread

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        self.started += 1
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.gone.set()
            raise
        return await super().generate(messages, settings, adapter)


class TrickleStudent(FakeStudent):
    """The fake student, its reply decoded a word every ``step_s`` and handed on as it grows, as the local backend
    streams; ``finished`` is when the last word was decoded."""

    features = frozenset({"stream"})

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s, self.finished = step_s, 0.0

    async def complete(
        self,
        prompt: Prompt,
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        whole = await self.generate(prompt, settings, adapter)  # type: ignore[arg-type]  # chat messages here
        words = whole.text.split(" ")
        for i in range(len(words)):
            await asyncio.sleep(self.step_s)
            if on_text is not None:
                on_text(" ".join(words[: i + 1]))
        self.finished = time.perf_counter()
        return whole


class SmallContext(FakeStudent):
    """A student with a 200-token context and a tokenizer of four characters a token."""

    @property
    def context_length(self) -> int:
        return 200

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m["content"]) for m in messages) // 4


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys.json")


@pytest.fixture
def keys(ring: KeyRing) -> dict[str, str]:
    return {name: ring.add(name) for name in ("acme", "zeta")}


@pytest.fixture
def memory() -> Iterator[MistakeMemory]:
    store = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    yield store
    store.close()


def guided_app(
    student: Backend, memory: MistakeMemory, ring: KeyRing, tmp_path: Path, limits: ServeLimits | None = None
) -> Any:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    return build_app(
        student, keys=ring, limits=limits, guided=Guided(Roles(student, FakeAssistant()), memory, ledger, threshold=0.3)
    )


@pytest.fixture
def url(memory: MistakeMemory, ring: KeyRing, keys: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with running(
        guided_app(FakeStudent(), memory, ring, tmp_path, ServeLimits(max_tokens=64, default_max_tokens=32))
    ) as base_url:
        yield base_url


@pytest.fixture
async def http(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


def chat(question: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-student", "messages": [{"role": "user", "content": question}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_corrected_mistake_guides_the_next_similar_question(url: str, keys: dict[str, str]) -> None:
    client = openai.OpenAI(base_url=url, api_key=keys["acme"], max_retries=0)
    first = client.chat.completions.create(model="fake-student", messages=[{"role": "user", "content": QUESTION}])
    assert first.choices[0].message.content == STUDENT_WRONG
    assert first.model_extra is not None and first.model_extra["redpen"] == {"retrieved": [], "guidance": ""}

    ack = httpx.post(f"{url}/feedback", json={"completion_id": first.id, "gold": "(B)"}, headers=auth(keys["acme"]))
    assert ack.status_code == 200, ack.text
    assert ack.json()["recorded"] is True and ack.json()["duplicate"] is False

    second = client.chat.completions.create(model="fake-student", messages=[{"role": "user", "content": SIMILAR}])
    extension = second.model_extra["redpen"] if second.model_extra else {}
    assert [r["id"] for r in extension["retrieved"]] == [ack.json()["mistake_id"]]
    assert extension["retrieved"][0]["score"] > 0.3
    # The past mistake (its wrong answer, never its gold) and the assistant's guideline came before the question.
    assert (
        f"Wrong answer: {STUDENT_WRONG}" in extension["guidance"]
        and "Guideline: Quote the context first." in (extension["guidance"])
    )
    assert "correct answer" not in extension["guidance"].lower()
    assert second.choices[0].message.content == STUDENT_RIGHT


async def test_a_tenant_never_sees_or_feeds_another_tenants_memory(
    http: httpx.AsyncClient, keys: dict[str, str], memory: MistakeMemory
) -> None:
    asked = (await http.post("/chat/completions", json=chat(), headers=auth(keys["acme"]))).json()
    ack = await http.post("/feedback", json={"completion_id": asked["id"], "gold": "(B)"}, headers=auth(keys["acme"]))
    assert ack.json()["recorded"]

    other = (await http.post("/chat/completions", json=chat(SIMILAR), headers=auth(keys["zeta"]))).json()
    assert other["redpen"]["retrieved"] == []  # the same question, but acme's mistake is not zeta's
    stolen = await http.post(
        "/feedback", json={"completion_id": asked["id"], "gold": "(A)"}, headers=auth(keys["zeta"])
    )
    assert stolen.status_code == 404
    assert stolen.json()["error"]["message"] == f"no completion {asked['id']!r} was served to this key's tenant"

    # Enforced in the memory layer, not only by the handler: zeta's view finds nothing of acme's.
    [record] = memory.list()
    assert record.tenant == "acme" and record.task == TASK
    assert TenantMemory(memory, "zeta").search(SIMILAR) == [] and TenantMemory(memory, "zeta").get(record.id) is None
    assert [h.record.id for h in TenantMemory(memory, "acme").search(SIMILAR)] == [record.id]
    with pytest.raises(ValueError, match="cannot write records of tenant"):
        TenantMemory(memory, "zeta").upsert([record])


async def test_feedback_is_idempotent_per_completion(
    http: httpx.AsyncClient, keys: dict[str, str], memory: MistakeMemory
) -> None:
    asked = (await http.post("/chat/completions", json=chat(), headers=auth(keys["acme"]))).json()
    body = {"completion_id": asked["id"], "gold": "(B)", "note": "the grandmother said so herself"}
    acks = await asyncio.gather(*(http.post("/feedback", json=body, headers=auth(keys["acme"])) for _ in range(5)))
    assert {a.status_code for a in acks} == {200}
    assert len({a.json()["mistake_id"] for a in acks}) == 1
    assert sorted(a.json()["duplicate"] for a in acks) == [False, True, True, True, True]
    later = await http.post("/feedback", json={**body, "gold": "(A)"}, headers=auth(keys["acme"]))
    assert later.json()["mistake_id"] == acks[0].json()["mistake_id"] and later.json()["duplicate"]
    assert memory.count() == 1


async def test_right_answers_make_no_mistake(
    http: httpx.AsyncClient, keys: dict[str, str], memory: MistakeMemory
) -> None:
    for feedback in ({"correct": True}, {"gold": "C"}):  # the student said (C): right by the client's gold
        asked = (await http.post("/chat/completions", json=chat(), headers=auth(keys["acme"]))).json()
        ack = await http.post("/feedback", json={"completion_id": asked["id"], **feedback}, headers=auth(keys["acme"]))
        assert (ack.status_code, ack.json()["recorded"]) == (200, False)
    assert memory.count() == 0
    asked = (await http.post("/chat/completions", json=chat(), headers=auth(keys["acme"]))).json()
    for wrong in ({}, {"correct": False}, {"correct": True, "gold": "(B)"}, {"gold": "  "}):
        response = await http.post(
            "/feedback", json={"completion_id": asked["id"], **wrong}, headers=auth(keys["acme"])
        )
        assert response.status_code == 400, wrong
    unknown = await http.post(
        "/feedback", json={"completion_id": "chatcmpl-nope", "correct": True}, headers=auth(keys["acme"])
    )
    assert unknown.status_code == 404


async def test_every_route_needs_a_key(http: httpx.AsyncClient, url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer rp-not-a-key"}, {"Authorization": "Basic abc"}):
        for method, path, body in (
            ("GET", "/models", None),
            ("POST", "/chat/completions", chat()),
            ("POST", "/feedback", {"completion_id": "x", "correct": True}),
        ):
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, path)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="rp-wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (chat() | {"messages": []}, 400, "messages is empty"),
        (chat() | {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        (chat() | {"messages": [{"role": "user", "content": " "}]}, 400, "nothing to answer"),
        (chat() | {"messages": [{"role": "system", "content": "Be brief."}]}, 400, "nothing to answer"),
        (chat(max_tokens=0), 400, "max_tokens must be >= 1"),
        (chat(max_tokens=-5), 400, "max_tokens must be >= 1"),
        (chat(max_tokens=10**9), 400, "over this server's cap of 64"),
        (chat(temperature=2.5), 400, "temperature must be between 0 and 2"),
        (chat(top_p=0), 400, "top_p must be in (0, 1]"),
        (chat(top_p=1.5), 400, "top_p must be in (0, 1]"),
        (chat(n=2), 400, "plain chats: n unsupported"),
        (chat() | {"model": "nope"}, 404, "The model 'nope' does not exist"),
        ({"model": "fake-student"}, 400, "messages"),
        (chat() | {"messages": "hi"}, 400, "messages"),
    ],
)
async def test_bad_requests_are_4xx_with_a_message(
    http: httpx.AsyncClient, keys: dict[str, str], body: dict[str, Any], status: int, says: str
) -> None:
    response = await http.post("/chat/completions", json=body, headers=auth(keys["acme"]))
    assert response.status_code == status
    assert says in response.json()["error"]["message"]


async def test_bodies_over_the_limit_are_refused_before_parsing(http: httpx.AsyncClient, keys: dict[str, str]) -> None:
    big = chat("x" * 2**20)
    sized = await http.post("/chat/completions", json=big, headers=auth(keys["acme"]))

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b" " * 2**14
        yield b"{}"

    chunked = await http.post("/chat/completions", content=chunks(), headers=auth(keys["acme"]))
    for response in (sized, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


async def test_a_prompt_past_the_context_is_refused(memory: MistakeMemory, ring: KeyRing, tmp_path: Path) -> None:
    key = ring.add("acme")
    # 200 tokens of context: a 64-token reply and 100 tokens of guidance leave 36 for the prompt.
    app = guided_app(
        SmallContext(), memory, ring, tmp_path, ServeLimits(max_tokens=64, default_max_tokens=32, guidance_tokens=100)
    )
    with running(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            short = await http.post("/chat/completions", json=chat("Who? " * 20, max_tokens=8), headers=auth(key))
            long = await http.post("/chat/completions", json=chat("Who? " * 60, max_tokens=64), headers=auth(key))
    assert short.status_code == 200
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert (
        "75 tokens" in long.json()["error"]["message"] and "100 tokens of guidance" in long.json()["error"]["message"]
    )


async def test_in_flight_requests_per_key_are_bounded(memory: MistakeMemory, ring: KeyRing, tmp_path: Path) -> None:
    acme, zeta = ring.add("acme"), ring.add("zeta")
    app = guided_app(SlowStudent(0.5), memory, ring, tmp_path, ServeLimits(in_flight_per_key=2))
    with running(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            first = [
                asyncio.create_task(http.post("/chat/completions", json=chat(), headers=auth(acme))) for _ in range(2)
            ]
            await asyncio.sleep(0.2)
            third = await http.post("/chat/completions", json=chat(), headers=auth(acme))
            other = asyncio.create_task(http.post("/chat/completions", json=chat(), headers=auth(zeta)))
            done = await asyncio.gather(*first, other)
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200, 200, 200]  # another key is not held back


async def test_a_disconnected_client_cancels_its_generation(
    memory: MistakeMemory, ring: KeyRing, tmp_path: Path
) -> None:
    key = ring.add("acme")
    student = SlowStudent(30)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for app in (
        build_app(student, keys=ring),
        build_app(student, keys=ring, guided=Guided(Roles(student, FakeAssistant()), memory, ledger)),
    ):
        student.started = student.cancelled = 0
        student.gone.clear()
        with running(app) as base_url:
            async with httpx.AsyncClient(base_url=base_url) as http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/chat/completions", json=chat(), headers=auth(key), timeout=0.5)
            await asyncio.to_thread(student.gone.wait, 5)
        assert (student.started, student.cancelled) == (1, 1)


async def test_a_request_past_its_timeout_is_cancelled_with_504(ring: KeyRing) -> None:
    key = ring.add("acme")
    student = SlowStudent(30)
    with running(build_app(student, keys=ring, limits=ServeLimits(request_timeout_s=0.3))) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as http:
            response = await http.post("/chat/completions", json=chat(), headers=auth(key), timeout=10)
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert student.cancelled == 1


def test_streaming_gives_the_same_answer_in_chunks(url: str, keys: dict[str, str]) -> None:
    client = openai.OpenAI(base_url=url, api_key=keys["acme"], max_retries=0)
    messages: Any = [{"role": "user", "content": QUESTION}]
    chunks = list(client.chat.completions.create(model="fake-student", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == STUDENT_WRONG
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (
        len({c.id for c in chunks}) == 1 and chunks[-1].model_extra is not None and "redpen" in chunks[-1].model_extra
    )


async def test_a_memory_guided_stream_sends_the_reply_as_the_student_decodes_it(
    memory: MistakeMemory, ring: KeyRing, tmp_path: Path
) -> None:
    key, student = ring.add("acme"), TrickleStudent(step_s=0.05)
    events: list[tuple[float, dict[str, Any]]] = []  # each chunk, with when it arrived
    with running(guided_app(student, memory, ring, tmp_path)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=auth(key), timeout=10) as http:
            async with http.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        events.append((time.perf_counter(), json.loads(line[6:])))
            ack = await http.post("/feedback", json={"completion_id": events[0][1]["id"], "correct": True})
    pieces = [(at, e["choices"][0]["delta"]["content"]) for at, e in events if e["choices"][0]["delta"].get("content")]
    assert len(pieces) > 1 and "".join(text for _, text in pieces) == STUDENT_WRONG
    assert pieces[0][0] < student.finished  # the first piece came while the student was still decoding
    last = events[-1][1]
    assert "redpen" in last and last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"]
    assert ack.status_code == 200  # the streamed completion is in the ledger


async def test_autogen_openai_client_talks_to_the_server(url: str, keys: dict[str, str]) -> None:
    from autogen_core.models import ModelFamily, SystemMessage, UserMessage
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    client = OpenAIChatCompletionClient(
        model="fake-student",
        base_url=url,
        api_key=keys["acme"],
        model_info={
            "vision": False,
            "function_calling": False,
            "json_output": False,
            "family": ModelFamily.UNKNOWN,
            "structured_output": False,
        },
    )
    try:
        result = await client.create(
            [SystemMessage(content="Answer with a letter."), UserMessage(content=QUESTION, source="user")]
        )
    finally:
        await client.close()
    assert result.content == STUDENT_WRONG
    assert result.usage.prompt_tokens > 0


def test_plain_server_has_keys_and_no_feedback(ring: KeyRing) -> None:
    key = ring.add("acme")
    with running(build_app(FakeStudent(), keys=ring)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        answer = client.chat.completions.create(model="fake-student", messages=[{"role": "user", "content": QUESTION}])
        feedback = httpx.post(
            f"{base_url}/feedback", json={"completion_id": answer.id, "gold": "(B)"}, headers=auth(key)
        )
        unauthorised = httpx.post(f"{base_url}/chat/completions", json=chat())
    assert answer.choices[0].message.content == STUDENT_WRONG
    assert answer.model_extra is None or "redpen" not in answer.model_extra
    assert feedback.status_code == 404 and "--memory" in feedback.json()["error"]["message"]
    assert unauthorised.status_code == 401


def test_feedback_survives_a_restart(memory: MistakeMemory, ring: KeyRing, tmp_path: Path) -> None:
    key = ring.add("acme")
    with running(guided_app(FakeStudent(), memory, ring, tmp_path)) as base_url:
        asked = httpx.post(f"{base_url}/chat/completions", json=chat(), headers=auth(key)).json()
    with running(guided_app(FakeStudent(), memory, ring, tmp_path)) as base_url:  # a new app over the same ledger
        ack = httpx.post(f"{base_url}/feedback", json={"completion_id": asked["id"], "gold": "(B)"}, headers=auth(key))
    assert ack.status_code == 200 and ack.json()["recorded"]
    assert memory.count(RecordFilter(tenant="acme")) == 1


async def test_memory_guided_proxy_in_front_of_an_upstream_server(
    memory: MistakeMemory, ring: KeyRing, tmp_path: Path
) -> None:
    """The student is another OpenAI-compatible server (vLLM in production; a plain redpen server here).

    Its client lives on the proxy's event loop (the server thread), which ends with it: nothing to close here.
    """
    from runtime.models.openai_backend import OpenAIBackend

    upstream_keys = KeyRing(tmp_path / "upstream-keys.json")
    upstream_key, key = upstream_keys.add("proxy"), ring.add("acme")
    with running(build_app(FakeStudent(), keys=upstream_keys)) as upstream:
        student = OpenAIBackend("fake-student", base_url=upstream, api_key=upstream_key, max_retries=0)
        with running(guided_app(student, memory, ring, tmp_path)) as base_url:
            async with httpx.AsyncClient(base_url=base_url, headers=auth(key), timeout=10) as http:
                first = (await http.post("/chat/completions", json=chat())).json()
                await http.post("/feedback", json={"completion_id": first["id"], "gold": "(B)"})
                second = (await http.post("/chat/completions", json=chat(SIMILAR))).json()
    assert first["choices"][0]["message"]["content"] == STUDENT_WRONG
    assert len(second["redpen"]["retrieved"]) == 1
    assert second["choices"][0]["message"]["content"] == STUDENT_RIGHT  # guided through the upstream server


def gathered_record(question: str = QUESTION) -> Any:
    """A mistake as `redpen gather` stores it: no tenant, the benchmark's task."""
    return MistakeRecord.make(
        model_id="fake-student",
        source="bbq",
        task="bbq",
        query=question,
        wrong_answer=STUDENT_WRONG,
        gold="(B)",
        reason="The grandson was assumed to be forgetful.",
        guideline="Answer from what the context states.",
        outcome="corrected",
        rounds=1,
    )


@pytest.mark.parametrize("shared", [True, False])
async def test_gathered_mistakes_guide_every_tenant_unless_sharing_is_off(
    memory: MistakeMemory, ring: KeyRing, keys: dict[str, str], tmp_path: Path, shared: bool
) -> None:
    memory.upsert([gathered_record()])
    roles = Roles(FakeStudent(), FakeAssistant())
    app = build_app(
        roles.student, keys=ring, guided=Guided(roles, memory, Ledger(tmp_path / "l.sqlite"), shared=shared)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1") as http:
        replies = [
            (await http.post("/chat/completions", json=chat(), headers=auth(keys[tenant]))).json()
            for tenant in ("acme", "zeta")
        ]
    [record] = memory.list()
    assert [[r["id"] for r in reply["redpen"]["retrieved"]] for reply in replies] == [[record.id] * shared] * 2
    assert TenantMemory(memory, "acme").count() == 0  # read, never written as a tenant's own


async def test_a_feedback_record_carries_the_reason_the_assistant_wrote(
    memory: MistakeMemory, ring: KeyRing, keys: dict[str, str], tmp_path: Path
) -> None:
    # The assistant's feedback gives a guideline only; asked why, it says why.
    assistant = FakeAssistant(
        {
            "Who forgot": '{"guideline": "Answer from what the context states."}',
            "why the student's answer is wrong": "It assumed the young man forgets.",
        }
    )
    roles = Roles(FakeStudent(), assistant)
    app = build_app(roles.student, keys=ring, guided=Guided(roles, memory, Ledger(tmp_path / "l.sqlite")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1") as http:
        asked = (await http.post("/chat/completions", json=chat(), headers=auth(keys["acme"]))).json()
        ack = await http.post(
            "/feedback", json={"completion_id": asked["id"], "gold": "(B)"}, headers=auth(keys["acme"])
        )
    assert ack.json()["recorded"]
    [record] = memory.list()
    assert record.reason == "It assumed the young man forgets."


def test_the_ledger_is_readable_by_the_server_user_only(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_completion(Completion("chatcmpl-1", "acme", "m", "Who?", "(B)"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    ledger.close()
    assert modes and set(modes.values()) == {0o600}, modes

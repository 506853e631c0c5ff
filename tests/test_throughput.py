"""Throughput machinery: the response cache, batched memory writes, and that concurrency changes no answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.examination import retrieve, run_exam
from agents.gathering import MemoryWriter, run_gathering
from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.record import MistakeRecord
from memory.store import MistakeMemory
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage
from runtime.models.cache import CachedBackend
from runtime.models.local import LocalBackend
from tests.helpers import build_tiny_model


class CountingBackend(Backend):
    kind, model_id = "fake", "counting"

    def __init__(self) -> None:
        self.calls = 0

    async def generate(
        self, messages: list[Message], settings: GenerationSettings = GenerationSettings(), adapter: str | None = None
    ) -> Generation:
        self.calls += 1
        return Generation(f"reply {self.calls} to {messages[-1]['content']}", Usage(5, 3), "stop")


async def test_cache_replays_greedy_calls_and_never_sampled_ones(tmp_path: Path) -> None:
    inner = CountingBackend()
    cached = CachedBackend(inner, tmp_path / "responses.sqlite")
    chat: list[Message] = [{"role": "user", "content": "hi"}]
    first = await cached.generate(chat, GenerationSettings(max_new_tokens=8))
    again = await cached.generate(chat, GenerationSettings(max_new_tokens=8))
    assert (first.text, first.usage) == (again.text, again.usage) and inner.calls == 1
    await cached.generate(chat, GenerationSettings(max_new_tokens=9))  # other settings: another key
    await cached.generate(chat, GenerationSettings(max_new_tokens=8), adapter="a")  # other adapter
    assert inner.calls == 3
    sampled = GenerationSettings(max_new_tokens=8, temperature=0.7)
    await cached.generate(chat, sampled)
    await cached.generate(chat, sampled)
    assert inner.calls == 5 and (cached.hits, cached.misses) == (1, 3)
    await cached.aclose()

    reopened = CachedBackend(CountingBackend(), tmp_path / "responses.sqlite")  # persists across processes
    replay = await reopened.generate(chat, GenerationSettings(max_new_tokens=8))
    assert replay.text == first.text and reopened.inner.calls == 0  # type: ignore[attr-defined]


async def test_memory_writer_batches_records_that_arrive_together() -> None:
    import asyncio

    memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    writer = MemoryWriter(memory)
    records = [
        MistakeRecord.make(
            model_id="m",
            source="s",
            task="t",
            query=f"question {i}",
            wrong_answer="(A)",
            gold="(B)",
            reason="",
            guideline="g",
            outcome="uncorrected",
            rounds=1,
        )
        for i in range(12)
    ]
    await asyncio.gather(*(writer.write(r) for r in records))
    assert memory.count() == 12
    assert writer.flushes < 12  # records written in one event-loop tick share upserts
    memory.close()


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    # float32: bf16 kernels may round a batched row differently from the same row alone.
    return LocalBackend(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"), dtype="float32")


def _examples(prefix: str, n: int) -> list[Example]:
    return [
        Example(
            f"{prefix}/{i}",
            f"src/{i % 2}",
            f"Who was late, number {i}?\nOptions:\n(A) red\n(B) blue",
            "(B)" if i % 3 else "(A)",
            "choice",
            ("red", "blue"),
        )
        for i in range(n)
    ]


async def test_concurrent_pipeline_gives_the_same_greedy_answers(tiny_backend: LocalBackend, tmp_path: Path) -> None:
    settings = GenerationSettings(max_new_tokens=12)
    roles = Roles(tiny_backend, tiny_backend, student_settings=settings, assistant_settings=settings)
    gather, examine = _examples("g", 6), _examples("e", 4)

    async def one_pass(name: str, width: int) -> tuple[list[str], list[str], int]:
        memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
        run = RunDir(tmp_path / name, {"pass": name})
        episodes = await run_gathering(gather, roles, memory, run, task="t", rounds=2, concurrency=width)
        hits = retrieve(memory, examine, roles.student_id, "t", 3, None)
        exams = await run_exam(examine, roles, run, "exam.jsonl", mode="assisted", hits=hits, concurrency=width)
        count = memory.count()
        memory.close()
        replies = [t.next_response for e in episodes for t in e.turns]
        return [e.first_answer for e in episodes] + replies, [r.reply for r in exams], count

    before = tiny_backend.stats["forwards"]
    serial = await one_pass("serial", 1)
    serial_forwards = tiny_backend.stats["forwards"] - before
    concurrent = await one_pass("concurrent", 8)
    concurrent_forwards = tiny_backend.stats["forwards"] - before - serial_forwards
    assert serial == concurrent
    assert concurrent_forwards < serial_forwards / 2  # the concurrent pass really shared forward passes


class ServerLike(Backend):
    """A server that serves 100 requests at once; it records how many it had in flight."""

    kind, model_id = "fake", "server"

    def __init__(self) -> None:
        self.in_flight = self.peak = 0

    @property
    def capacity(self) -> int:
        return 100

    async def generate(
        self, messages: list[Message], settings: GenerationSettings = GenerationSettings(), adapter: str | None = None
    ) -> Generation:
        import asyncio

        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        return Generation("The answer is (B).", Usage(5, 3), "stop")


async def test_conversations_in_flight_default_to_what_the_backend_serves(tmp_path: Path) -> None:
    server = ServerLike()
    roles = Roles(server, server)
    results = await run_exam(_examples("e", 80), roles, RunDir(tmp_path, {"pass": "x"}), "exam.jsonl", mode="baseline")
    assert len(results) == 80
    assert server.peak == 80  # not capped at the local batch's 32


async def test_pipeline_bench_profiles_both_passes_against_their_floor(
    tiny_backend: LocalBackend, tmp_path: Path
) -> None:
    from runtime.bench.speed import pipeline_rate

    settings = GenerationSettings(max_new_tokens=12)
    roles = Roles(tiny_backend, tiny_backend, student_settings=settings, assistant_settings=settings)
    result = await pipeline_rate(
        roles, _examples("g", 5), _examples("e", 4), tmp_path, task="t", concurrency=8, generate_concurrency=4
    )
    assert result["identical_answers"] == result["answers_compared"] == 9
    serial, concurrent = result["one_at_a_time"], result["concurrent"]
    assert serial["longest_chain_steps"] == concurrent["longest_chain_steps"] > 0
    # One decode step adds a token to every row, so no pass takes fewer steps than its longest chain of dependent
    # calls; one at a time, each step serves a single row.
    steps = serial["profile"]["decode_steps"], concurrent["profile"]["decode_steps"]
    assert steps[0] > steps[1] >= concurrent["longest_chain_steps"]
    assert serial["profile"]["mean_rows_per_step"] == 1 < concurrent["profile"]["mean_rows_per_step"]
    assert 0 < result["ceiling"]["share_achieved"] and result["ceiling"]["speedup"] > 1
    # The dependencies only lower the ceiling: fewer rows fit a step than a free batch would hold.
    chained = result["chain_ceiling"]
    assert 1 <= chained["speedup"] <= result["ceiling"]["speedup"]
    assert chained["row_tokens"] == serial["profile"]["decode_steps"] == concurrent["profile"]["slot_tokens"]

"""The mistake memory as an AutoGen Memory: query, update_context (never showing the gold answer), add, clear."""

import asyncio
from collections.abc import Iterator

import pytest
from autogen_core.memory import Memory, MemoryContent, MemoryMimeType
from autogen_core.model_context import BufferedChatCompletionContext, UnboundedChatCompletionContext
from autogen_core.models import AssistantMessage, SystemMessage, UserMessage

from memory import HashingEmbedder, MistakeMemory, MistakeMemoryAdapter, RecordFilter, make_record

GOLD = "(C) Tuesday-gold-marker"

RECORDS = [
    make_record(
        model_id="student-a",
        source="bbh/date",
        task="multiple_choice",
        query="Today is Sunday. What day is it two days from now? (A) Monday (B) Friday (C) Tuesday",
        wrong_answer="(A) Monday",
        gold=GOLD,
        reason="counted one day instead of two",
        guideline="count each day forward on your fingers before choosing",
        outcome="corrected",
        rounds=2,
    ),
    make_record(
        model_id="student-b",
        source="bbh/date",
        task="multiple_choice",
        query="Today is Sunday. What day is it two days from now? (A) Monday (B) Friday (C) Tuesday",
        wrong_answer="(B) Friday",
        gold=GOLD,
        reason="guessed",
        guideline="reason step by step",
        outcome="uncorrected",
        rounds=3,
    ),
    make_record(
        model_id="student-a",
        source="gsm8k",
        task="math",
        query="Tom has 3 apples and buys 4 more. How many apples does he have?",
        wrong_answer="6",
        gold="7",
        reason="added wrongly",
        guideline="add the numbers twice to check",
        outcome="corrected",
        rounds=1,
    ),
]


@pytest.fixture
def store() -> Iterator[MistakeMemory]:
    m = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    m.upsert(RECORDS)
    yield m
    m.close()


def test_is_an_autogen_memory(store: MistakeMemory) -> None:
    assert isinstance(MistakeMemoryAdapter(store), Memory)


def test_query_is_scoped_and_hides_the_gold(store: MistakeMemory) -> None:
    adapter = MistakeMemoryAdapter(store, model_id="student-a", source="bbh/date", k=3)
    result = asyncio.run(adapter.query("Today is Sunday. What day is it two days from now?"))
    assert [c.metadata["id"] for c in result.results] == [RECORDS[0].id]
    content = result.results[0]
    assert content.mime_type == MemoryMimeType.JSON
    assert content.content["guideline"] == RECORDS[0].guideline
    assert "gold" not in content.content
    assert 0 < content.metadata["score"] <= 1.0001
    # a MemoryContent query works too, as text or as a record's fields
    as_text = asyncio.run(adapter.query(MemoryContent(content="What day is it", mime_type=MemoryMimeType.TEXT)))
    as_dict = asyncio.run(adapter.query(MemoryContent(content={"query": "What day"}, mime_type=MemoryMimeType.JSON)))
    assert as_text.results[0].metadata["id"] == as_dict.results[0].metadata["id"] == RECORDS[0].id


def test_threshold_set_at_construction(store: MistakeMemory) -> None:
    adapter = MistakeMemoryAdapter(store, model_id="student-a", threshold=0.99)
    assert asyncio.run(adapter.query("apples")).results == []


@pytest.mark.parametrize("context_type", [UnboundedChatCompletionContext, BufferedChatCompletionContext])
def test_update_context_adds_reasons_and_guidelines_never_the_gold(store: MistakeMemory, context_type: type) -> None:
    context = context_type() if context_type is UnboundedChatCompletionContext else context_type(buffer_size=10)
    adapter = MistakeMemoryAdapter(store, model_id="student-a", k=2)

    async def run() -> tuple[list, object]:
        await context.add_message(SystemMessage(content="You are a careful student."))
        await context.add_message(AssistantMessage(content="Ready.", source="student"))
        await context.add_message(
            UserMessage(content="It is Sunday. Which day comes two days from now?", source="examiner")
        )
        result = await adapter.update_context(context)
        return await context.get_messages(), result

    messages, result = asyncio.run(run())
    assert len(messages) == 4 and isinstance(messages[-1], SystemMessage)
    text = messages[-1].content
    assert RECORDS[0].query in text and "Wrong answer: (A) Monday" in text
    assert RECORDS[0].reason in text and RECORDS[0].guideline in text
    assert "gold-marker" not in text
    assert "Wrong answer: (B) Friday" not in text  # another model's mistake
    assert [c.metadata["id"] for c in result.memories.results][0] == RECORDS[0].id
    assert all("gold" not in c.content for c in result.memories.results)


def test_update_context_without_a_match_adds_nothing(store: MistakeMemory) -> None:
    adapter = MistakeMemoryAdapter(store, model_id="nobody")
    context = UnboundedChatCompletionContext()

    async def run() -> tuple[int, int]:
        empty = await adapter.update_context(context)  # no user message yet
        await context.add_message(UserMessage(content="What day is it?", source="examiner"))
        result = await adapter.update_context(context)
        return len(empty.memories.results) + len(result.memories.results), len(await context.get_messages())

    assert asyncio.run(run()) == (0, 1)


def test_add_and_clear_stay_in_scope(store: MistakeMemory) -> None:
    adapter = MistakeMemoryAdapter(store, model_id="student-c", source="gsm8k")
    fields = RECORDS[2].model_dump(mode="json", exclude={"id", "created_at"}) | {"model_id": "student-c"}

    async def run() -> None:
        await adapter.add(MemoryContent(content=fields, mime_type=MemoryMimeType.JSON))
        await adapter.add(MemoryContent(content=RECORDS[2].model_dump_json(), mime_type=MemoryMimeType.JSON))
        with pytest.raises(ValueError, match="dict of MistakeRecord fields"):
            await adapter.add(MemoryContent(content="[1, 2]", mime_type=MemoryMimeType.JSON))

    asyncio.run(run())
    assert store.count() == len(RECORDS) + 1  # RECORDS[2] was already stored: replaced, not duplicated
    assert store.count(RecordFilter(model_id="student-c")) == 1
    asyncio.run(adapter.clear())
    assert store.count() == len(RECORDS) and store.count(RecordFilter(model_id="student-c")) == 0
    asyncio.run(adapter.close())
    assert store.count() == len(RECORDS)  # closing the adapter leaves the shared store open
    asyncio.run(MistakeMemoryAdapter(store).clear())
    assert store.count() == 0

"""Absorbed mistakes: marked in the memory, skipped by retrieval on request, on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory import HashingEmbedder, MistakeMemory, RecordFilter, make_record


def record(i: int):  # noqa: ANN201 - a MistakeRecord
    return make_record(
        model_id="m",
        source="toy",
        task="toy",
        query=f"what is {i} plus {i}?",
        wrong_answer="0",
        gold=str(2 * i),
        reason="added wrong",
        guideline="add the two numbers",
        outcome="corrected",
        rounds=1,
    )


@pytest.mark.parametrize("engine", ["embedded", "client"])
def test_absorbed_records_are_skipped_only_when_asked(engine: str, tmp_path: Path) -> None:
    where = {"path": tmp_path / "mem"} if engine == "embedded" else {"location": ":memory:"}
    with MistakeMemory(**where, embedder=HashingEmbedder()) as store:
        records = [record(i) for i in range(4)]
        store.upsert(records)
        assert store.mark_absorbed([records[0].id, records[1].id], "iter1-abc") == 2
        assert store.get(records[0].id).absorbed_into == "iter1-abc"
        assert store.count() == 4 and store.count(RecordFilter(skip_absorbed=True)) == 2
        hits = store.search_many(["what is 0 plus 0?"], k=4, where=RecordFilter(model_id="m", skip_absorbed=True))[0]
        assert {h.record.id for h in hits} == {records[2].id, records[3].id}
        assert len(store.search_many(["what is 0 plus 0?"], k=4, where=RecordFilter(model_id="m"))[0]) == 4

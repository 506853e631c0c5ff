"""The mistake memory: records, embedders, and the store on both Qdrant engines (embedded Edge and qdrant-client)."""

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import memory.store
from memory import (
    FILTER_FIELDS,
    Embedder,
    HashingEmbedder,
    MistakeMemory,
    MistakeRecord,
    RecordFilter,
    make_record,
    packaged_model_path,
    record_id,
)
from runtime.errors import ConfigError, MemoryStoreError

REPO = Path(__file__).resolve().parents[1]


def rec(
    query: str, model_id: str = "student-a", source: str = "gsm8k", task: str = "math", **kw: object
) -> MistakeRecord:
    fields: dict = dict(
        wrong_answer="41",
        gold="42",
        reason=f"slipped while working out: {query}",
        guideline="write every intermediate result down",
        outcome="corrected",
        rounds=1,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    fields.update(kw)
    return make_record(model_id=model_id, source=source, task=task, query=query, **fields)


# Word sets chosen so the hashing embedder ranks them without ties.
RECORDS = [
    rec("how many apples does tom have after buying three more apples"),
    rec("a train leaves the station at noon travelling sixty miles per hour"),
    rec("what is the area of a rectangle with sides four and five", task="geometry"),
    rec("how many apples does anna have after eating two apples", model_id="student-b"),
    rec("which date is one week after march third", source="bbh/date", task="multiple_choice", gold="(C)"),
    rec("which date is two days before new year", source="bbh/date", task="multiple_choice", model_id="student-b"),
]
QUERIES = [
    "tom buys apples how many apples",
    "train travelling miles per hour",
    "which date is a week after march",
    "area of a rectangle",
    "completely unrelated words zebra quantum",
]


def open_memory(kind: str, tmp_path: Path, **kw: object) -> MistakeMemory:
    if kind == "edge":
        return MistakeMemory(path=tmp_path / "mem", embedder=HashingEmbedder(), **kw)
    return MistakeMemory(location=":memory:", embedder=HashingEmbedder(), **kw)


@pytest.fixture(params=["edge", "inproc"])
def mem(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MistakeMemory]:
    """The same store API on each engine: an embedded Edge shard in tmp_path, and qdrant-client in process."""
    m = open_memory(request.param, tmp_path)
    m.upsert(RECORDS)
    yield m
    m.close()


# -- records --------------------------------------------------------------------------------------------------------


def test_record_id_is_deterministic_over_normalised_query() -> None:
    a = rec("What is  2+2?")
    b = rec("  what is 2+2?\n", wrong_answer="5")
    assert a.id == b.id == record_id("student-a", "gsm8k", "math", "what is 2+2?", "42")
    assert a.id != rec("What is 2+2?", model_id="student-b").id
    assert a.id != rec("What is 2+2?", source="math").id
    assert a.id != rec("What is 2+2?", task="arithmetic").id  # the same item gathered under another task
    assert a.id != rec("What is 2+2?", gold="4").id  # the same input with another target


def test_record_validates_and_is_frozen() -> None:
    with pytest.raises(ValidationError):
        rec("q", outcome="maybe")
    with pytest.raises(ValidationError):
        rec("q", rounds=-1)
    with pytest.raises(ValidationError):
        MistakeRecord(**{**rec("q").model_dump(), "id": "abc"})
    with pytest.raises(ValidationError):
        MistakeRecord(**{**rec("q").model_dump(), "extra": 1})
    r = rec("q")
    with pytest.raises(ValidationError):
        r.query = "other"  # type: ignore[misc]
    assert make_record(**{k: v for k, v in r.model_dump().items() if k not in ("id", "created_at")}).created_at.tzinfo


# -- embedders ------------------------------------------------------------------------------------------------------


def test_hashing_embedder_is_normalised_and_deterministic() -> None:
    e = HashingEmbedder(dim=32)
    v = e.embed(["alpha beta", "alpha beta", "", "gamma"])
    assert v.dtype == np.float32 and v.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v[0], v[1])


def test_embedder_rejects_a_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no modules.json"):
        Embedder(tmp_path)


# -- construction ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "x", "url": "http://localhost:6333"}, "exactly one"),
        ({}, "got none"),
        ({"location": "/tmp/x"}, "must be ':memory:'"),
        ({"path": "x", "api_key": "k"}, "`api_key` goes with `url`"),
    ],
)
def test_argument_errors_are_caught_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MistakeMemory(embedder=HashingEmbedder(), **kwargs)


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_unreachable_server_is_a_memory_store_error() -> None:
    before = set(threading.enumerate())
    with pytest.raises(MemoryStoreError, match="127.0.0.1:9"):
        MistakeMemory(url="http://127.0.0.1:9", embedder=HashingEmbedder())
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=30)  # qdrant-client's version check warns from a thread; let it warn inside this test


def test_wrong_dimension_on_reopen_is_a_memory_store_error(tmp_path: Path) -> None:
    MistakeMemory(path=tmp_path, embedder=HashingEmbedder(dim=64)).close()
    with pytest.raises(MemoryStoreError, match="another embedder"):
        MistakeMemory(path=tmp_path, embedder=HashingEmbedder(dim=32))
    MistakeMemory(path=tmp_path, embedder=HashingEmbedder(dim=64)).close()  # the failed open released the lock


def test_wrong_dimension_on_a_server_collection_is_a_memory_store_error() -> None:
    from qdrant_client import QdrantClient

    client = QdrantClient(location=":memory:")
    memory.store._ClientEngine(client, "mistakes", 64, "test", local=True)
    with pytest.raises(MemoryStoreError, match="not the 32-dim"):
        memory.store._ClientEngine(client, "mistakes", 32, "test", local=True)


# -- the same behaviour on both engines -----------------------------------------------------------------------------


def test_upsert_twice_keeps_one_copy(mem: MistakeMemory) -> None:
    assert mem.count() == len(RECORDS)
    mem.upsert(RECORDS)
    assert mem.count() == len(RECORDS)
    # Re-gathering the same question (other spacing and case) replaces the stored record.
    again = rec("  How many apples does Tom have after buying THREE more apples ", wrong_answer="7")
    assert mem.upsert([again, again]) == 1
    assert mem.count() == len(RECORDS)
    assert mem.get(again.id) == again


def test_search_ranks_and_returns_whole_records(mem: MistakeMemory) -> None:
    hits = mem.search("tom buys apples how many apples", k=2)
    assert len(hits) == 2
    assert hits[0].record == RECORDS[0]
    assert hits[0].score > hits[1].score
    assert mem.search("tom buys apples", k=100)[-1].score <= hits[1].score


def test_filters_on_model_source_and_task(mem: MistakeMemory) -> None:
    assert mem.count(RecordFilter(model_id="student-b")) == 2
    assert mem.count(RecordFilter(source="bbh/date")) == 2
    assert mem.count(RecordFilter(model_id="student-a", task="math")) == 2
    assert mem.count(RecordFilter(model_id="nobody")) == 0
    hits = mem.search("how many apples", k=10, where=RecordFilter(model_id="student-b"))
    assert {h.record.model_id for h in hits} == {"student-b"}
    hits = mem.search("which date", k=10, where=RecordFilter(source="bbh/date", model_id="student-a"))
    assert [h.record for h in hits] == [RECORDS[4]]
    assert [r.id for r in mem.list(RecordFilter(task="geometry"))] == [RECORDS[2].id]


def test_threshold_cuts_results(mem: MistakeMemory) -> None:
    scores = [h.score for h in mem.search("tom buys apples how many apples", k=10)]
    cut = (scores[0] + scores[1]) / 2
    hits = mem.search("tom buys apples how many apples", k=10, threshold=cut)
    assert [h.record.id for h in hits] == [RECORDS[0].id]
    assert mem.search("tom buys apples how many apples", k=10, threshold=1.01) == []


def test_get_delete_and_clear(mem: MistakeMemory) -> None:
    assert mem.get(RECORDS[1].id) == RECORDS[1]
    assert mem.get(record_id("x", "y", "t", "z", "g")) is None
    assert mem.delete([RECORDS[1].id, record_id("x", "y", "t", "z", "g")]) == 1
    assert mem.get(RECORDS[1].id) is None
    assert mem.delete(where=RecordFilter(model_id="student-b")) == 2
    assert mem.count() == len(RECORDS) - 3
    with pytest.raises(ValueError, match="clear"):
        mem.delete()
    with pytest.raises(ValueError, match="not a mistake id"):
        mem.get("abc")
    with pytest.raises(ValueError):
        mem.delete([RECORDS[0].id], where=RecordFilter(model_id="student-a"))
    mem.clear()
    assert mem.count() == 0
    assert mem.search("apples") == []


def test_list_pages_through_in_id_order(mem: MistakeMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.store, "_PAGE", 2)  # force several scroll pages
    ids = sorted(r.id for r in RECORDS)
    assert [r.id for r in mem.list()] == ids
    assert [r.id for r in mem.list(limit=3)] == ids[:3]
    assert [r.id for r in mem.list(RecordFilter(model_id="student-a"), limit=100)] == sorted(
        r.id for r in RECORDS if r.model_id == "student-a"
    )


def test_export_jsonl_round_trips(mem: MistakeMemory, tmp_path: Path) -> None:
    out = tmp_path / "export" / "mistakes.jsonl"
    out.parent.mkdir()
    assert mem.export_jsonl(out) == len(RECORDS)
    back = [MistakeRecord.model_validate_json(line) for line in out.read_text().splitlines()]
    assert sorted(back, key=lambda r: r.id) == sorted(RECORDS, key=lambda r: r.id)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    assert mem.export_jsonl(out, RecordFilter(source="bbh/date")) == 2
    assert len(out.read_text().splitlines()) == 2
    with MistakeMemory(location=":memory:", embedder=HashingEmbedder()) as fresh:
        fresh.upsert(back)
        assert fresh.list() == mem.list()


def test_export_failure_leaves_the_old_file(
    mem: MistakeMemory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "mistakes.jsonl"
    out.write_text("old\n")

    def broken(*args: object, **kwargs: object) -> Iterator[MistakeRecord]:
        yield RECORDS[0]
        raise RuntimeError("disk gone")

    monkeypatch.setattr(mem, "iter_records", broken)
    with pytest.raises(RuntimeError):
        mem.export_jsonl(out)
    assert out.read_text() == "old\n"
    assert list(out.parent.iterdir()) == [out]  # the temporary file is gone too


def test_both_engines_agree(tmp_path: Path) -> None:
    edge, inproc = open_memory("edge", tmp_path), open_memory("inproc", tmp_path)
    try:
        for m in (edge, inproc):
            m.upsert(RECORDS)
        for query in QUERIES:
            for filters in ({}, {"model_id": "student-a"}, {"source": "bbh/date"}, {"task": "math"}):
                where = RecordFilter(**filters)
                # k above the record count: the whole ranking, so no tie straddles the cut at k
                a, b = edge.search(query, k=10, where=where), inproc.search(query, k=10, where=where)
                assert [h.record.id for h in a] == [h.record.id for h in b], (query, filters)
                np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
                assert edge.count(where) == inproc.count(where)
                assert edge.list(where) == inproc.list(where)
    finally:
        edge.close()
        inproc.close()


# -- the embedded engine's folder -----------------------------------------------------------------------------------


def test_embedded_memory_persists_across_reopen(tmp_path: Path) -> None:
    with MistakeMemory(path=tmp_path, embedder=HashingEmbedder()) as m:
        m.upsert(RECORDS)
        before = [h.record.id for h in m.search(QUERIES[0], k=3)]
    with MistakeMemory(path=tmp_path, embedder=HashingEmbedder()) as m:
        assert m.count() == len(RECORDS)
        assert [h.record.id for h in m.search(QUERIES[0], k=3)] == before
        assert m.count(RecordFilter(model_id="student-b")) == 2
        assert set(m._engine.shard.info().payload_schema) == set(FILTER_FIELDS)  # indexed for fast filtered search


def test_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    m = MistakeMemory(path=tmp_path, embedder=HashingEmbedder())
    with pytest.raises(MemoryStoreError, match=rf"is open in this process \(pid {os.getpid()}\)"):
        MistakeMemory(path=tmp_path, embedder=HashingEmbedder())
    m.close()
    m.close()  # closing twice is harmless
    MistakeMemory(path=tmp_path, embedder=HashingEmbedder()).close()


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def test_second_process_gets_a_clear_error(tmp_path: Path) -> None:
    with MistakeMemory(path=tmp_path, embedder=HashingEmbedder()) as m:
        m.upsert(RECORDS)
        child = _run_child(
            "import sys\n"
            "from memory import MistakeMemory, HashingEmbedder\n"
            "from runtime.errors import MemoryStoreError\n"
            "try:\n"
            f"    MistakeMemory(path={str(tmp_path)!r}, embedder=HashingEmbedder())\n"
            "except MemoryStoreError as e:\n"
            "    sys.stdout.write(str(e)); sys.exit(3)\n"
        )
        assert child.returncode == 3, child.stderr
        assert f"memory at {tmp_path.resolve()} is open in another process (pid {os.getpid()})" in child.stdout
        assert m.count() == len(RECORDS)  # the refused opener touched nothing


def test_a_killed_process_leaves_no_stale_lock(tmp_path: Path) -> None:
    child = _run_child(
        "import os\n"
        "from memory import MistakeMemory, HashingEmbedder\n"
        "from tests.test_memory import RECORDS\n"
        f"m = MistakeMemory(path={str(tmp_path)!r}, embedder=HashingEmbedder())\n"
        "m.upsert(RECORDS)\n"
        "os._exit(0)  # no close(): as if the run were killed\n"
    )
    assert child.returncode == 0, child.stderr
    with MistakeMemory(path=tmp_path, embedder=HashingEmbedder()) as m:
        assert m.count() == len(RECORDS)  # and the write-ahead log kept every record


# -- the packaged model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_ranks_a_paraphrase_above_an_unrelated_question(tmp_path: Path) -> None:
    embedder = Embedder()
    assert embedder.model_path == packaged_model_path()
    assert embedder.dim == 384
    vectors = embedder.embed(["a", "b", "c"] * 30)  # more than one batch
    assert vectors.shape == (90, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)

    records = [
        rec("If Jane has 5 apples and gives 2 to Bob, how many apples does she have left?"),
        rec("Which planet in our solar system is known as the Red Planet?", source="trivia"),
    ]
    with MistakeMemory(path=tmp_path, embedder=Embedder(str(packaged_model_path()))) as m:
        m.upsert(records)
        hits = m.search("Jane owned five apples and handed two to Bob. How many remain with her?", k=2)
        assert hits[0].record.id == records[0].id
        assert hits[0].score > hits[1].score + 0.2
        assert json.loads(hits[0].record.model_dump_json())["gold"] == "42"


@pytest.mark.slow
def test_real_minilm_vectors_do_not_depend_on_the_batch_a_text_lands_in() -> None:
    # The CPU default batches 16 texts, a GPU 64: a stored mistake and a later query must embed alike either way,
    # whatever the lengths of their neighbours (padding must not leak into a vector).
    texts = [("word " * n).strip() + f" question {n}?" for n in (1, 3, 9, 27, 81, 200)] * 6
    batched, alone = Embedder(), Embedder(batch_size=1)
    np.testing.assert_allclose(batched.embed(texts), alone.embed(texts), atol=1e-5)
    assert Embedder(batch_size=64).embed(texts).shape == (36, 384)

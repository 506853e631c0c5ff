"""The memory on a Qdrant cluster: a new collection's shards and replicas reach qdrant-client's create call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from memory.embed import HashingEmbedder
from memory.record import make_record
from memory.store import REPLICATION_ENV, SHARDS_ENV, MistakeMemory, RecordFilter
from runtime.errors import ConfigError


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every ``create_collection`` call, which still goes through to the real client."""
    calls: list[dict[str, Any]] = []
    create = QdrantClient.create_collection

    def recording(self: QdrantClient, collection_name: str, **kwargs: Any) -> bool:
        calls.append({"collection_name": collection_name, **kwargs})
        return create(self, collection_name, **kwargs)

    monkeypatch.setattr(QdrantClient, "create_collection", recording)
    monkeypatch.delenv(SHARDS_ENV, raising=False)
    monkeypatch.delenv(REPLICATION_ENV, raising=False)
    return calls


def layout(call: dict[str, Any]) -> tuple[int, int]:
    return call["shard_number"], call["replication_factor"]


def test_one_node_by_default(created: list[dict[str, Any]]) -> None:
    MistakeMemory(location=":memory:", embedder=HashingEmbedder()).close()
    assert [layout(c) for c in created] == [(1, 1)]


def test_the_layout_given_reaches_the_create_call(created: list[dict[str, Any]]) -> None:
    memory = MistakeMemory(
        location=":memory:", collection="team", embedder=HashingEmbedder(), shard_number=6, replication_factor=2
    )
    record = make_record(
        model_id="m", source="bbq/Age", task="bbq", query="Who was late?", wrong_answer="(A)", gold="(B)",
        reason="assumed", guideline="read again", outcome="corrected", rounds=1,
    )  # fmt: skip
    memory.upsert([record])
    hits = memory.search("Who was late?", where=RecordFilter(model_id="m"))
    assert [h.record.id for h in hits] == [record.id]  # still a memory
    memory.close()
    assert [(c["collection_name"], *layout(c)) for c in created] == [("team", 6, 2)]


def test_the_layout_comes_from_the_environment(created: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARDS_ENV, "3")
    monkeypatch.setenv(REPLICATION_ENV, "2")
    MistakeMemory(location=":memory:", embedder=HashingEmbedder()).close()
    MistakeMemory(location=":memory:", embedder=HashingEmbedder(), shard_number=4).close()  # an argument wins
    assert [layout(c) for c in created] == [(3, 2), (4, 2)]
    monkeypatch.setenv(SHARDS_ENV, "three")
    with pytest.raises(ConfigError, match=r"\$REDPEN_MEMORY_SHARDS must be a whole number >= 1, not 'three'"):
        MistakeMemory(location=":memory:", embedder=HashingEmbedder())


def test_the_embedded_memory_refuses_a_cluster_layout(tmp_path: Path, created: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="embedded memory is one shard in one folder: give `url`"):
        MistakeMemory(tmp_path / "mem", embedder=HashingEmbedder(), replication_factor=2)
    with pytest.raises(ConfigError, match="`shard_number` must be >= 1, got 0"):
        MistakeMemory(location=":memory:", embedder=HashingEmbedder(), shard_number=0)
    assert not (tmp_path / "mem").exists() and created == []

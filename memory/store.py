"""The mistake memory: one API over two Qdrant engines.

- embedded (the default): ``MistakeMemory(path=...)`` keeps a Qdrant Edge shard (``qdrant-edge-py``) in a folder,
  in this process, with no server. One process at a time: a file lock in the folder turns a second opener away with
  a clear error instead of letting two writers corrupt the shard.
- server: ``MistakeMemory(url=..., api_key=...)`` talks to a Qdrant server (``qdrant-client``), for memories shared
  by many machines. ``MistakeMemory(location=":memory:")`` runs qdrant-client's in-process engine instead, for tests.
  On a Qdrant cluster a new collection is split into ``shard_number`` shards, each kept on ``replication_factor``
  nodes (``$REDPEN_MEMORY_SHARDS``, ``$REDPEN_MEMORY_REPLICATION``; 1 and 1 by default, for one node).

Both engines store one point per ``MistakeRecord``: the embedding of its query as the vector, the whole record as
the payload, and the record id as the point id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memory.embed import Embedder, TextEmbedder
from memory.record import MistakeRecord
from runtime.defaults import RETRIEVAL_K
from runtime.errors import ConfigError, MemoryStoreError

logger = logging.getLogger(__name__)

# The payload fields retrieval filters on; each gets a keyword index where the engine has payload indexes.
FILTER_FIELDS = ("model_id", "source", "task", "tenant")
# 256 points per write: the batch size Qdrant recommends for upserts, and a comfortable embedding batch.
_BATCH = 256
_PAGE = 1000  # scroll page size for list/export
_EDGE_CONFIG = "edge_config.json"  # what an embedded shard's folder holds once it exists
# A new collection's layout on a Qdrant cluster, when the caller gives none (see MistakeMemory).
SHARDS_ENV, REPLICATION_ENV = "REDPEN_MEMORY_SHARDS", "REDPEN_MEMORY_REPLICATION"

Conditions = dict[str, str | None]  # field -> required value; None: the field must be empty (unset or null)
Payload = dict[str, Any]

# ``tenant=SHARED`` keeps the records of no tenant (made by ``redpen gather``): no tenant is named "" (TenantMemory).
SHARED = ""


@dataclass(frozen=True)
class RecordFilter:
    """Which records a search, count or listing reads: built once by the caller and passed through whole, as
    qdrant-client's one ``Filter``; each engine turns it into its own. A field left None does not filter.

    ``tenant`` keeps only that tenant's records (see :class:`TenantMemory`), ``SHARED`` only those of none;
    ``skip_absorbed`` leaves out records a fine-tuned model has already learned (``absorbed_into`` set).

    >>> RecordFilter(model_id="m", tenant=SHARED, skip_absorbed=True).conditions()
    {'model_id': 'm', 'tenant': None, 'absorbed_into': None}
    """

    model_id: str | None = None
    source: str | None = None
    task: str | None = None
    tenant: str | None = None
    skip_absorbed: bool = False

    def conditions(self) -> Conditions:
        """Field -> the value it must hold; None: the field must be empty. No conditions: every record."""
        given = (("model_id", self.model_id), ("source", self.source), ("task", self.task))
        conditions: Conditions = {k: v for k, v in given if v is not None}
        if self.tenant is not None:
            conditions["tenant"] = None if self.tenant == SHARED else self.tenant
        if self.skip_absorbed:
            conditions["absorbed_into"] = None
        return conditions


EVERY = RecordFilter()  # no conditions: every record


@dataclass(frozen=True)
class Hit:
    """One search result: a past mistake and its cosine similarity to the query."""

    record: MistakeRecord
    score: float


class _Engine(Protocol):
    """What MistakeMemory needs from a storage engine; ids are record ids (UUID strings)."""

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[Payload]) -> None: ...
    def query(
        self, vector: np.ndarray, limit: int, threshold: float | None, where: RecordFilter
    ) -> list[tuple[float, Payload]]: ...
    def count(self, where: RecordFilter) -> int: ...
    def scroll(self, where: RecordFilter, limit: int, offset: str | None) -> tuple[list[Payload], str | None]: ...
    def retrieve(self, ids: list[str]) -> list[Payload]: ...
    def delete_ids(self, ids: list[str]) -> None: ...
    def delete_where(self, where: RecordFilter) -> None: ...
    def close(self) -> None: ...


class _EdgeEngine:
    """A Qdrant Edge shard in a folder (qdrant-edge-py 0.9)."""

    def __init__(self, shard_dir: Path, dim: int) -> None:
        import qdrant_edge as qe

        self.qe = qe
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
        # edge_config.json is written by create(); its presence means the shard exists and must be loaded instead.
        exists = (shard_dir / _EDGE_CONFIG).is_file()
        try:
            if exists:
                # Passing the config makes load() check the stored vector size against the embedder's.
                self.shard = qe.EdgeShard.load(str(shard_dir), config)
            else:
                self.shard = qe.EdgeShard.create(str(shard_dir), config)
                for field in FILTER_FIELDS:
                    self.shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        except Exception as e:  # the bindings raise plain Exception("Service runtime error: ...")
            if "incompatible" in str(e).lower():
                raise MemoryStoreError(
                    f"memory at {shard_dir} was built with another embedder, not this {dim}-dim one ({e}); "
                    "open it with the embedder it was built with, or give a new path"
                ) from e
            raise MemoryStoreError(f"cannot open memory at {shard_dir}: {e}") from e

    def _filter(self, where: RecordFilter) -> Any:
        """Qdrant Edge's filter for ``where``; None (no filter) when it has no conditions."""
        qe = self.qe
        conditions = where.conditions()
        if not conditions:
            return None
        return qe.Filter(
            must=[
                qe.IsEmptyCondition(key=k) if v is None else qe.FieldCondition(key=k, match=qe.MatchValue(v))
                for k, v in conditions.items()
            ]
        )

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[Payload]) -> None:
        qe = self.qe
        points = [qe.Point(i, v.tolist(), p) for i, v, p in zip(ids, vectors, payloads, strict=True)]
        self.shard.update(qe.UpdateOperation.upsert_points(points))

    def query(
        self, vector: np.ndarray, limit: int, threshold: float | None, where: RecordFilter
    ) -> list[tuple[float, Payload]]:
        qe = self.qe
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector.tolist()),
            filter=self._filter(where),
            score_threshold=threshold,
            with_payload=True,
        )
        return [(p.score, p.payload or {}) for p in self.shard.query(request)]  # with_payload: never None

    def count(self, where: RecordFilter) -> int:
        return self.shard.count(self.qe.CountRequest(exact=True, filter=self._filter(where)))

    def scroll(self, where: RecordFilter, limit: int, offset: str | None) -> tuple[list[Payload], str | None]:
        request = self.qe.ScrollRequest(offset=offset, limit=limit, filter=self._filter(where), with_payload=True)
        records, next_offset = self.shard.scroll(request)
        return [r.payload or {} for r in records], None if next_offset is None else str(next_offset)

    def retrieve(self, ids: list[str]) -> list[Payload]:
        return [r.payload or {} for r in self.shard.retrieve(list[Any](ids), with_payload=True, with_vector=False)]

    def delete_ids(self, ids: list[str]) -> None:
        self.shard.update(self.qe.UpdateOperation.delete_points(list[Any](ids)))

    def delete_where(self, where: RecordFilter) -> None:
        # An empty Filter matches every point, which is what clear() wants.
        self.shard.update(self.qe.UpdateOperation.delete_points_by_filter(self._filter(where) or self.qe.Filter()))

    def close(self) -> None:
        self.shard.flush()
        self.shard.close()


class _ClientEngine:
    """A collection on a Qdrant server, or in qdrant-client's in-process engine (``location=":memory:"``)."""

    def __init__(
        self,
        client: Any,
        collection: str,
        dim: int,
        where: str,
        *,
        local: bool,
        create: bool = True,
        shard_number: int = 1,
        replication_factor: int = 1,
    ) -> None:
        from qdrant_client import models
        from qdrant_client.http.exceptions import ApiException

        self.models = models
        self.client = client
        self.collection = collection
        self.where = where
        self._api_errors = ApiException
        with self._errors("open"):
            if client.collection_exists(collection):
                vectors = client.get_collection(collection).config.params.vectors
                size = vectors.size if isinstance(vectors, models.VectorParams) else None
                if size != dim:
                    raise MemoryStoreError(
                        f"collection {collection!r} at {where} holds vectors {vectors!r}, not the {dim}-dim single "
                        "vectors this embedder makes; open it with the embedder it was built with, "
                        "or give another collection"
                    )
            elif not create:
                raise ConfigError(
                    f"no mistake memory at {where} (no collection {collection!r}); check the URL and collection, "
                    "or gather into it first (redpen gather)"
                )
            else:
                # Chosen once, here: Qdrant's cluster API moves shards of an existing collection. The in-process
                # engine takes the layout and ignores it (one process, no nodes).
                client.create_collection(
                    collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                    shard_number=shard_number,
                    replication_factor=replication_factor,
                )
                if not local:  # the in-process engine has no payload indexes (and warns if asked for one)
                    for field in FILTER_FIELDS:
                        client.create_payload_index(collection, field, models.PayloadSchemaType.KEYWORD)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._api_errors as e:
            raise MemoryStoreError(
                f"Qdrant at {self.where} failed to {what}: {e}; is the server running (docker compose up qdrant) "
                "and the URL and API key right?"
            ) from e

    def _filter(self, where: RecordFilter) -> Any:
        """qdrant-client's filter for ``where``; None (no filter) when it has no conditions."""
        m = self.models
        conditions = where.conditions()
        if not conditions:
            return None
        return m.Filter(
            must=[
                m.IsEmptyCondition(is_empty=m.PayloadField(key=k))
                if v is None
                else m.FieldCondition(key=k, match=m.MatchValue(value=v))
                for k, v in conditions.items()
            ]
        )

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[Payload]) -> None:
        points = [
            self.models.PointStruct(id=i, vector=v.tolist(), payload=p)
            for i, v, p in zip(ids, vectors, payloads, strict=True)
        ]
        with self._errors("write"):
            self.client.upsert(self.collection, points=points, wait=True)

    def query(
        self, vector: np.ndarray, limit: int, threshold: float | None, where: RecordFilter
    ) -> list[tuple[float, Payload]]:
        with self._errors("search"):
            response = self.client.query_points(
                self.collection,
                query=vector.tolist(),
                query_filter=self._filter(where),
                limit=limit,
                score_threshold=threshold,
                with_payload=True,
            )
        return [(p.score, p.payload) for p in response.points]

    def count(self, where: RecordFilter) -> int:
        with self._errors("count"):
            found = self.client.count(self.collection, count_filter=self._filter(where))
            return int(found.count)

    def scroll(self, where: RecordFilter, limit: int, offset: str | None) -> tuple[list[Payload], str | None]:
        with self._errors("read"):
            records, next_offset = self.client.scroll(
                self.collection,
                scroll_filter=self._filter(where),
                limit=limit,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
        return [r.payload for r in records], None if next_offset is None else str(next_offset)

    def retrieve(self, ids: list[str]) -> list[Payload]:
        with self._errors("read"):
            return [r.payload for r in self.client.retrieve(self.collection, ids, with_payload=True)]

    def delete_ids(self, ids: list[str]) -> None:
        with self._errors("delete"):
            self.client.delete(self.collection, points_selector=self.models.PointIdsList(points=ids), wait=True)

    def delete_where(self, where: RecordFilter) -> None:
        selector = self.models.FilterSelector(filter=self._filter(where) or self.models.Filter())
        with self._errors("delete"):
            self.client.delete(self.collection, points_selector=selector, wait=True)

    def close(self) -> None:
        self.client.close()


class _FolderLock:
    """An exclusive, non-blocking OS lock on ``<folder>/.lock``, held while the memory is open.

    flock is released by the kernel when the process dies, so a crashed run never leaves a stale lock behind.
    The lock file is never deleted: unlinking it would let a second process lock a fresh file beside the held one.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            where = "this process" if holder == str(os.getpid()) else "another process"
            raise MemoryStoreError(
                f"memory at {folder} is open in {where} (pid {holder}); close it there first, "
                "or use a Qdrant server (url=...) to share one memory between processes"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _cluster_setting(name: str) -> int:
    """A cluster layout number from the environment variable ``name``; 1 (one node) when it is unset."""
    value = os.environ.get(name, "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"${name} must be a whole number >= 1, not {value!r}")
    return int(value)


def _ranked(hits: list[Hit]) -> list[Hit]:
    """Best first. Equal scores (the same query under two sources, say) are ordered by id, so both engines agree;
    rounding hides float noise in the last digits, which differs between the engines."""
    return sorted(hits, key=lambda h: (-round(h.score, 5), h.record.id))


def _point_id(id: str) -> str:
    """A record id in canonical form; the engines disagree on what to do with anything else, so refuse it here."""
    try:
        return str(uuid.UUID(id))
    except ValueError:
        raise ValueError(f"{id!r} is not a mistake id (a UUID from record_id)") from None


class MistakeMemory:
    """Past mistakes, searchable by the similarity of their queries and filterable by model, source and task.

    Give exactly one of ``path`` (embedded Qdrant Edge shard in that folder; the default engine), ``url`` (a Qdrant
    server) or ``location=":memory:"`` (qdrant-client's in-process engine, for tests). ``create=False`` opens only
    a memory that exists (what reading commands want: a mistyped path is an error, and nothing is written there).

    On a Qdrant cluster, a collection this creates is split into ``shard_number`` shards (spread over the nodes;
    more shards than nodes leave room to add nodes later) with each shard kept on ``replication_factor`` nodes (a
    node can go down without losing a shard). Unset, they come from ``$REDPEN_MEMORY_SHARDS`` and
    ``$REDPEN_MEMORY_REPLICATION``, else 1 and 1: one node. The embedded engine is one shard in one folder and
    refuses other values.

    >>> from memory.embed import HashingEmbedder
    >>> from memory.record import make_record
    >>> mem = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    >>> _ = mem.upsert([make_record(model_id="m", source="gsm8k", task="math", query="What is 7 * 8?",
    ...     wrong_answer="54", gold="56", reason="misremembered the table", guideline="check by 7 * 8 = 7 * 4 * 2",
    ...     outcome="corrected", rounds=1)])
    >>> [h.record.wrong_answer for h in mem.search("what is 7 * 8 ?", where=RecordFilter(model_id="m"))]
    ['54']
    >>> mem.close()
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        location: str | None = None,
        collection: str = "mistakes",
        embedder: TextEmbedder | None = None,
        create: bool = True,
        shard_number: int | None = None,
        replication_factor: int | None = None,
    ) -> None:
        given = [name for name, value in (("path", path), ("url", url), ("location", location)) if value is not None]
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of `path` (embedded memory folder), `url` (Qdrant server) or "
                f"`location=':memory:'` (in-process, for tests); got {' and '.join(given) or 'none'}"
            )
        if location is not None and location != ":memory:":
            raise ConfigError(f"`location` must be ':memory:', not {location!r}; use `path` for a folder")
        if api_key is not None and url is None:
            raise ConfigError("`api_key` goes with `url`; an embedded memory has no key")
        if not collection:
            raise ConfigError("`collection` must be a non-empty name")
        for name, value in (("shard_number", shard_number), ("replication_factor", replication_factor)):
            if value is not None and value < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {value}")
        if path is not None and (shard_number or 1, replication_factor or 1) != (1, 1):
            raise ConfigError(
                "`shard_number` and `replication_factor` lay a collection out over a Qdrant cluster; the embedded "
                "memory is one shard in one folder: give `url` (a Qdrant server) to use them"
            )

        self.embedder: TextEmbedder = embedder if embedder is not None else Embedder()
        self.collection = collection
        self._lock = threading.Lock()  # the engines are not documented as safe for concurrent use from threads
        self._folder_lock: _FolderLock | None = None
        self._closed = False
        dim = self.embedder.dim

        if path is not None:
            folder = Path(path).expanduser().resolve()
            if not create and not (folder / collection / _EDGE_CONFIG).is_file():
                raise ConfigError(
                    f"no mistake memory at {folder} (no {collection}/{_EDGE_CONFIG}); check the path, "
                    "or gather into it first (redpen gather --memory FOLDER)"
                )
            folder.mkdir(parents=True, exist_ok=True)
            self.where = str(folder)
            self._folder_lock = _FolderLock(folder)
            try:
                # One shard per collection, in a subfolder, so one memory folder can hold several collections.
                self._engine: _Engine = _EdgeEngine(folder / collection, dim)
            except BaseException:
                self._folder_lock.release()
                raise
        else:
            from qdrant_client import QdrantClient

            self.where = url or ":memory:"
            client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(location=":memory:")
            try:
                self._engine = _ClientEngine(
                    client,
                    collection,
                    dim,
                    self.where,
                    local=url is None,
                    create=create,
                    shard_number=shard_number or _cluster_setting(SHARDS_ENV),
                    replication_factor=replication_factor or _cluster_setting(REPLICATION_ENV),
                )
            except BaseException:
                client.close()
                raise
        logger.info("memory open  %s  collection %s  dim %d  records %d", self.where, collection, dim, self.count())

    # -- writing --------------------------------------------------------------------------------------------------

    def upsert(self, records: Iterable[MistakeRecord]) -> int:
        """Embed and store records, in batches; a record whose id is already stored replaces it. Returns how many."""
        # Deduplicate by id first (last wins), as both engines do across calls, so a batch behaves like a loop.
        unique = list({r.id: r for r in records}.values())
        for start in range(0, len(unique), _BATCH):
            batch = unique[start : start + _BATCH]
            vectors = self.embedder.embed([r.query for r in batch])
            payloads = [r.model_dump(mode="json") for r in batch]
            with self._lock:
                self._engine.upsert([r.id for r in batch], vectors, payloads)
        logger.debug("upserted %d mistakes into %s", len(unique), self.where)
        return len(unique)

    def delete(self, ids: Iterable[str] | None = None, *, where: RecordFilter = EVERY) -> int:
        """Delete records by id, or every record ``where`` keeps; returns how many were deleted.

        Deleting everything takes ``clear()``, so a call that forgot its arguments cannot wipe the memory.
        """
        if (ids is None) == (not where.conditions()):
            raise ValueError("give either `ids` or a filter (where=RecordFilter(...)) to delete; clear() deletes all")
        with self._lock:
            if ids is not None:
                ids = [_point_id(i) for i in ids]
                found = len(self._engine.retrieve(ids)) if ids else 0
                if found:
                    self._engine.delete_ids(ids)
            else:
                found = self._engine.count(where)
                if found:
                    self._engine.delete_where(where)
        return found

    def clear(self) -> None:
        """Delete every record in the collection."""
        with self._lock:
            self._engine.delete_where(EVERY)

    # -- reading --------------------------------------------------------------------------------------------------

    def search(
        self, query_text: str, *, k: int = RETRIEVAL_K, threshold: float | None = None, where: RecordFilter = EVERY
    ) -> list[Hit]:
        """The k stored mistakes ``where`` keeps whose queries are most similar (cosine) to ``query_text``, best
        first. ``threshold`` drops hits scoring below it; None keeps the k nearest however far they are.
        """
        return self.search_many([query_text], k=k, threshold=threshold, where=where)[0]

    def search_many(
        self,
        query_texts: Sequence[str],
        *,
        k: int = RETRIEVAL_K,
        threshold: float | None = None,
        where: RecordFilter = EVERY,
    ) -> list[list[Hit]]:
        """:meth:`search` for many queries, embedded in one batch (embedding costs far more than the search)."""
        if not query_texts:
            return []
        return self.search_vectors(self.embedder.embed(list(query_texts)), k=k, threshold=threshold, where=where)

    def search_vectors(
        self, vectors: Any, *, k: int = RETRIEVAL_K, threshold: float | None = None, where: RecordFilter = EVERY
    ) -> list[list[Hit]]:
        """:meth:`search_many` for queries already embedded (``embedder.embed``), one list of hits per vector."""
        results = []
        for vector in vectors:
            with self._lock:
                found = self._engine.query(vector, k, threshold, where)
            hits = [Hit(MistakeRecord.model_validate(payload), score) for score, payload in found]
            results.append(_ranked(hits))
        return results

    def count(self, where: RecordFilter = EVERY) -> int:
        """Number of stored records ``where`` keeps (all records by default)."""
        with self._lock:
            return self._engine.count(where)

    def mark_absorbed(self, ids: Iterable[str], into: str) -> int:
        """Record that the model ``into`` has learned these mistakes; returns how many records were marked."""
        records = [r for r in (self.get(i) for i in ids) if r is not None]
        return self.upsert(r.model_copy(update={"absorbed_into": into}) for r in records)

    def get(self, id: str) -> MistakeRecord | None:
        """The record with this id, or None."""
        with self._lock:
            payloads = self._engine.retrieve([_point_id(id)])
        return MistakeRecord.model_validate(payloads[0]) if payloads else None

    def iter_records(self, where: RecordFilter = EVERY, *, limit: int | None = None) -> Iterator[MistakeRecord]:
        """Records ``where`` keeps, in id order, read page by page (so 100k records never sit in memory)."""
        offset: str | None = None
        left = limit
        while left is None or left > 0:
            page = _PAGE if left is None else min(_PAGE, left)
            with self._lock:
                payloads, offset = self._engine.scroll(where, page, offset)
            for payload in payloads:
                yield MistakeRecord.model_validate(payload)
            if left is not None:
                left -= len(payloads)
            if offset is None or not payloads:
                return

    def export_jsonl(self, path: str | Path, where: RecordFilter = EVERY) -> int:
        """Write the records ``where`` keeps to ``path`` as JSON lines, in id order; returns how many.

        Written to a temporary file beside ``path`` and renamed, so ``path`` is never left half-written.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        n = 0
        try:
            with tmp.open("w", encoding="utf-8") as f:
                for record in self.iter_records(where):
                    f.write(record.model_dump_json() + "\n")
                    n += 1
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # the file asked for, not the temporary one beside it (FileNotFoundError etc.)
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        logger.info("exported %d mistakes to %s", n, path)
        return n

    def flush(self) -> None:
        """Make every write so far durable on disk: an embedded shard flushes its segments (~30 ms); a server's
        writes are already acknowledged by it (``wait=True``), so there is nothing to do."""
        if isinstance(self._engine, _EdgeEngine):
            with self._lock:
                self._engine.shard.flush()

    def optimize(self) -> None:
        """Build the vector index of an embedded memory; a server (or the in-process engine) needs nothing.

        The embedded engine has no background optimizer, so it searches by brute force until asked: fine for
        filtered searches, but an unfiltered search over 100k records drops from ~15 ms to ~1.5 ms after this
        (which itself took ~100 s for 100k records on a 2-core machine). Run it after a large gather, not per write.
        """
        if isinstance(self._engine, _EdgeEngine):
            start = time.perf_counter()
            with self._lock:
                self._engine.shard.optimize()
            seconds = time.perf_counter() - start
            logger.info("memory optimized  %s  %d records  %.1fs", self.where, self.count(), seconds)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the engine and release the folder lock; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            try:
                self._engine.close()
            finally:
                if self._folder_lock is not None:
                    self._folder_lock.release()

    def __enter__(self) -> MistakeMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MistakeMemory({self.where!r}, collection={self.collection!r})"

    # Defined last: inside the class body the name `list` means this method from here on.
    def list(self, where: RecordFilter = EVERY, *, limit: int | None = None) -> list[MistakeRecord]:
        """Records ``where`` keeps, in id order, at most ``limit`` (all when None)."""
        return [*self.iter_records(where, limit=limit)]


class TenantMemory:
    """One tenant's share of a mistake memory: what the owner of a served API key (``redpen serve``) reads and writes.

    Every search, count and read carries the tenant's filter, and a record stamped with another tenant (or with
    none) is refused on write, so the isolation holds in the memory layer whatever the caller asks for.

    With ``shared`` (the default), searches also read the records of no tenant: the knowledge ``redpen gather`` put
    in the memory before serving, read-only for every tenant and found by similarity whatever its task.

    >>> from memory.embed import HashingEmbedder
    >>> from memory.record import make_record
    >>> mem = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    >>> acme, zeta = TenantMemory(mem, "acme"), TenantMemory(mem, "zeta")
    >>> fields = dict(model_id="m", source="chat", query="What is 7 * 8?", wrong_answer="54",
    ...     gold="56", reason="", guideline="Check the table.", outcome="uncorrected", rounds=1)
    >>> acme.upsert([make_record(**fields, task="serve", tenant="acme")])
    1
    >>> of_m = RecordFilter(model_id="m")
    >>> len(acme.search("what is 7 * 8 ?", where=of_m)), len(zeta.search("what is 7 * 8 ?", where=of_m))
    (1, 0)
    >>> mem.upsert([make_record(**{**fields, "query": "What is 6 * 7?"}, task="gsm8k")])  # gathered: no tenant
    1
    >>> served = RecordFilter(model_id="m", task="serve")
    >>> [len(TenantMemory(mem, "zeta", shared=s).search("what is 6 * 7 ?", where=served)) for s in (True, False)]
    [1, 0]
    >>> mem.close()
    """

    def __init__(self, memory: MistakeMemory, tenant: str, *, shared: bool = True) -> None:
        if not tenant:
            raise ConfigError("a tenant needs a non-empty name")
        self.memory, self.tenant, self.shared = memory, tenant, shared

    def search(
        self, query_text: str, *, k: int = RETRIEVAL_K, threshold: float | None = None, where: RecordFilter = EVERY
    ) -> list[Hit]:
        """This tenant's k mistakes most similar to ``query_text`` that ``where`` keeps, and the shared ones (of any
        task); ``where.tenant`` is this tenant's whatever the caller set."""
        return self.search_many([query_text], k=k, threshold=threshold, where=where)[0]

    def search_many(
        self,
        query_texts: Sequence[str],
        *,
        k: int = RETRIEVAL_K,
        threshold: float | None = None,
        where: RecordFilter = EVERY,
    ) -> list[list[Hit]]:
        if not query_texts:
            return []
        vectors = self.memory.embedder.embed(list(query_texts))
        search = functools.partial(self.memory.search_vectors, vectors, k=k, threshold=threshold)
        own = search(where=replace(where, tenant=self.tenant))
        if not self.shared:
            return own
        shared = search(where=replace(where, task=None, tenant=SHARED))
        return [_ranked(mine + common)[:k] for mine, common in zip(own, shared, strict=True)]

    def upsert(self, records: Iterable[MistakeRecord]) -> int:
        """Store records of this tenant; one stamped with another tenant (a bug) is refused before any is written."""
        records = [*records]
        foreign = sorted({str(r.tenant) for r in records if r.tenant != self.tenant})
        if foreign:
            raise ValueError(f"tenant {self.tenant!r} cannot write records of tenant(s) {', '.join(foreign)}")
        return self.memory.upsert(records)

    def flush(self) -> None:
        self.memory.flush()

    def count(self, where: RecordFilter = EVERY) -> int:
        return self.memory.count(replace(where, tenant=self.tenant))

    def get(self, id: str) -> MistakeRecord | None:
        """The record with this id if it is this tenant's; another tenant's record reads as absent."""
        record = self.memory.get(id)
        return record if record is not None and record.tenant == self.tenant else None

    def iter_records(self, where: RecordFilter = EVERY) -> Iterator[MistakeRecord]:
        return self.memory.iter_records(replace(where, tenant=self.tenant))

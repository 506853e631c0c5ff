"""A response cache on disk, so re-running a command replays the calls it already made instantly.

Only greedy calls are cached: a sampled reply is meant to differ next time. The key covers everything that can
change a greedy reply: the backend and model (folder, dtype or server), the adapter (for the local backend the hash
of its weights and config, so an adapter retrained in place is not answered from the old one's replies), the
messages and the generation settings. SQLite makes each write atomic and lets several processes share the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage


def cache_key(
    identity: dict[str, Any], messages: Sequence[Message], settings: GenerationSettings, adapter: str | None
) -> str:
    """A stable hash of one request.

    >>> s = GenerationSettings(max_new_tokens=8)
    >>> cache_key({"m": 1}, [{"role": "user", "content": "hi"}], s, None) == cache_key(
    ...     {"m": 1}, [{"role": "user", "content": "hi"}], s, None)
    True
    >>> cache_key({"m": 1}, [{"role": "user", "content": "hi"}], s, "a") == cache_key(
    ...     {"m": 1}, [{"role": "user", "content": "hi"}], s, None)
    False
    """
    blob = json.dumps([identity, list(messages), settings.to_dict(), adapter], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedBackend(Backend):
    """Wrap a backend: greedy ``generate`` calls are answered from ``path`` when seen before."""

    def __init__(self, inner: Backend, path: Path) -> None:
        self.inner = inner
        self.kind, self.model_id = inner.kind, inner.model_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        if not settings.greedy:
            return await self.inner.generate(messages, settings, adapter)
        key = cache_key(self.inner.cache_identity(adapter), messages, settings, adapter)
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self.hits += 1
            value = json.loads(row[0])
            return Generation(value["text"], Usage(**value["usage"]), value["finish_reason"])
        self.misses += 1
        generation = await self.inner.generate(messages, settings, adapter)
        value = {"text": generation.text, "usage": vars(generation.usage), "finish_reason": generation.finish_reason}
        await asyncio.to_thread(self._put, key, json.dumps(value))
        return generation

    def _put(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, value))
            self._db.commit()

    @property
    def supports_option_scoring(self) -> bool:
        return self.inner.supports_option_scoring

    @property
    def context_length(self) -> int | None:
        return self.inner.context_length

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        return self.inner.prompt_tokens(messages)

    async def score_options(
        self, messages: Sequence[Message], options: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        return await self.inner.score_options(messages, options, adapter)

    def cache_identity(self, adapter: str | None) -> dict[str, Any]:
        return self.inner.cache_identity(adapter)

    async def aclose(self) -> None:
        await self.inner.aclose()
        with self._lock:
            self._db.close()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "response_cache": True}

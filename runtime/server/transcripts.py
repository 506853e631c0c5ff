"""What a memory-guided server answered and what its clients said about it, in one SQLite file.

Feedback arrives after the answer, maybe after a restart, so each completion's tenant, question and answer are
committed before the answer is sent; each feedback row is committed only after its mistake is in memory, and
only then acknowledged. SQLite in WAL mode with ``synchronous=FULL`` keeps every commit through ``kill -9``
(and a power cut). The primary key on the completion id makes feedback idempotent: a second feedback on one
completion returns the first one's acknowledgement.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    model_id TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    completion_id TEXT PRIMARY KEY REFERENCES completions(id),
    tenant TEXT NOT NULL,
    correct INTEGER NOT NULL,
    gold TEXT,
    note TEXT,
    mistake_id TEXT,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Completion:
    id: str
    tenant: str
    model_id: str
    question: str
    answer: str


@dataclass(frozen=True)
class Feedback:
    completion_id: str
    tenant: str
    correct: bool
    gold: str | None
    note: str | None
    mistake_id: str | None  # the memory record it made; None when the answer was right


class Ledger:
    """The completions and feedback tables; safe to call from several threads (one connection, one lock).

    >>> import tempfile
    >>> ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.sqlite")
    >>> ledger.add_completion(Completion("c1", "acme", "m", "2 + 2?", "5"))
    >>> ledger.completion("c1", "acme").answer, ledger.completion("c1", "zeta")
    ('5', None)
    >>> first = ledger.add_feedback(Feedback("c1", "acme", False, "4", None, "id-1"))
    >>> ledger.add_feedback(Feedback("c1", "acme", False, "6", None, "id-2")) == first  # the first one stays
    True
    >>> ledger.close()
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Tenants' questions and answers: readable by the server's user only, as keys.json. SQLite gives its -wal
        # and -shm files the database file's mode, so creating that file 0600 first covers all three.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)  # a ledger made 0644 by an earlier version is closed too
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def add_completion(self, completion: Completion) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                (
                    completion.id,
                    completion.tenant,
                    completion.model_id,
                    completion.question,
                    completion.answer,
                    time.time(),
                ),
            )

    def completion(self, id: str, tenant: str) -> Completion | None:
        """The completion ``id`` if ``tenant`` asked for it; another tenant's id reads as absent."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, tenant, model_id, question, answer FROM completions WHERE id = ? AND tenant = ?",
                (id, tenant),
            ).fetchone()
        return Completion(*row) if row else None

    def feedback(self, completion_id: str) -> Feedback | None:
        with self._lock:
            row = self._db.execute(
                "SELECT completion_id, tenant, correct, gold, note, mistake_id FROM feedback WHERE completion_id = ?",
                (completion_id,),
            ).fetchone()
        return Feedback(row[0], row[1], bool(row[2]), row[3], row[4], row[5]) if row else None

    def add_feedback(self, feedback: Feedback) -> Feedback:
        """Store ``feedback`` unless the completion has some already; returns the one stored."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    feedback.completion_id,
                    feedback.tenant,
                    int(feedback.correct),
                    feedback.gold,
                    feedback.note,
                    feedback.mistake_id,
                    time.time(),
                ),
            )
        stored = self.feedback(feedback.completion_id)
        assert stored is not None
        return stored

    def counts(self) -> dict[str, int]:
        """Completions, feedback rows, and feedback rows that made a mistake record."""
        with self._lock:
            completions = self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]
            feedback, mistakes = self._db.execute("SELECT COUNT(*), COUNT(mistake_id) FROM feedback").fetchone()
        return {"completions": completions, "feedback": feedback, "mistakes": mistakes}

    def close(self) -> None:
        with self._lock:
            self._db.close()

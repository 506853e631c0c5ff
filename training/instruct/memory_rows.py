"""Memory to weights: a SALAM mistake memory as training rows, and the records a fine-tuned model has absorbed.

A record holds the question as the student saw it, the gold and the study assistant's guideline (rewarded in
gathering). Its row asks the question in the student's format and answers with the guideline, then the gold. After
training, each record the new model answers right *without guidance* is marked ``absorbed_into`` that model, and
``redpen exam --skip-absorbed`` retrieves only what it still gets wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from memory.record import MistakeRecord
from memory.store import MistakeMemory, RecordFilter
from runtime.data.kinds import NUMBER, TEXT, parse_options
from runtime.data.tasks import Example
from runtime.errors import ConfigError

_CHOICE = re.compile(r"^\([A-Z]\)$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def as_example(record: MistakeRecord) -> Example:
    """The record's question as a benchmark item (its id is the record id, so verdicts map back to records)."""
    options = parse_options(record.query)
    if _CHOICE.match(record.gold) and options:
        return Example(record.id, record.source, record.query, record.gold, "choice", options, {"record": True})
    kind = NUMBER if _NUMBER.match(record.gold) else TEXT
    return Example(record.id, record.source, record.query, record.gold, kind.name, (), {"record": True})


def guided_reply(record: MistakeRecord) -> str:
    """The row's reply: the rewarded guideline, then the gold in the student's format."""
    return f"{record.guideline.strip()} The answer is {record.gold}."


class MemorySource:
    """The records of one student in a memory folder, opened only while read or marked (one process at a time)."""

    def __init__(self, path: Path, model_id: str) -> None:
        if not Path(path).is_dir():
            raise ConfigError(f"--memory {path}: no mistake memory there (run `redpen gather` or `redpen run` first)")
        self.path, self.model_id = Path(path), model_id

    def records(self, include_absorbed: bool = False) -> list[MistakeRecord]:
        with MistakeMemory(self.path, create=False) as store:
            records = store.list(RecordFilter(model_id=self.model_id))
        if not any(r.absorbed_into is None for r in records) and not include_absorbed:
            raise ConfigError(f"--memory {self.path} holds no unabsorbed mistakes of {self.model_id}")
        return records if include_absorbed else [r for r in records if r.absorbed_into is None]

    def mark_absorbed(self, ids: Iterable[str], into: str) -> int:
        with MistakeMemory(self.path, create=False) as store:
            return store.mark_absorbed(ids, into)

"""Run directories: config, per-item results as JSON lines, metrics and a report.

Every finished item is appended and flushed to disk before the next is written, so a run killed at any moment
loses at most the items in flight; re-running the same command on the same directory skips what is done.
Whole files (config, metrics, report) are written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from runtime.data.records import CONFIG, RUN_CONFIG_VERSION, RunConfig, read_config
from runtime.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a results file; a torn last line (the process died mid-write) is dropped."""
    if not path.exists():
        return
    # Only b"\n" ends a record: str.splitlines() would also split at U+2028/U+2029/U+0085, which
    # json.dumps(ensure_ascii=False) leaves raw inside strings. Bytes, so a torn UTF-8 character is a torn line.
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError from a cut multi-byte character
            if number == len(lines):
                log.warning("%s:%d is a torn last line; it will be redone", path, number)
                return
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{path}:{number}: not valid JSON ({reason})") from None


class RunDir:
    """One command's output folder. ``identity`` is what must match for a re-run to resume it."""

    def __init__(self, path: Path, identity: dict[str, Any], config: dict[str, Any] | None = None) -> None:
        self.path = path
        identity = json.loads(json.dumps(identity, default=str))  # compare as stored: tuples -> lists, Path -> str
        path.mkdir(parents=True, exist_ok=True)
        config_path = path / CONFIG
        if config_path.exists():
            previous = read_config(config_path)["identity"]
            if previous != identity:
                raise ConfigError(
                    f"{path} holds a run of a different command ({_diff(previous, identity)}); "
                    "use another --out, or delete the folder to start over"
                )
        record = {"version": RUN_CONFIG_VERSION, "identity": identity, **(config or {})}
        write_atomic(config_path, json.dumps(record, indent=2, default=str) + "\n")

    @classmethod
    def create(cls, path: Path, config: RunConfig) -> RunDir:
        """A command's run directory, its typed config written (or, on a re-run, checked against the one there)."""
        return cls(path, config.identity.model_dump(mode="json"), config.info())

    def file(self, name: str) -> Path:
        return self.path / name

    def records(self, name: str) -> list[dict[str, Any]]:
        return list(read_jsonl(self.file(name)))

    def done_ids(self, name: str, key: str = "id") -> set[str]:
        return {r[key] for r in read_jsonl(self.file(name))}

    def repair(self, name: str) -> None:
        """Cut a torn last line left by a killed process, so appends start on a clean line."""
        path = self.file(name)
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def append(self, name: str, record: dict[str, Any]) -> None:
        with self.file(name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.file(name), json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.file(name), text)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


Item = TypeVar("Item", bound=_HasId)


async def complete_pending(
    run: RunDir,
    name: str,
    items: Sequence[Item],
    work: Callable[[Item], Awaitable[dict[str, Any]]],
    *,
    concurrency: int,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``work`` on every item not yet recorded in ``name``, at most ``concurrency`` at once.

    Each record is appended (and flushed) as soon as it is done, so a killed run loses only the items in flight and
    re-running skips the rest. Returns the records of ``items``, old and new, in input order.
    """
    run.repair(name)
    done = run.done_ids(name)
    limit = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> None:
        async with limit:
            record = await work(item)
        run.append(name, record)
        if on_record is not None:
            on_record(record)

    await asyncio.gather(*(one(item) for item in items if item.id not in done))
    by_id = {r["id"]: r for r in run.records(name)}
    return [by_id[item.id] for item in items if item.id in by_id]

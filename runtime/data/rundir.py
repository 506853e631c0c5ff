"""Run directories: config, per-item results as JSON lines, metrics and a report.

Every finished item is appended and flushed to disk before the next is written, so a run killed at any moment
loses at most the items in flight; re-running the same command on the same directory skips what is done.
Whole files (config, metrics, report) are written to a temporary name and renamed, so none is ever half-written.
A run directory is redpen's by its ``config.json`` (a folder of someone else's files is never written into) and
belongs to one process at a time (``.run.lock``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from runtime.data.records import CONFIG, RUN_CONFIG_VERSION, Record, RunConfig, read_config
from runtime.errors import ConfigError, DataError

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)  # the type of a results file's records


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON) for each line of a results file; a torn last line (the process died mid-write) is dropped."""
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
            yield number, json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError from a cut multi-byte character
            if number == len(lines):
                log.warning("%s:%d is a torn last line; it will be redone", path, number)
                return
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{path}:{number}: not valid JSON ({reason})") from None


def read_records(path: Path, model: type[R]) -> list[R]:
    """The records of a results file as the ``model`` objects they were written from; a torn last line is dropped.

    A line that is not such a record is a ``DataError`` naming ``file:line`` and the first field that is wrong.
    """
    records = []
    for number, raw in _lines(path):
        try:
            records.append(model.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DataError(
                f"{path}:{number}: the line is no {model.__name__} ({where or 'the record'}: {first['msg']}), so the "
                "file is not one this redpen command wrote; move it away, or use another --out"
            ) from None
    return records


def read_dataset(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each row of a dataset file, e.g. a training set; blank lines are skipped.

    Strict, unlike ``read_records``: a dataset is not a run being appended to, so a torn or malformed line, the last
    one too, is not work to redo but a damaged file, and training on the rest would be silently wrong. Any line
    that is not one JSON object is a ``DataError`` naming ``file:line``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"dataset {path} does not exist") from None
    rows = []
    for number, line in enumerate(data.split(b"\n"), 1):  # only b"\n" ends a row, as in a results file
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{path}:{number}: not valid JSON ({reason}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


LOCK = ".run.lock"
# What a redpen process leaves in a folder before its config.json exists: the lock, a config being written.
_OURS_BEFORE_CONFIG = frozenset({LOCK, f".{CONFIG}.tmp"})
_HELD: dict[Path, int] = {}  # run folder -> the descriptor whose lock this process holds


def _lock(path: Path) -> None:
    """Hold an exclusive lock on ``path`` for the rest of this process; another process holding it is an error.

    flock is released by the kernel when the process exits or dies, so a killed run never leaves a stale lock.
    The same process may open one run folder many times (a command and its phases); it locks it once.
    """
    key = path.resolve()
    held = _HELD.pop(key, None)
    if held is not None:
        lock_file = path / LOCK
        if lock_file.exists() and os.path.samestat(os.fstat(held), lock_file.stat()):
            _HELD[key] = held
            return
        os.close(held)  # the folder was deleted and made again: lock the new one
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"{path} is in use by another redpen process (pid {holder}); wait for it to finish, or use another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd


def _unlock(path: Path) -> None:
    held = _HELD.pop(path.resolve(), None)
    if held is not None:
        os.close(held)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` will make), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class RunDir:
    """One command's output folder. ``identity`` is what must match for a re-run to resume it.

    Its ``config.json`` marks the folder as redpen's: a non-empty folder without one is someone else's and is
    refused, never written into. One process at a time: the folder is locked (``.run.lock``) until the process
    ends, so a second command on it is turned away before it writes anything. A command that fails before its
    first record leaves nothing behind (``removed_on_failure``).
    """

    def __init__(self, path: Path, identity: dict[str, Any], config: dict[str, Any] | None = None) -> None:
        self.path = path
        identity = json.loads(json.dumps(identity, default=str))  # compare as stored: tuples -> lists, Path -> str
        self._made = _first_missing(path)
        path.mkdir(parents=True, exist_ok=True)
        config_path = path / CONFIG
        # A run this process starts, not one it resumes: only such a run's folder may be removed (removed_on_failure)
        self.new = not config_path.exists()
        self.recorded = False  # whether anything but the config was written through this object
        if self.new:
            foreign = sorted(p.name for p in path.iterdir() if p.name not in _OURS_BEFORE_CONFIG)
            if foreign:
                raise ConfigError(
                    f"{path} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and is not "
                    f"a redpen run directory (no {CONFIG}); give a new or empty --out folder"
                )
        _lock(path)
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

    @contextmanager
    def removed_on_failure(self) -> Iterator[RunDir]:
        """The run's work; on an error before its first record, what starting this run made is removed, so a
        refused or failed command (an unreachable server, a memory it cannot open) leaves no half-made run folder:
        the folders it created, or in a folder that was empty, all that is in it now (the memory of ``redpen run``
        included). A resumed run, and one that recorded anything, is kept whole; so is one stopped by Ctrl-C, which
        says to re-run the command."""
        try:
            yield self
        except Exception:
            if self.new and not self.recorded:
                log.info("%s: nothing was recorded; removing what this run made", self.path)
                _unlock(self.path)
                if self._made is not None:
                    shutil.rmtree(self._made, ignore_errors=True)
                else:
                    for child in self.path.iterdir():
                        if child.is_dir():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
            raise

    def records(self, name: str, model: type[R]) -> list[R]:
        """The records of a results file, as the typed objects that were appended (see :func:`read_records`)."""
        return read_records(self.file(name), model)

    def done_ids(self, name: str, model: type[Record]) -> set[str]:
        """The ids of the ``model`` records a results file holds: what a re-run skips."""
        return {r.id for r in self.records(name, model)}

    def repair(self, name: str) -> None:
        """Cut a torn last line left by a killed process, so appends start on a clean line."""
        path = self.file(name)
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])

    def append(self, name: str, record: Record) -> None:
        self.recorded = True
        with self.file(name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json(), ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, obj: Any) -> None:
        self.recorded = True
        write_atomic(self.file(name), json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self.recorded = True
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
    model: type[R],
    items: Sequence[Item],
    work: Callable[[Item], Awaitable[R]],
    *,
    concurrency: int,
    on_record: Callable[[R], None] | None = None,
) -> list[R]:
    """Run ``work`` on every item not yet recorded in ``name``, at most ``concurrency`` at once.

    Each record is appended (and flushed) as soon as it is done, so a killed run loses only the items in flight and
    re-running skips the rest. Returns the records of ``items``, old and new, as ``model`` objects, in input order.
    """
    run.repair(name)
    done = run.done_ids(name, model)
    limit = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> None:
        async with limit:
            record = await work(item)
        run.append(name, record)
        if on_record is not None:
            on_record(record)

    await asyncio.gather(*(one(item) for item in items if item.id not in done))
    by_id = {r.id: r for r in run.records(name, model)}
    return [by_id[item.id] for item in items if item.id in by_id]

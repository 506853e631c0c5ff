"""`redpen memory`: inspect and manage a mistake memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from runtime.cli.common import (
    MemoryPath,
    MemoryUrl,
    ModelFilter,
    SourceFilter,
    TaskFilter,
    console,
    open_memory,
    out,
)


def memory_count(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
) -> None:
    """Number of stored mistakes (matching the filters)."""
    from memory.store import RecordFilter

    with open_memory(memory, memory_url) as store:
        out.print(store.count(RecordFilter(model_id, source, task)))


def memory_list(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
    limit: Annotated[int, typer.Option(help="at most this many", min=1)] = 20,  # the memory's size caps it
) -> None:
    """Show stored mistakes: source, outcome, question and guideline."""
    from memory.store import RecordFilter

    table = Table(title="mistakes")
    for column in ("source", "outcome", "rounds", "question", "guideline"):
        table.add_column(column, overflow="fold")
    with open_memory(memory, memory_url) as store:
        for r in store.list(RecordFilter(model_id, source, task), limit=limit):
            table.add_row(r.source, r.outcome, str(r.rounds), " ".join(r.query.split())[:80], r.guideline[:80])
    out.print(table)


def memory_export(
    path: Annotated[Path, typer.Argument(help="JSONL file to write")],
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
) -> None:
    """Write the stored mistakes as JSON lines (written whole, or not at all)."""
    from memory.store import RecordFilter

    with open_memory(memory, memory_url) as store:
        n = store.export_jsonl(path, RecordFilter(model_id, source, task))
    console.print(f"exported {n} mistakes to {path}")


def memory_delete(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
) -> None:
    """Delete the mistakes matching the filters (at least one filter is required)."""
    from memory.store import RecordFilter
    from runtime.errors import ConfigError

    if model_id is None and source is None and task is None:
        raise ConfigError("delete needs a filter: --model-id, --source or --task")
    with open_memory(memory, memory_url) as store:
        n = store.count(RecordFilter(model_id, source, task))
        if not yes and not typer.confirm(f"delete {n} mistakes?"):
            raise typer.Abort()
        store.delete(where=RecordFilter(model_id, source, task))
    console.print(f"deleted {n} mistakes")

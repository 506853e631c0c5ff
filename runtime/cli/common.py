"""What every command shares: the consoles, option types, backend and memory loading, progress bars."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)  # progress and tables on stderr; stdout keeps the --json line clean for scripts
out = Console()

Backend = Annotated[str, typer.Option("--backend", help="local (transformers in-process) or openai (any server)")]

Model = Annotated[
    str | None,
    typer.Option(
        "--model", help="local model folder or served model name [default: the embedded SmolLM2-135M-Instruct]"
    ),
]

BaseUrl = Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible server URL ($OPENAI_BASE_URL)")]

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="benchmark data folder ($REDPEN_DATA_DIR)")]

JsonOut = Annotated[bool, typer.Option("--json", help="print the figures as one JSON object on the last line")]

NoCache = Annotated[bool, typer.Option("--no-cache", help="do not replay greedy calls from the response cache")]

Config = Annotated[Path | None, typer.Option("--config", help="TOML with [student] and [assistant] backend tables")]

AssistantBackend = Annotated[
    str | None, typer.Option("--assistant-backend", help="assistant's backend [default: the student's]")
]

AssistantModel = Annotated[str | None, typer.Option("--assistant-model", help="assistant's model")]

AssistantUrl = Annotated[str | None, typer.Option("--assistant-base-url", help="assistant's server URL")]

MemoryPath = Annotated[Path | None, typer.Option("--memory", help="embedded mistake memory folder")]

MemoryUrl = Annotated[
    str | None,
    typer.Option("--memory-url", envvar="REDPEN_MEMORY_URL", help="Qdrant server URL instead of the embedded folder"),
]

Concurrency = Annotated[int, typer.Option(help="conversations in flight at once")]

StudentTokens = Annotated[int | None, typer.Option("--max-new-tokens", help="student reply length [default: 128]")]

ModelFilter = Annotated[str | None, typer.Option("--model-id", help="only this student's mistakes")]

SourceFilter = Annotated[str | None, typer.Option("--source", help="only this source, e.g. bbq/Age")]

TaskFilter = Annotated[str | None, typer.Option("--task", help="only this task, e.g. bbq")]


def with_cache(backend: Any, no_cache: bool) -> Any:
    """Greedy calls replay from the on-disk response cache unless --no-cache."""
    if no_cache:
        return backend
    from runtime.models.cache import CachedBackend
    from runtime.models.default_model import cache_root

    return CachedBackend(backend, cache_root() / "responses.sqlite")


def load_backend(kind: str, model: str | None, base_url: str | None, **extra: Any) -> Any:
    from runtime.errors import ConfigError
    from runtime.models.config import backend_config
    from runtime.models.factory import make_backend

    if kind not in ("local", "openai"):
        raise ConfigError(f"unknown backend {kind!r}: choose --backend local or --backend openai")
    with console.status(f"loading the {kind} backend ..."):
        quiet_transformers()
        return make_backend(backend_config(kind=kind, model=model, base_url=base_url, **extra))


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def load_examples(
    task: str | None, jsonl: Path | None, answer_kind: str, split: str, limit: int | None, data_dir: Path | None
) -> tuple[str, list[Any]]:
    """(name, examples) from a benchmark task or a bring-your-own JSONL file."""
    from runtime.data.paths import resolve_data_dir
    from runtime.data.tasks import load_jsonl, load_task
    from runtime.errors import ConfigError

    if (task is None) == (jsonl is None):
        raise ConfigError("give exactly one of --task NAME or --jsonl FILE")
    if split not in ("gather", "examine", "all"):
        raise ConfigError(f"unknown --split {split!r}: choose gather, examine or all")
    if jsonl is not None:
        if answer_kind not in ("choice", "number", "text"):
            raise ConfigError(f"unknown --answer-kind {answer_kind!r}: choose choice, number or text")
        return jsonl.stem, load_jsonl(jsonl, answer_kind, limit=limit)  # type: ignore[arg-type]
    assert task is not None
    return task, load_task(task, split, resolve_data_dir(data_dir), limit)  # type: ignore[arg-type]


def load_roles(
    config_file: Path | None,
    backend: str,
    model: str | None,
    base_url: str | None,
    assistant_backend: str | None,
    assistant_model: str | None,
    assistant_base_url: str | None,
    max_new_tokens: int | None = None,
    no_cache: bool = False,
    assistant_adapter: str | None = None,
) -> Any:
    """Student and assistant backends; one shared instance when both roles use the same settings.

    ``assistant_adapter`` is a LoRA folder (local backend: loaded as "assistant") or a name the server serves.
    """
    import tomllib

    from agents.team import STUDENT_SETTINGS, Roles
    from runtime.errors import ConfigError
    from runtime.models.config import backend_config
    from runtime.models.factory import make_backend

    tables: dict[str, Any] = {}
    if config_file is not None:
        try:
            tables = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: cannot read the config ({exc})") from None
        unknown = set(tables) - {"student", "assistant"}
        if unknown:
            raise ConfigError(f"{config_file}: unknown table(s) {sorted(unknown)}; expected [student] and [assistant]")
    for kind in (backend, assistant_backend):
        if kind is not None and kind not in ("local", "openai"):
            raise ConfigError(f"unknown backend {kind!r}: choose local or openai")
    student_cfg = backend_config(**{"kind": backend, "model": model, "base_url": base_url, **tables.get("student", {})})
    assistant_values = {"kind": assistant_backend, "model": assistant_model, "base_url": assistant_base_url}
    if all(v is None for v in assistant_values.values()) and "assistant" not in tables:
        assistant_cfg = student_cfg
    else:
        assistant_cfg = backend_config(
            **{
                "kind": assistant_backend or "local",
                "model": assistant_model,
                "base_url": assistant_base_url,
                **tables.get("assistant", {}),
            }
        )
    adapter_name = None
    if assistant_adapter is not None:
        folder = Path(assistant_adapter)
        if assistant_cfg.kind == "local":
            if not (folder / "adapter_config.json").exists():
                raise ConfigError(f"--assistant-adapter: no LoRA adapter folder at {folder}")
            shared = assistant_cfg == student_cfg
            assistant_cfg = assistant_cfg.model_copy(
                update={"adapters": {**assistant_cfg.adapters, "assistant": str(folder)}}
            )
            student_cfg = assistant_cfg if shared else student_cfg  # one model, the adapter chosen per request
            adapter_name = "assistant"
        else:
            adapter_name = assistant_adapter  # served by name, e.g. vLLM --lora-modules NAME=PATH
    with console.status("loading models ..."):
        quiet_transformers()
        student = with_cache(make_backend(student_cfg), no_cache)
        assistant = student if assistant_cfg == student_cfg else with_cache(make_backend(assistant_cfg), no_cache)
    settings = STUDENT_SETTINGS if max_new_tokens is None else replace(STUDENT_SETTINGS, max_new_tokens=max_new_tokens)
    return Roles(student, assistant, assistant_adapter=adapter_name, student_settings=settings)


def open_store(location: dict[str, Any]) -> Any:
    from memory.store import MistakeMemory

    with console.status("opening the mistake memory ..."):
        quiet_transformers()
        return MistakeMemory(**location)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # redpen draws its own progress; per-tensor bars are noise


def accuracy_table(metrics: dict[str, Any]) -> None:
    table = Table(title="accuracy (controls: chance, majority gold)")
    for column in ("source", "n", "accuracy", "no answer", "chance", "majority gold"):
        table.add_column(column, justify="left" if column == "source" else "right")
    rows = [*metrics["by_source"].items(), ("all", metrics["overall"])]
    for source, f in rows:
        chance = f"{f['chance']:.3f}" if f["chance"] is not None else "-"
        table.add_row(
            source, str(f["n"]), f"{f['accuracy']:.3f}", str(f["no_answer"]), chance, f"{f['majority_gold']:.3f}"
        )
    console.print(table)


def phase_bar(bar: Progress) -> Any:
    ids: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in ids:
            ids[phase] = bar.add_task(phase, total=total, info="")
        bar.update(ids[phase], completed=done)

    return update


def train_bar(bar: Progress, max_steps: int) -> Any:
    task_id = bar.add_task("fine-tuning", total=max_steps, info="")

    def on_log(event: dict[str, Any]) -> None:
        if "loss" in event:
            bar.update(task_id, info=f"loss {event['loss']:.4f}")
        elif "step" in event:
            bar.update(task_id, completed=event["step"])

    return on_log


def run_config(run_dir: Path) -> dict[str, Any]:
    from runtime.errors import DataError

    path = run_dir / "config.json"
    if not path.exists():
        raise DataError(f"{run_dir} is not a redpen run directory (no config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def open_memory(memory: Path | None, memory_url: str | None) -> Any:
    from runtime.errors import ConfigError

    if memory is None and memory_url is None:
        raise ConfigError("give the memory: --memory FOLDER (embedded) or --memory-url URL (Qdrant server)")
    if memory is not None and not memory.is_dir():
        raise ConfigError(f"no mistake memory at {memory}")
    return open_store({"url": memory_url} if memory_url else {"path": memory})

"""What every command shares: the consoles, option types, backend and memory loading, progress bars."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from runtime.cli.options import field_option
from runtime.defaults import MOST_IN_FLIGHT, MOST_NEW_TOKENS, STUDENT_MAX_NEW_TOKENS
from runtime.models.config import BackendConfig
from runtime.workflows.experiment_settings import ExperimentSettings
from training.sft_config import LoraSFTConfig

if TYPE_CHECKING:
    from runtime.report import Summary

log = logging.getLogger(__name__)

console = Console(stderr=True)  # progress and tables on stderr; stdout keeps the --json line clean for scripts
out = Console()

# The model a bench's own `redpen serve` serves, passed on as its --model (the commands' roles: cli.options.Role).
Model = Annotated[
    str | None,
    typer.Option(
        "--model", help="local model folder or served model name [default: the embedded SmolLM2-135M-Instruct]"
    ),
]

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="benchmark data folder ($REDPEN_DATA_DIR)")]

JsonOut = Annotated[bool, typer.Option("--json", help="print the figures as one JSON object on the last line")]

NoCache = Annotated[bool, typer.Option("--no-cache", help="do not replay greedy calls from the response cache")]

Config = Annotated[Path | None, typer.Option("--config", help="TOML with [student] and [assistant] backend tables")]

MemoryPath = Annotated[Path | None, typer.Option("--memory", help="embedded mistake memory folder")]

MemoryUrl = Annotated[
    str | None,
    typer.Option("--memory-url", envvar="REDPEN_MEMORY_URL", help="Qdrant server URL instead of the embedded folder"),
]

Concurrency = Annotated[int, typer.Option(help="conversations in flight at once", min=1, max=MOST_IN_FLIGHT)]

# The experiment's settings the SALAM commands take (gather: rounds; exam: k, threshold; run: all), bounded there.
InFlight = Annotated[int | None, field_option(ExperimentSettings, "concurrency")]
Rounds = Annotated[int, field_option(ExperimentSettings, "rounds")]
K = Annotated[int, field_option(ExperimentSettings, "k")]
Threshold = Annotated[float, field_option(ExperimentSettings, "threshold")]

StudentTokens = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        help=f"student reply length [default: {STUDENT_MAX_NEW_TOKENS}]",
        min=1,
        max=MOST_NEW_TOKENS,
    ),
]

Engine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="what runs the student's model folder: local (transformers in this process) or vllm (a vllm serve "
        "redpen starts on the folder, talked to over its OpenAI API)",
    ),
]

AccelerateConfig = Annotated[
    str | None,
    typer.Option(
        "--accelerate-config",
        help="train under `accelerate launch` with this config file, or a shipped one: one-gpu, ddp, fsdp",
    ),
]

# LoRA settings the training commands pass on to the trainings they run.
MaxSteps = Annotated[int, field_option(LoraSFTConfig, "max_steps")]
BaseModel = Annotated[str | None, field_option(LoraSFTConfig, "base_model")]

ModelFilter = Annotated[str | None, typer.Option("--model-id", help="only this student's mistakes")]

SourceFilter = Annotated[str | None, typer.Option("--source", help="only this source, e.g. bbq/Age")]

TaskFilter = Annotated[str | None, typer.Option("--task", help="only this task, e.g. bbq")]

SandboxMode = Annotated[
    str,
    typer.Option(
        "--sandbox",
        help="code tasks (mbpp, humaneval): run each program under bwrap (bubblewrap), or none: unsandboxed, unsafe",
    ),
]


def load_backend(config: BackendConfig, *, no_cache: bool = True) -> Any:
    """One backend under a status line; greedy calls replay from the response cache unless ``no_cache``."""
    from runtime.models.factory import make_backend

    with console.status(f"loading the {config.kind} backend ..."):
        quiet_transformers()
        return make_backend(config, response_cache=not no_cache)


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
    from runtime.data.kinds import jsonl_kinds
    from runtime.data.paths import resolve_data_dir
    from runtime.data.tasks import load_jsonl, load_task
    from runtime.errors import ConfigError

    if (task is None) == (jsonl is None):
        raise ConfigError("give exactly one of --task NAME or --jsonl FILE")
    if split not in ("gather", "examine", "all"):
        raise ConfigError(f"unknown --split {split!r}: choose gather, examine or all")
    if jsonl is not None:
        if answer_kind not in jsonl_kinds():
            raise ConfigError(f"unknown --answer-kind {answer_kind!r}: choose one of {', '.join(jsonl_kinds())}")
        return jsonl.stem, load_jsonl(jsonl, answer_kind, limit=limit)
    assert task is not None
    return task, load_task(task, split, resolve_data_dir(data_dir), limit)  # type: ignore[arg-type]


def use_sandbox(mode: str, code: bool) -> None:
    """Set up the code sandbox before any model loads, when there is code to run: a missing bwrap is an error now,
    not after the model answered; ``--sandbox none`` warns (in the sandbox module) on every run."""
    from runtime.errors import ConfigError

    if mode not in ("bwrap", "none"):
        raise ConfigError(f"unknown --sandbox {mode!r}: choose bwrap or none")
    if code:
        from runtime.data.sandbox import configure

        configure(mode)


def has_code(examples: Any) -> bool:
    from runtime.data.kinds import kind_of

    return any(kind_of(e).code for e in examples)


def code_tokens(max_new_tokens: int | None, examples: Any, sandbox: str) -> int | None:
    """Set up the sandbox for these examples; the student's reply length: as given, else longer for code tasks."""
    from runtime.defaults import CODE_MAX_NEW_TOKENS

    code = has_code(examples)
    use_sandbox(sandbox, code)
    return max_new_tokens if max_new_tokens is not None or not code else CODE_MAX_NEW_TOKENS


def load_roles(config: Any) -> Any:
    """The student and assistant backends of a ``RolesConfig`` (``agents.team``), under a status line."""
    from agents.team import build_roles

    with console.status("loading models ..."):
        quiet_transformers()
        return build_roles(config)


def roles_config(
    config_file: Path | None,
    student: BackendConfig,
    assistant: BackendConfig | None = None,
    *,
    teacher_role: str | None = None,
    **settings: Any,
) -> Any:
    """A ``RolesConfig`` from the role options (``runtime.cli.options.Role``) and a ``--config`` file.

    ``teacher_role`` names what the assistant plays where a teacher is meant ("study assistant", "corrector"):
    given no assistant options or table, it is then the embedded teacher (``teacher_default``).
    """
    from agents.team import RolesConfig

    return RolesConfig.load(
        config_file,
        student=student,
        assistant=assistant,
        default_assistant=(lambda: teacher_default(teacher_role)) if teacher_role else None,
        **settings,
    )


def teacher_default(role: str) -> BackendConfig | None:
    """The backend of a teacher role given no options: the embedded teacher where it is installed, else None (the
    student's model, as before the teacher existed), said in one line. ``REDPEN_TEACHER=off`` turns it off."""
    import os

    from runtime.models.teacher import installed

    if os.environ.get("REDPEN_TEACHER", "").lower() in ("off", "0", "no", "false"):
        return None
    if installed():
        return BackendConfig(kind="teacher")
    console.print(
        f"[dim]the {role} is the student's model: the embedded teacher is not installed (see the README's set-up)[/dim]"
    )
    return None


def student_kind(engine: str, backend: str) -> str:
    """The student's backend kind: ``--engine vllm`` serves its local model folder with vLLM."""
    from runtime.errors import ConfigError
    from runtime.models.engines import check_engine

    check_engine(engine)
    if engine == "local":
        return backend
    if backend != "local":
        raise ConfigError(f"--engine {engine} serves a local model folder: it goes with --backend local, not {backend}")
    return engine


def open_store(location: dict[str, Any], *, create: bool = True) -> Any:
    from memory.store import MistakeMemory

    with console.status("opening the mistake memory ..."):
        quiet_transformers()
        return MistakeMemory(**location, create=create)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # redpen draws its own progress; per-tensor bars are noise
    hf_logging.disable_default_handler()  # its warnings ("`past_key_values` is deprecated") go to redpen's log file
    hf_logging.enable_propagation()


def accuracy_table(metrics: Summary) -> None:
    table = Table(title="accuracy (controls: chance, majority gold)")
    for column in ("source", "n", "accuracy", "no answer", "chance", "majority gold"):
        table.add_column(column, justify="left" if column == "source" else "right")
    rows = [*metrics.by_source.items(), ("all", metrics.overall)]
    for source, f in rows:
        chance = f"{f.chance:.3f}" if f.chance is not None else "-"
        table.add_row(source, str(f.n), f"{f.accuracy:.3f}", str(f.no_answer), chance, _figure(f.majority_gold))
    console.print(table)


def phase_bar(bar: Progress) -> Any:
    """A workflow's ``progress(phase, done, total)``: a bar per phase, and an INFO line each tenth of the way, so
    that ``redpen.log`` (and a terminal that draws no bar) shows how far a long phase has come."""
    ids: dict[str, Any] = {}
    logged: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in ids:
            ids[phase] = bar.add_task(phase, total=total, info="")
        bar.update(ids[phase], completed=done)
        tenth = done * 10 // total if total else 10
        if done and tenth > logged.get(phase, 0):
            logged[phase] = tenth
            log.info("%s %d/%d", phase, done, total)

    return update


def train_bar(bar: Progress) -> Any:
    """A trainer's ``on_log``: the bar appears with the first step (an adapter that is reused draws none)."""
    ids: list[Any] = []

    def on_log(event: dict[str, Any]) -> None:
        if not ids:
            ids.append(bar.add_task("fine-tuning", total=event["max_steps"], info=""))
        if "loss" in event:
            bar.update(ids[0], info=f"loss {event['loss']:.4f}")
        bar.update(ids[0], completed=event["step"])

    return on_log


def open_memory(memory: Path | None, memory_url: str | None) -> Any:
    """An existing mistake memory, for the `memory` commands: a path or URL that holds none is an error."""
    from runtime.errors import ConfigError

    if memory is None and memory_url is None:
        raise ConfigError("give the memory: --memory FOLDER (embedded) or --memory-url URL (Qdrant server)")
    if memory is not None and not memory.is_dir():
        raise ConfigError(f"no mistake memory at {memory}")
    return open_store({"url": memory_url} if memory_url else {"path": memory}, create=False)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

"""SALAM commands: gathering, examination, the whole experiment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from runtime.cli.common import (
    Config,
    DataDir,
    Engine,
    InFlight,
    JsonOut,
    K,
    MemoryPath,
    MemoryUrl,
    NoCache,
    Rounds,
    SandboxMode,
    StudentTokens,
    Threshold,
    accuracy_table,
    code_tokens,
    console,
    load_examples,
    load_roles,
    phase_bar,
    progress_bar,
    roles_config,
    slug,
    student_kind,
)
from runtime.cli.options import ASSISTANT, STUDENT, expand
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD, ROUNDS
from runtime.models.config import BackendConfig

if TYPE_CHECKING:
    from runtime.report import ExperimentFigures


@expand(student=STUDENT, assistant=ASSISTANT)
def gather(
    *,
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own gather JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="at most this many gather examples", min=1)] = None,
    rounds: Rounds = ROUNDS,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/gather-<task>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: InFlight = None,
    max_new_tokens: StudentTokens = None,
    sandbox: SandboxMode = "bwrap",
    no_cache: NoCache = False,
    config: Config = None,
    student: BackendConfig,
    assistant: BackendConfig | None,
    data_dir: DataDir = None,
) -> None:
    """Gather mistakes: student, examiner and assistant talk until the student is right; mistakes go to memory."""
    from runtime.workflows.commands import gather as run_gather

    name, examples = load_examples(task, jsonl, answer_kind, "gather", limit, data_dir)
    max_new_tokens = code_tokens(max_new_tokens, examples, sandbox)
    roles = _roles(config, student, assistant, max_new_tokens, no_cache)
    with progress_bar() as bar:
        outcome = asyncio.run(
            run_gather(
                examples,
                roles,
                out or Path("runs") / slug(f"gather-{name}"),
                task=name,
                limit=limit,
                rounds=rounds,
                memory_path=memory,
                memory_url=memory_url,
                concurrency=concurrency,
                progress=phase_bar(bar),
            )
        )
    f = outcome.figures
    console.print(
        f"episodes {f.episodes}  first answer wrong {f.first_answer_wrong}  corrected {f.corrected}  "
        f"mistakes in memory {f.mistakes_stored}  -> {outcome.run_dir}"
    )


@expand(student=STUDENT, assistant=ASSISTANT)
def exam(
    *,
    mode: Annotated[str, typer.Option(help="baseline (no memory) or assisted (retrieved mistakes)")] = "assisted",
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own examine JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="at most this many examine examples", min=1)] = None,
    memory_task: Annotated[
        str | None, typer.Option(help="the task the mistakes were gathered under [default: --task]")
    ] = None,
    k: K = RETRIEVAL_K,
    threshold: Threshold = RETRIEVAL_THRESHOLD,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/exam-<task>-<mode>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: InFlight = None,
    max_new_tokens: StudentTokens = None,
    sandbox: SandboxMode = "bwrap",
    no_cache: NoCache = False,
    config: Config = None,
    student: BackendConfig,
    assistant: BackendConfig | None,
    assistant_adapter: Annotated[
        str | None, typer.Option(help="trained assistant: LoRA folder (local) or served adapter name (openai)")
    ] = None,
    skip_absorbed: Annotated[
        bool, typer.Option(help="retrieve only mistakes the student has not absorbed (`instruct --strategy memory`)")
    ] = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Examine without the gold: as a baseline, or with the assistant's guidance from retrieved mistakes."""
    from runtime.workflows.commands import examine

    name, examples = load_examples(task, jsonl, answer_kind, "examine", limit, data_dir)
    max_new_tokens = code_tokens(max_new_tokens, examples, sandbox)
    roles = _roles(
        config,
        student,
        assistant,
        max_new_tokens,
        no_cache,
        assistant_adapter=assistant_adapter,
        teacher_role="study assistant" if mode == "assisted" and assistant_adapter is None else None,
    )
    with progress_bar() as bar:
        outcome = asyncio.run(
            examine(
                examples,
                roles,
                out or Path("runs") / slug(f"exam-{name}-{mode}"),
                mode=mode,  # type: ignore[arg-type]  # checked by examine
                task=name,
                limit=limit,
                memory_path=memory,
                memory_url=memory_url,
                memory_task=memory_task,
                k=k,
                threshold=threshold,
                assistant_adapter=assistant_adapter,
                skip_absorbed=skip_absorbed,
                concurrency=concurrency,
                progress=phase_bar(bar),
            )
        )
    accuracy_table(outcome.figures)
    console.print(f"run directory: {outcome.run_dir}")
    if json_out:
        print(json.dumps({"task": name, "mode": mode, **outcome.figures.to_dict()}))


@expand(student=STUDENT, assistant=ASSISTANT)
def run(
    *,
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16, gsm8k")] = None,
    gather_jsonl: Annotated[Path | None, typer.Option(help="bring-your-own gather JSONL (input, target)")] = None,
    examine_jsonl: Annotated[Path | None, typer.Option(help="bring-your-own examine JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for JSONL data: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="examine items (spread across sources)", min=1)] = None,
    gather_limit: Annotated[int | None, typer.Option(help="gather items (spread across sources)", min=1)] = None,
    rounds: Rounds = ROUNDS,
    k: K = RETRIEVAL_K,
    threshold: Threshold = RETRIEVAL_THRESHOLD,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/run-<task>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: InFlight = None,
    max_new_tokens: StudentTokens = None,
    sandbox: SandboxMode = "bwrap",
    no_cache: NoCache = False,
    config: Config = None,
    student: BackendConfig,
    assistant: BackendConfig | None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    engine: Engine = "local",
) -> None:
    """The whole experiment: baseline exam, gathering, assisted exam, controls, report and plot."""
    from runtime.errors import ConfigError
    from runtime.workflows.commands import experiment
    from runtime.workflows.experiment_settings import ExperimentSettings

    if task is not None and (gather_jsonl or examine_jsonl):
        raise ConfigError("give either --task or --gather-jsonl with --examine-jsonl, not both")
    if task is None and (gather_jsonl is None or examine_jsonl is None):
        raise ConfigError("give --task NAME, or both --gather-jsonl FILE and --examine-jsonl FILE")
    name, gather_set = load_examples(task, gather_jsonl, answer_kind, "gather", gather_limit, data_dir)
    _, examine_set = load_examples(task, examine_jsonl, answer_kind, "examine", limit, data_dir)
    max_new_tokens = code_tokens(max_new_tokens, [*gather_set, *examine_set], sandbox)
    student = student.updated(kind=student_kind(engine, student.kind))
    roles = _roles(config, student, assistant, max_new_tokens, no_cache)
    settings = ExperimentSettings(task=name, rounds=rounds, k=k, threshold=threshold, concurrency=concurrency)
    with progress_bar() as bar:
        outcome = asyncio.run(
            experiment(
                gather_set,
                examine_set,
                roles,
                out or Path("runs") / slug(f"run-{name}"),
                settings,
                limit=limit,
                gather_limit=gather_limit,
                memory_path=memory,
                memory_url=memory_url,
                progress=phase_bar(bar),
            )
        )
    figures = outcome.figures
    _experiment_table(figures)
    console.print(f"report: {outcome.run_dir / 'report.md'}  {outcome.run_dir / 'report.html'}")
    if json_out:
        as_json = figures.to_dict()
        summary = {
            k_: as_json[k_]
            for k_ in (
                "task",
                "student",
                "assistant",
                "n_gather",
                "n_examine",
                "near_duplicates",
                "gathering",
                "mistakes_stored",
                "time_s",
                "tokens",
            )
        }
        summary["accuracy"] = {c: figures.conditions[c].overall.accuracy for c in figures.conditions}
        summary["accuracy_without_near_duplicates"] = {
            c: figures.without_near_duplicates[c].overall.accuracy for c in figures.conditions
        }
        summary["run_dir"] = str(outcome.run_dir)
        print(json.dumps(summary))


def _roles(
    config: Path | None,
    student: BackendConfig,
    assistant: BackendConfig | None,
    max_new_tokens: int | None,
    no_cache: bool,
    teacher_role: str | None = "study assistant",
    **settings: Any,
) -> Any:
    """The roles of a SALAM command; the assistant defaults to the embedded teacher (``teacher_role`` given) where it
    is installed."""
    return load_roles(
        roles_config(
            config,
            student,
            assistant,
            student_max_new_tokens=max_new_tokens,
            response_cache=not no_cache,
            teacher_role=teacher_role,
            **settings,
        )
    )


def _experiment_table(figures: ExperimentFigures) -> None:
    table = Table(title=f"{figures.task}: examine accuracy (same items in every column)")
    for column in ("source", "n", "baseline", "assisted", "retrieval-only", "chance"):
        table.add_column(column, justify="left" if column == "source" else "right")
    c = figures.conditions
    for source in [*sorted(c["baseline"].by_source), "all"]:
        row = [
            c[k].overall if source == "all" else c[k].by_source[source]
            for k in ("baseline", "assisted", "retrieval_only")
        ]
        chance = f"{row[0].chance:.3f}" if row[0].chance is not None else "-"
        table.add_row(source, str(row[0].n), *(f"{f.accuracy:.3f}" for f in row), chance)
    console.print(table)
    g = figures.gathering
    console.print(
        f"gathering: {g.episodes} episodes, {g.first_answer_wrong} wrong first answers, "
        f"{g.corrected} corrected; {figures.mistakes_stored} mistakes in memory; "
        f"{figures.near_duplicates}/{figures.n_examine} examine items have a near-duplicate"
    )

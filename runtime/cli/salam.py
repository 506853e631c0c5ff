"""SALAM commands: gathering, examination, the whole experiment."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from runtime.cli.common import (
    AssistantBackend,
    AssistantModel,
    AssistantUrl,
    Backend,
    BaseUrl,
    Concurrency,
    Config,
    DataDir,
    JsonOut,
    MemoryPath,
    MemoryUrl,
    Model,
    NoCache,
    StudentTokens,
    accuracy_table,
    console,
    load_examples,
    load_roles,
    open_store,
    phase_bar,
    progress_bar,
    slug,
)


def gather(
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own gather JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="at most this many gather examples")] = None,
    rounds: Annotated[int, typer.Option(help="feedback rounds per question")] = 3,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/gather-<task>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: Concurrency = 32,
    max_new_tokens: StudentTokens = None,
    no_cache: NoCache = False,
    config: Config = None,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    assistant_backend: AssistantBackend = None,
    assistant_model: AssistantModel = None,
    assistant_base_url: AssistantUrl = None,
    data_dir: DataDir = None,
) -> None:
    """Gather mistakes: student, examiner and assistant talk until the student is right; mistakes go to memory."""
    from agents.experiment import counter, memory_location
    from agents.gathering import run_gathering
    from runtime.data.rundir import RunDir

    name, examples = load_examples(task, jsonl, answer_kind, "gather", limit, data_dir)
    roles = load_roles(
        config,
        backend,
        model,
        base_url,
        assistant_backend,
        assistant_model,
        assistant_base_url,
        max_new_tokens,
        no_cache,
    )
    path = out or Path("runs") / slug(f"gather-{name}")
    location = memory_location(path, memory, memory_url)
    identity = {
        "command": "gather",
        "task": name,
        "limit": limit,
        "rounds": rounds,
        "student": roles.student_id,
        "assistant": roles.assistant_id,
        "student_settings": roles.student_settings.to_dict(),
    }
    run = RunDir(path, identity, {"memory": {k: str(v) for k, v in location.items()}})
    store = open_store(location)
    try:
        with progress_bar() as bar:
            tick = counter(phase_bar(bar), "gathering", len(examples))
            episodes = asyncio.run(
                run_gathering(
                    examples, roles, store, run, task=name, rounds=rounds, concurrency=concurrency, on_episode=tick
                )
            )
        wrong = sum(e["first_verdict"] != "correct" for e in episodes)
        console.print(
            f"episodes {len(episodes)}  first answer wrong {wrong}  corrected "
            f"{sum(e['corrected'] for e in episodes)}  mistakes in memory "
            f"{store.count(model_id=roles.student_id, task=name)}  -> {run.path}"
        )
    finally:
        store.close()


def exam(
    mode: Annotated[str, typer.Option(help="baseline (no memory) or assisted (retrieved mistakes)")] = "assisted",
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own examine JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="at most this many examine examples")] = None,
    memory_task: Annotated[
        str | None, typer.Option(help="the task the mistakes were gathered under [default: --task]")
    ] = None,
    k: Annotated[int, typer.Option(help="mistakes retrieved per question")] = 3,
    threshold: Annotated[float, typer.Option(help="least cosine similarity of a retrieved mistake")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/exam-<task>-<mode>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: Concurrency = 32,
    max_new_tokens: StudentTokens = None,
    no_cache: NoCache = False,
    config: Config = None,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    assistant_backend: AssistantBackend = None,
    assistant_model: AssistantModel = None,
    assistant_base_url: AssistantUrl = None,
    assistant_adapter: Annotated[
        str | None, typer.Option(help="trained assistant: LoRA folder (local) or served adapter name (openai)")
    ] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Examine without the gold: as a baseline, or with the assistant's guidance from retrieved mistakes."""
    from agents.evaluation import render_report, summarize
    from agents.examination import retrieve, run_exam
    from agents.experiment import counter, memory_location
    from runtime.data.rundir import RunDir
    from runtime.errors import ConfigError

    if mode not in ("baseline", "assisted"):
        raise ConfigError(f"unknown --mode {mode!r}: choose baseline or assisted")
    name, examples = load_examples(task, jsonl, answer_kind, "examine", limit, data_dir)
    roles = load_roles(
        config,
        backend,
        model,
        base_url,
        assistant_backend,
        assistant_model,
        assistant_base_url,
        max_new_tokens,
        no_cache,
        assistant_adapter,
    )
    path = out or Path("runs") / slug(f"exam-{name}-{mode}")
    identity = {
        "command": "exam",
        "mode": mode,
        "task": name,
        "limit": limit,
        "student": roles.student_id,
        "assistant": roles.assistant_id,
        "k": k,
        "threshold": threshold,
        "assistant_adapter": assistant_adapter,
        "student_settings": roles.student_settings.to_dict(),
    }
    run = RunDir(path, identity)
    hits = None
    if mode == "assisted":
        if memory is None and memory_url is None:
            raise ConfigError("--mode assisted needs the mistake memory: pass --memory FOLDER or --memory-url URL")
        store = open_store(memory_location(path, memory, memory_url))
        try:
            hits = retrieve(store, examples, roles.student_id, memory_task or name, k, threshold)
        finally:
            store.close()
    started = time.perf_counter()
    with progress_bar() as bar:
        tick = counter(phase_bar(bar), f"{mode} exam", len(examples))
        results = asyncio.run(
            run_exam(
                examples,
                roles,
                run,
                "results.jsonl",
                mode=mode,
                hits=hits,  # type: ignore[arg-type]
                concurrency=concurrency,
                on_result=tick,
            )
        )
    metrics = summarize(results)
    metrics["elapsed_s"] = round(time.perf_counter() - started, 2)
    run.write_json("metrics.json", metrics)
    run.write_text("report.md", render_report(f"redpen exam: {name} ({mode})", identity, metrics))
    accuracy_table(metrics)
    console.print(f"run directory: {run.path}")
    if json_out:
        print(json.dumps({"task": name, "mode": mode, **metrics}))


def run(
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/salam16, gsm8k")] = None,
    gather_jsonl: Annotated[Path | None, typer.Option(help="bring-your-own gather JSONL (input, target)")] = None,
    examine_jsonl: Annotated[Path | None, typer.Option(help="bring-your-own examine JSONL (input, target)")] = None,
    answer_kind: Annotated[str, typer.Option(help="for JSONL data: choice, number or text")] = "choice",
    limit: Annotated[int | None, typer.Option(help="examine items (spread across sources)")] = None,
    gather_limit: Annotated[int | None, typer.Option(help="gather items (spread across sources)")] = None,
    rounds: Annotated[int, typer.Option(help="feedback rounds per gathered question")] = 3,
    k: Annotated[int, typer.Option(help="mistakes retrieved per examine question")] = 3,
    threshold: Annotated[float, typer.Option(help="least cosine similarity of a retrieved mistake")] = 0.5,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/run-<task>]")] = None,
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    concurrency: Concurrency = 32,
    max_new_tokens: StudentTokens = None,
    no_cache: NoCache = False,
    config: Config = None,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    assistant_backend: AssistantBackend = None,
    assistant_model: AssistantModel = None,
    assistant_base_url: AssistantUrl = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """The whole experiment: baseline exam, gathering, assisted exam, controls, report and plot."""
    from agents.experiment import ExperimentSettings, memory_location, run_experiment
    from runtime.data.rundir import RunDir
    from runtime.errors import ConfigError
    from runtime.report.experiment import plot_experiment, render_experiment

    if task is not None and (gather_jsonl or examine_jsonl):
        raise ConfigError("give either --task or --gather-jsonl with --examine-jsonl, not both")
    if task is None:
        if gather_jsonl is None or examine_jsonl is None:
            raise ConfigError("give --task NAME, or both --gather-jsonl FILE and --examine-jsonl FILE")
        name, gather_set = load_examples(None, gather_jsonl, answer_kind, "gather", gather_limit, data_dir)
        _, examine_set = load_examples(None, examine_jsonl, answer_kind, "examine", limit, data_dir)
    else:
        name, gather_set = load_examples(task, None, answer_kind, "gather", gather_limit, data_dir)
        _, examine_set = load_examples(task, None, answer_kind, "examine", limit, data_dir)
    if not gather_set or not examine_set:
        raise ConfigError(f"{name}: the gather and examine sets must both have examples")
    roles = load_roles(
        config,
        backend,
        model,
        base_url,
        assistant_backend,
        assistant_model,
        assistant_base_url,
        max_new_tokens,
        no_cache,
    )
    settings = ExperimentSettings(task=name, rounds=rounds, k=k, threshold=threshold, concurrency=concurrency)
    path = out or Path("runs") / slug(f"run-{name}")
    location = memory_location(path, memory, memory_url)
    identity = {
        "command": "run",
        "task": name,
        "limit": limit,
        "gather_limit": gather_limit,
        "rounds": rounds,
        "k": k,
        "threshold": threshold,
        "student": roles.student_id,
        "assistant": roles.assistant_id,
        "student_settings": roles.student_settings.to_dict(),
    }
    run_dir = RunDir(
        path,
        identity,
        {
            "memory": {k_: str(v) for k_, v in location.items()},
            "student_backend": roles.student.describe(),
            "assistant_backend": roles.assistant.describe(),
        },
    )
    store = open_store(location)
    try:
        with progress_bar() as bar:
            figures = asyncio.run(
                run_experiment(gather_set, examine_set, roles, store, run_dir, settings, progress=phase_bar(bar))
            )
    finally:
        store.close()
    run_dir.write_json("figures.json", figures)
    run_dir.write_text("report.md", render_experiment(figures, identity))
    plot_experiment(figures, run_dir.file("accuracy.png"))
    _experiment_table(figures)
    console.print(f"report: {run_dir.file('report.md')}  plot: {run_dir.file('accuracy.png')}")
    if json_out:
        summary = {
            k_: figures[k_]
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
        summary["accuracy"] = {c: figures["conditions"][c]["overall"]["accuracy"] for c in figures["conditions"]}
        summary["accuracy_without_near_duplicates"] = {
            c: figures["without_near_duplicates"][c]["overall"]["accuracy"] for c in figures["conditions"]
        }
        summary["run_dir"] = str(run_dir.path)
        print(json.dumps(summary))


def _experiment_table(figures: dict[str, Any]) -> None:
    table = Table(title=f"{figures['task']}: examine accuracy (same items in every column)")
    for column in ("source", "n", "baseline", "assisted", "retrieval-only", "chance"):
        table.add_column(column, justify="left" if column == "source" else "right")
    c = figures["conditions"]
    for source in [*sorted(c["baseline"]["by_source"]), "all"]:
        row = [
            c[k]["overall"] if source == "all" else c[k]["by_source"][source]
            for k in ("baseline", "assisted", "retrieval_only")
        ]
        chance = f"{row[0]['chance']:.3f}" if row[0]["chance"] is not None else "-"
        table.add_row(source, str(row[0]["n"]), *(f"{f['accuracy']:.3f}" for f in row), chance)
    console.print(table)
    g = figures["gathering"]
    console.print(
        f"gathering: {g['episodes']} episodes, {g['first_answer_wrong']} wrong first answers, "
        f"{g['corrected']} corrected; {figures['mistakes_stored']} mistakes in memory; "
        f"{figures['near_duplicates']}/{figures['n_examine']} examine items have a near-duplicate"
    )

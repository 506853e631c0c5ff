"""The ``redpen`` command line. Only this module prints; library code logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from runtime.errors import RedpenError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything loads from packages and local folders

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="redpen: make language models learn from their own mistakes.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed, printed as ratios from one run.")
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(no_args_is_help=True, help="Inspect and manage a mistake memory.")
app.add_typer(memory_app, name="memory")
console = Console(stderr=True)  # progress and tables on stderr; stdout keeps the --json line clean for scripts
out = Console()

# ---- shared options -------------------------------------------------------------------------------------------

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


def _cached(backend: Any, no_cache: bool) -> Any:
    """Greedy calls replay from the on-disk response cache unless --no-cache."""
    if no_cache:
        return backend
    from runtime.cache import CachedBackend
    from runtime.default_model import cache_root

    return CachedBackend(backend, cache_root() / "responses.sqlite")


def _backend(kind: str, model: str | None, base_url: str | None, **extra: Any) -> Any:
    from runtime.backends import make_backend
    from runtime.config import backend_config
    from runtime.errors import ConfigError

    if kind not in ("local", "openai"):
        raise ConfigError(f"unknown backend {kind!r}: choose --backend local or --backend openai")
    with console.status(f"loading the {kind} backend ..."):
        _quiet_transformers()
        return make_backend(backend_config(kind=kind, model=model, base_url=base_url, **extra))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _examples(
    task: str | None, jsonl: Path | None, answer_kind: str, split: str, limit: int | None, data_dir: Path | None
) -> tuple[str, list[Any]]:
    """(name, examples) from a benchmark task or a bring-your-own JSONL file."""
    from runtime.config import resolve_data_dir
    from runtime.errors import ConfigError
    from runtime.tasks import load_jsonl, load_task

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


def _roles(
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
    from runtime.backends import make_backend
    from runtime.config import backend_config
    from runtime.errors import ConfigError

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
        _quiet_transformers()
        student = _cached(make_backend(student_cfg), no_cache)
        assistant = student if assistant_cfg == student_cfg else _cached(make_backend(assistant_cfg), no_cache)
    settings = STUDENT_SETTINGS if max_new_tokens is None else replace(STUDENT_SETTINGS, max_new_tokens=max_new_tokens)
    return Roles(student, assistant, assistant_adapter=adapter_name, student_settings=settings)


def _memory(location: dict[str, Any]) -> Any:
    from memory.store import MistakeMemory

    with console.status("opening the mistake memory ..."):
        _quiet_transformers()
        return MistakeMemory(**location)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # redpen draws its own progress; per-tensor bars are noise


# ---- commands -------------------------------------------------------------------------------------------------


@app.command()
def eval(  # noqa: A001 - the command is called eval
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/date_understanding, gsm8k")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own JSONL with input and target fields")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    split: Annotated[str, typer.Option(help="gather, examine or all")] = "examine",
    limit: Annotated[int | None, typer.Option(help="at most this many examples, spread across sources")] = None,
    mc_mode: Annotated[
        str, typer.Option(help="multiple choice by generate (parse the reply) or loglik (most likely option)")
    ] = "generate",
    max_new_tokens: Annotated[int, typer.Option(help="reply length limit")] = 128,
    concurrency: Annotated[int, typer.Option(help="examples in flight at once")] = 32,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder to answer with")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/eval-<task>-<split>-<mode>]")] = None,
    no_cache: NoCache = False,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Evaluate a model on a benchmark split; resumable, ends with an accuracy table."""
    from runtime.backend import GenerationSettings
    from runtime.errors import ConfigError
    from runtime.evaluate import render_report, run_eval, summarize
    from runtime.rundir import RunDir

    if mc_mode not in ("generate", "loglik"):
        raise ConfigError(f"unknown --mc-mode {mc_mode!r}: choose generate or loglik")
    name, examples = _examples(task, jsonl, answer_kind, split, limit, data_dir)
    if not examples:
        raise ConfigError(f"{name} has no examples in the {split} split")
    adapters = {"adapter": str(adapter)} if adapter else {}
    model_backend = _cached(_backend(backend, model, base_url, adapters=adapters), no_cache)
    if mc_mode == "loglik" and not model_backend.supports_option_scoring:
        raise ConfigError(f"--mc-mode loglik needs token log-probs, which this {backend} backend does not expose")
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    identity = {
        "command": "eval",
        "task": name,
        "split": split,
        "limit": limit,
        "mc_mode": mc_mode,
        "model_id": model_backend.model_id,
        "adapter": str(adapter) if adapter else None,
        "max_new_tokens": max_new_tokens,
    }
    run = RunDir(
        out or Path("runs") / _slug(f"eval-{name}-{split}-{mc_mode}"),
        identity,
        {"backend": model_backend.describe(), "settings": settings.to_dict(), "n_examples": len(examples)},
    )
    done = len(run.done_ids("results.jsonl") & {e.id for e in examples})
    started = time.perf_counter()
    correct = 0
    with _progress() as bar:
        progress_task = bar.add_task(f"eval {name}", total=len(examples), completed=done, info="")

        def tick(record: dict[str, Any]) -> None:
            nonlocal correct
            correct += record["verdict"] == "correct"
            finished = bar.tasks[0].completed + 1 - done
            bar.update(
                progress_task,
                advance=1,
                info=f"acc {correct / finished:.2f}  {finished / (time.perf_counter() - started):.2f} items/s",
            )

        results = asyncio.run(
            run_eval(
                examples,
                model_backend,
                run,
                settings,
                mode=mc_mode,
                adapter="adapter" if adapter else None,
                concurrency=concurrency,
                on_result=tick,
            )
        )
    metrics = summarize(results)
    metrics["elapsed_s"] = round(time.perf_counter() - started, 2)
    metrics["run_dir"] = str(run.path)
    run.write_json("metrics.json", metrics)
    run.write_text("report.md", render_report(f"redpen eval: {name} ({split})", identity, metrics))
    _accuracy_table(metrics)
    console.print(f"run directory: {run.path}  (report.md, results.jsonl, metrics.json)")
    if json_out:
        print(json.dumps({"task": name, "split": split, "mc_mode": mc_mode, **metrics}))


def _accuracy_table(metrics: dict[str, Any]) -> None:
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


# ---- SALAM: gathering, examination, the whole experiment --------------------------------------------------------

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


def _phase_bar(bar: Progress) -> Any:
    ids: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in ids:
            ids[phase] = bar.add_task(phase, total=total, info="")
        bar.update(ids[phase], completed=done)

    return update


@app.command()
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
    from agents.gathering import run_gathering
    from runtime.experiment import counter, memory_location
    from runtime.rundir import RunDir

    name, examples = _examples(task, jsonl, answer_kind, "gather", limit, data_dir)
    roles = _roles(
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
    path = out or Path("runs") / _slug(f"gather-{name}")
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
    store = _memory(location)
    try:
        with _progress() as bar:
            tick = counter(_phase_bar(bar), "gathering", len(examples))
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


@app.command()
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
    from agents.examination import retrieve, run_exam
    from runtime.errors import ConfigError
    from runtime.evaluate import render_report, summarize
    from runtime.experiment import counter, memory_location
    from runtime.rundir import RunDir

    if mode not in ("baseline", "assisted"):
        raise ConfigError(f"unknown --mode {mode!r}: choose baseline or assisted")
    name, examples = _examples(task, jsonl, answer_kind, "examine", limit, data_dir)
    roles = _roles(
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
    path = out or Path("runs") / _slug(f"exam-{name}-{mode}")
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
        store = _memory(memory_location(path, memory, memory_url))
        try:
            hits = retrieve(store, examples, roles.student_id, memory_task or name, k, threshold)
        finally:
            store.close()
    started = time.perf_counter()
    with _progress() as bar:
        tick = counter(_phase_bar(bar), f"{mode} exam", len(examples))
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
    _accuracy_table(metrics)
    console.print(f"run directory: {run.path}")
    if json_out:
        print(json.dumps({"task": name, "mode": mode, **metrics}))


@app.command()
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
    from runtime.errors import ConfigError
    from runtime.experiment import ExperimentSettings, memory_location, run_experiment
    from runtime.report import plot_experiment, render_experiment
    from runtime.rundir import RunDir

    if task is not None and (gather_jsonl or examine_jsonl):
        raise ConfigError("give either --task or --gather-jsonl with --examine-jsonl, not both")
    if task is None:
        if gather_jsonl is None or examine_jsonl is None:
            raise ConfigError("give --task NAME, or both --gather-jsonl FILE and --examine-jsonl FILE")
        name, gather_set = _examples(None, gather_jsonl, answer_kind, "gather", gather_limit, data_dir)
        _, examine_set = _examples(None, examine_jsonl, answer_kind, "examine", limit, data_dir)
    else:
        name, gather_set = _examples(task, None, answer_kind, "gather", gather_limit, data_dir)
        _, examine_set = _examples(task, None, answer_kind, "examine", limit, data_dir)
    if not gather_set or not examine_set:
        raise ConfigError(f"{name}: the gather and examine sets must both have examples")
    roles = _roles(
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
    path = out or Path("runs") / _slug(f"run-{name}")
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
    store = _memory(location)
    try:
        with _progress() as bar:
            figures = asyncio.run(
                run_experiment(gather_set, examine_set, roles, store, run_dir, settings, progress=_phase_bar(bar))
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


# ---- model-specific study assistant -----------------------------------------------------------------------------


def _train_bar(bar: Progress, max_steps: int) -> Any:
    task_id = bar.add_task("fine-tuning", total=max_steps, info="")

    def on_log(event: dict[str, Any]) -> None:
        if "loss" in event:
            bar.update(task_id, info=f"loss {event['loss']:.4f}")
        elif "step" in event:
            bar.update(task_id, completed=event["step"])

    return on_log


@app.command("train-assistant")
def train_assistant(
    runs: Annotated[list[Path], typer.Option("--runs", help="run directories with episodes.jsonl; repeatable")],
    out: Annotated[Path, typer.Option(help="adapter folder to write")],
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps [default: the config's, 30]")] = None,
    base_model: Annotated[str | None, typer.Option(help="model folder to train [default: the runs' assistant]")] = None,
    compare: Annotated[bool, typer.Option(help="then examine with the general and the trained assistant")] = True,
    limit: Annotated[int | None, typer.Option(help="examine items for the comparison [default: the run's]")] = None,
    concurrency: Concurrency = 32,
    no_cache: NoCache = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Fine-tune the study assistant (LoRA) on its rewarded feedback, then compare it with the general one."""
    from runtime.errors import ConfigError
    from runtime.experiment import ExperimentSettings, compare_assistants
    from runtime.report import render_comparison
    from runtime.rundir import RunDir
    from training import LoraSFTConfig, export_replay, train_lora, trained_before

    first = _run_config(runs[0])
    replay_dir = out.with_name(out.name + "-replay")
    with console.status("exporting the replay ..."):
        stats = export_replay(runs, replay_dir)
    backend_info = first.get("assistant_backend", {})
    if base_model is None:
        if backend_info.get("kind") != "local":
            raise ConfigError(f"{runs[0]}: its assistant was not a local model; pass --base-model FOLDER to train one")
        base_model = backend_info["path"]
    console.print(f"replay: {stats.steps} feedback steps, {stats.kept} rewarded kept -> {replay_dir}")
    for task_name, counts in stats.by_task.items():
        console.print(f"  {task_name}: kept {counts['kept']} of {counts['steps']}")
    steps = {"max_steps": max_steps} if max_steps is not None else {}
    config = LoraSFTConfig(output_dir=str(out), base_model=base_model, **steps)
    _quiet_transformers()
    result = trained_before(replay_dir / "sft.jsonl", out, config.max_steps)
    if result is not None:
        console.print(f"{out} was already trained on this replay for {config.max_steps} steps; reusing it")
    else:
        with _progress() as bar:
            result = train_lora(replay_dir / "sft.jsonl", config, on_log=_train_bar(bar, config.max_steps))
    console.print(f"adapter: {result.adapter_dir}  ({result.steps} steps, final loss {result.final_loss:.4f})")
    summary: dict[str, Any] = {
        "replay": stats.to_dict(),
        "adapter_dir": str(result.adapter_dir),
        "steps": result.steps,
        "final_loss": result.final_loss,
    }
    if compare:
        identity = first["identity"]
        if identity.get("command") != "run":
            raise ConfigError(
                f"{runs[0]} is not a `redpen run` directory; pass --no-compare, or compare with "
                "`redpen exam --assistant-adapter`"
            )
        name = identity["task"]
        _, examples = _examples(name, None, "choice", "examine", limit or identity["limit"], data_dir)
        roles = _roles(
            None,
            "local",
            base_model,
            None,
            None,
            None,
            None,
            no_cache=no_cache,
            assistant_adapter=str(result.adapter_dir),
        )
        general = replace(roles, assistant_adapter=None)
        settings = ExperimentSettings(
            task=name, k=identity["k"], threshold=identity["threshold"], concurrency=concurrency
        )
        compare_dir = RunDir(
            out.with_name(out.name + "-compare"),
            {
                "command": "compare-assistants",
                "run": str(runs[0]),
                "adapter": str(result.adapter_dir),
                "dataset_hash": result.dataset_hash,
                "limit": limit or identity["limit"],
            },
        )
        store = _memory({k: Path(v) if k == "path" else v for k, v in first["memory"].items()})
        try:
            with _progress() as bar:
                figures = asyncio.run(
                    compare_assistants(examples, general, roles, store, compare_dir, settings, progress=_phase_bar(bar))
                )
        finally:
            store.close()
        training_info = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "dataset_hash": result.dataset_hash,
            "adapter_dir": str(result.adapter_dir),
        }
        compare_dir.write_json("figures.json", figures)
        compare_dir.write_text("report.md", render_comparison(figures, training_info, stats.to_dict()))
        c = figures["conditions"]
        console.print(
            f"examine accuracy on {figures['n_examine']} items: general {c['general']['overall']['accuracy']:.3f}, "
            f"trained {c['trained']['overall']['accuracy']:.3f}, retrieval-only "
            f"{c['retrieval_only']['overall']['accuracy']:.3f}; report: {compare_dir.file('report.md')}"
        )
        summary["accuracy"] = {k: v["overall"]["accuracy"] for k, v in c.items()}
        summary["changed_answers"] = figures["changed_answers"]
    if json_out:
        print(json.dumps(summary))


def _run_config(run_dir: Path) -> dict[str, Any]:
    from runtime.errors import DataError

    path = run_dir / "config.json"
    if not path.exists():
        raise DataError(f"{run_dir} is not a redpen run directory (no config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


# ---- LEMA: correction data and student fine-tuning ---------------------------------------------------------------


@app.command()
def correct(
    task: Annotated[str, typer.Option(help="numeric or multiple-choice task to gather on")] = "gsm8k",
    limit: Annotated[int | None, typer.Option(help="gather problems")] = None,
    samples: Annotated[int, typer.Option(help="reasoning paths sampled per problem (temperature 0.8)")] = 4,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/correct-<task>]")] = None,
    corrector_backend: Annotated[str | None, typer.Option(help="corrector's backend [default: the student's]")] = None,
    corrector_model: Annotated[str | None, typer.Option(help="corrector's model (a stronger one in real use)")] = None,
    corrector_base_url: Annotated[str | None, typer.Option(help="corrector's server URL")] = None,
    concurrency: Concurrency = 32,
    no_cache: NoCache = False,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Sample the student's reasoning, have a corrector fix the wrong paths, and write CoT + correction datasets."""
    from runtime.rundir import RunDir
    from training.lema import run_correction

    name, examples = _examples(task, None, "choice", "gather", limit, data_dir)
    roles = _roles(
        None, backend, model, base_url, corrector_backend, corrector_model, corrector_base_url, no_cache=no_cache
    )
    identity = {
        "command": "correct",
        "task": name,
        "limit": limit,
        "samples": samples,
        "student": roles.student_id,
        "corrector": roles.assistant_id,
    }
    run = RunDir(
        out or Path("runs") / _slug(f"correct-{name}"),
        identity,
        {"student_backend": roles.student.describe(), "corrector_backend": roles.assistant.describe()},
    )
    with _progress() as bar:
        task_id = bar.add_task("correcting", total=len(examples), info="")
        counts = asyncio.run(
            run_correction(
                examples,
                roles.student,
                roles.assistant,
                run,
                samples=samples,
                concurrency=concurrency,
                on_progress=lambda _: bar.update(task_id, advance=1),
            )
        )
    console.print(
        f"{counts['problems']} problems, {counts['paths_sampled']} paths ({counts['paths_correct']} correct); "
        f"{counts['corrections_requested']} corrections asked, {counts['kept']} kept; CoT rows {counts['cot_rows']}, "
        f"correction rows {counts['correction_rows']}  -> {run.path}/report.md"
    )
    if json_out:
        print(json.dumps(counts))


@app.command("train-student")
def train_student(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path, typer.Option(help="adapter folder to write")],
    mode: Annotated[str, typer.Option(help="cot (chain-of-thought only) or cot+corrections")] = "cot+corrections",
    rows: Annotated[int | None, typer.Option(help="training rows [default: all CoT rows]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps [default: the config's, 30]")] = None,
    base_model: Annotated[str | None, typer.Option(help="model folder [default: the embedded default]")] = None,
) -> None:
    """Fine-tune the student (LoRA) on CoT data, or CoT + corrections at the same size."""
    from runtime.errors import ConfigError
    from training.ablation import SETS, training_sets
    from training.lema import COT
    from training.sft_config import LoraSFTConfig
    from training.sft_trainer import train_lora

    if mode not in ("cot", "cot+corrections"):
        raise ConfigError(f"unknown --mode {mode!r}: choose cot or cot+corrections")
    sets_dir = out.with_name(out.name + "-data")
    if mode == "cot":
        dataset = data / COT
    else:
        dataset = training_sets(data, sets_dir, rows)[SETS[1]]
    steps = {"max_steps": max_steps} if max_steps is not None else {}
    config = LoraSFTConfig(output_dir=str(out), base_model=base_model, **steps)
    _quiet_transformers()
    with _progress() as bar:
        result = train_lora(dataset, config, on_log=_train_bar(bar, config.max_steps))
    console.print(
        f"adapter: {result.adapter_dir}  ({result.steps} steps, final loss {result.final_loss:.4f}); "
        f"evaluate it with `redpen eval --adapter {result.adapter_dir}`"
    )


@app.command("ablate-corrections")
def ablate_corrections(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path | None, typer.Option(help="ablation folder [default: <data>-ablation]")] = None,
    rows: Annotated[int | None, typer.Option(help="rows in each training set [default: all CoT rows]")] = None,
    limit: Annotated[int | None, typer.Option(help="examine items")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps per adapter")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="reply length limit at evaluation")] = 256,
    base_model: Annotated[str | None, typer.Option(help="model folder [default: the embedded default]")] = None,
    concurrency: Concurrency = 32,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train on CoT only and on CoT + corrections at equal size; evaluate both and the base on the examine split."""
    from runtime.backend import GenerationSettings
    from runtime.experiment import counter
    from runtime.rundir import RunDir
    from training.ablation import evaluate_adapters, render_ablation, train_sets, training_sets

    task = _run_config(data)["identity"]["task"]
    folder = out or data.with_name(data.name + "-ablation")
    sets = training_sets(data, folder, rows)
    _quiet_transformers()
    with _progress() as bar:

        def on_log(name: str) -> Any:
            return _train_bar(bar, max_steps or 30)

        trained = train_sets(sets, folder, base_model, max_steps, on_log=on_log)
    _, examples = _examples(task, None, "choice", "examine", limit, data_dir)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    run = RunDir(
        folder,
        {
            "command": "ablate-corrections",
            "data": str(data),
            "rows": rows,
            "limit": limit,
            "hashes": {k: v.dataset_hash for k, v in trained.items()},
        },
    )
    with _progress() as bar:
        update = _phase_bar(bar)

        def on_result(name: str) -> Any:
            return counter(update, f"eval {name}", len(examples))

        adapters = {name: result.adapter_dir for name, result in trained.items()}
        figures = asyncio.run(
            evaluate_adapters(examples, base_model, adapters, run, settings, concurrency, on_result=on_result)
        )
    run.write_json("figures.json", figures)
    run.write_text("report.md", render_ablation(task, figures, trained, sets))
    console.print(
        " | ".join(f"{k} {v['overall']['accuracy']:.3f}" for k, v in figures.items()) + f"  -> {run.file('report.md')}"
    )
    if json_out:
        print(json.dumps({k: v["overall"] for k, v in figures.items()}))


# ---- the mistake memory for users ----------------------------------------------------------------------------

ModelFilter = Annotated[str | None, typer.Option("--model-id", help="only this student's mistakes")]
SourceFilter = Annotated[str | None, typer.Option("--source", help="only this source, e.g. bbq/Age")]
TaskFilter = Annotated[str | None, typer.Option("--task", help="only this task, e.g. bbq")]


def _open_memory(memory: Path | None, memory_url: str | None) -> Any:
    from runtime.errors import ConfigError

    if memory is None and memory_url is None:
        raise ConfigError("give the memory: --memory FOLDER (embedded) or --memory-url URL (Qdrant server)")
    if memory is not None and not memory.is_dir():
        raise ConfigError(f"no mistake memory at {memory}")
    return _memory({"url": memory_url} if memory_url else {"path": memory})


@memory_app.command("count")
def memory_count(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
) -> None:
    """Number of stored mistakes (matching the filters)."""
    with _open_memory(memory, memory_url) as store:
        out.print(store.count(model_id=model_id, source=source, task=task))


@memory_app.command("list")
def memory_list(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 20,
) -> None:
    """Show stored mistakes: source, outcome, question and guideline."""
    table = Table(title="mistakes")
    for column in ("source", "outcome", "rounds", "question", "guideline"):
        table.add_column(column, overflow="fold")
    with _open_memory(memory, memory_url) as store:
        for r in store.list(model_id=model_id, source=source, task=task, limit=limit):
            table.add_row(r.source, r.outcome, str(r.rounds), " ".join(r.query.split())[:80], r.guideline[:80])
    out.print(table)


@memory_app.command("export")
def memory_export(
    path: Annotated[Path, typer.Argument(help="JSONL file to write")],
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
) -> None:
    """Write the stored mistakes as JSON lines (written whole, or not at all)."""
    with _open_memory(memory, memory_url) as store:
        n = store.export_jsonl(path, model_id=model_id, source=source, task=task)
    console.print(f"exported {n} mistakes to {path}")


@memory_app.command("delete")
def memory_delete(
    memory: MemoryPath = None,
    memory_url: MemoryUrl = None,
    model_id: ModelFilter = None,
    source: SourceFilter = None,
    task: TaskFilter = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
) -> None:
    """Delete the mistakes matching the filters (at least one filter is required)."""
    from runtime.errors import ConfigError

    if model_id is None and source is None and task is None:
        raise ConfigError("delete needs a filter: --model-id, --source or --task")
    with _open_memory(memory, memory_url) as store:
        n = store.count(model_id=model_id, source=source, task=task)
        if not yes and not typer.confirm(f"delete {n} mistakes?"):
            raise typer.Abort()
        store.delete(model_id=model_id, source=source, task=task)
    console.print(f"deleted {n} mistakes")


@app.command()
def models() -> None:
    """List the model backends and the embedded default model."""
    from runtime.default_model import DEFAULT_MODEL_NAME, cache_root, find_gguf

    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("serves")
    table.add_column("option scoring")
    table.add_row("local", "transformers in-process (CPU/GPU); --model FOLDER or the embedded default", "yes")
    table.add_row(
        "openai", "any OpenAI-compatible server: vLLM, OpenAI, `redpen serve` (--base-url, --model)", "with --tokenizer"
    )
    console.print(table)
    try:
        gguf: str = str(find_gguf())
    except RedpenError as exc:
        gguf = f"missing: {exc}"
    converted = sorted((cache_root() / "models").glob(f"{DEFAULT_MODEL_NAME}-*"))
    console.print(
        f"default model: {DEFAULT_MODEL_NAME}\n  packaged GGUF: {gguf}\n  converted: "
        f"{converted[0] if converted else 'not yet (converted on first use, ~30 s)'}"
    )


@app.command()
def tasks(data_dir: DataDir = None) -> None:
    """List the benchmark task names that --task takes."""
    from runtime.config import resolve_data_dir
    from runtime.tasks import task_names

    for name in task_names(resolve_data_dir(data_dir)):
        out.print(name)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER LoRA adapter to serve; repeatable")] = None,
) -> None:
    """Serve a backend over an OpenAI-compatible HTTP API (chat and completions)."""
    from runtime.errors import ConfigError
    from runtime.server import serve as run_server

    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--adapter {item!r}: expected NAME=FOLDER")
        adapters[name] = folder
    model_backend = _backend(backend, model, base_url, adapters=adapters)
    console.print(f"serving {model_backend.model_id} on http://{host}:{port}/v1")
    run_server(model_backend, host=host, port=port, adapters=tuple(adapters))


@bench_app.command("generate")
def bench_generate(
    concurrency: Annotated[int, typer.Option(help="prompts at once on the batched side")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt (EOS ignored)")] = 64,
    repeats: Annotated[int, typer.Option(help="repeats; medians are reported")] = 3,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    json_out: JsonOut = False,
) -> None:
    """The backend's own rate: tokens/s one prompt at a time vs many at once, as a ratio from one run."""
    from runtime.bench import generate_rate

    model_backend = _backend(backend, model, base_url, max_batch_size=max(concurrency, 1))
    with console.status("measuring ..."):
        result = asyncio.run(
            generate_rate(
                model_backend,
                concurrency=concurrency,
                max_new_tokens=max_new_tokens,
                repeats=repeats,
                on_step=console.print,
            )
        )
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"1 at a time: {result['single_tok_s']:.1f} tok/s   {concurrency} at once: "
        f"{result['batched_tok_s']:.1f} tok/s   ratio {result['ratio']:.2f}x  "
        f"(medians of {repeats}, {max_new_tokens} new tokens, {result['cpu_count']} cores)"
    )
    if json_out:
        print(json.dumps(result))


@bench_app.command("pipeline")
def bench_pipeline(
    task: Annotated[str, typer.Option(help="benchmark task")] = "bbq",
    n: Annotated[int, typer.Option(help="gather items and examine items (each)")] = 16,
    concurrency: Annotated[int, typer.Option(help="conversations in flight on the concurrent side")] = 32,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    config: Config = None,
    json_out: JsonOut = False,
) -> None:
    """The same gather + examine, one example at a time vs concurrently, in one process (no response cache)."""
    import tempfile

    from runtime.bench import pipeline_rate

    _, gather_set = _examples(task, None, "choice", "gather", n, data_dir)
    _, examine_set = _examples(task, None, "choice", "examine", n, data_dir)
    roles = _roles(config, backend, model, base_url, None, None, None, no_cache=True)
    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        result = asyncio.run(
            pipeline_rate(
                roles, gather_set, examine_set, Path(tmp), task=task, concurrency=concurrency, on_step=console.print
            )
        )
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"one at a time {result['one_at_a_time']['items_per_s']:.3f} items/s, concurrent "
        f"{result['concurrent']['items_per_s']:.3f} items/s: {result['speedup']:.2f}x; pipeline "
        f"{result['concurrent']['tok_s']:.1f} tok/s = {result['pipeline_fraction_of_generate']:.0%} of batched "
        f"generate ({result['generate_batched_tok_s']:.1f} tok/s); identical answers "
        f"{result['identical_answers']}/{result['answers_compared']}; {result['cpu_count']} cores"
    )
    if json_out:
        print(json.dumps(result))


@bench_app.command("memory")
def bench_memory(
    records: Annotated[int, typer.Option(help="records stored")] = 100_000,
    queries: Annotated[int, typer.Option(help="filtered searches timed")] = 200,
    json_out: JsonOut = False,
) -> None:
    """Embedded engine: insert rate, filtered search p50/p95, and brute-force numpy on the same vectors."""
    import tempfile

    from runtime.bench import memory_rate

    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        result = memory_rate(Path(tmp), records=records, queries=queries, on_step=console.print)
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"{records} records: insert {result['insert_records_per_s']:.0f}/s, index {result['index_build_s']} s; "
        f"search p50 {result['engine_p50_ms']:.2f} ms p95 {result['engine_p95_ms']:.2f} ms; numpy p50 "
        f"{result['numpy_p50_ms']:.2f} ms: engine {result['numpy_over_engine_p50']:.1f}x faster; "
        f"same top-3 {result['same_top3']}/{queries}"
    )
    if json_out:
        print(json.dumps(result))


def main() -> None:
    logging.basicConfig(level=os.environ.get("REDPEN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except RedpenError as exc:
        console.print(Text.assemble(("error:", "bold red"), f" {exc}"), soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished items are saved, re-run the same command to resume")
        sys.exit(130)

"""The ``redpen`` command line. Only this module prints; library code logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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


def _backend(kind: str, model: str | None, base_url: str | None, **extra: Any) -> Any:
    from runtime.backends import make_backend
    from runtime.config import backend_config
    from runtime.errors import ConfigError

    if kind not in ("local", "openai"):
        raise ConfigError(f"unknown backend {kind!r}: choose --backend local or --backend openai")
    with console.status(f"loading the {kind} backend ..."):
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
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Evaluate a model on a benchmark split; resumable, ends with an accuracy table."""
    from runtime.backend import GenerationSettings
    from runtime.config import resolve_data_dir
    from runtime.errors import ConfigError
    from runtime.evaluate import render_report, run_eval, summarize
    from runtime.rundir import RunDir
    from runtime.tasks import load_jsonl, load_task

    if (task is None) == (jsonl is None):
        raise ConfigError("give exactly one of --task NAME or --jsonl FILE")
    if split not in ("gather", "examine", "all"):
        raise ConfigError(f"unknown --split {split!r}: choose gather, examine or all")
    if mc_mode not in ("generate", "loglik"):
        raise ConfigError(f"unknown --mc-mode {mc_mode!r}: choose generate or loglik")
    if jsonl is not None:
        if answer_kind not in ("choice", "number", "text"):
            raise ConfigError(f"unknown --answer-kind {answer_kind!r}: choose choice, number or text")
        examples = load_jsonl(jsonl, answer_kind, limit=limit)  # type: ignore[arg-type]
        name = jsonl.stem
    else:
        assert task is not None
        examples = load_task(task, split, resolve_data_dir(data_dir), limit)  # type: ignore[arg-type]
        name = task
    if not examples:
        raise ConfigError(f"{name} has no examples in the {split} split")
    adapters = {"adapter": str(adapter)} if adapter else {}
    model_backend = _backend(backend, model, base_url, adapters=adapters)
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


def main() -> None:
    logging.basicConfig(level=os.environ.get("REDPEN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except RedpenError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished items are saved, re-run the same command to resume")
        sys.exit(130)

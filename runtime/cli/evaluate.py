"""`redpen eval`: a model alone on a benchmark split."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.cli.common import (
    Backend,
    BaseUrl,
    DataDir,
    JsonOut,
    Model,
    NoCache,
    accuracy_table,
    console,
    load_backend,
    load_examples,
    phase_bar,
    progress_bar,
    slug,
)
from runtime.defaults import CONCURRENCY, STUDENT_MAX_NEW_TOKENS


def evaluate(
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/date_understanding, gsm8k")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own JSONL with input and target fields")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    split: Annotated[str, typer.Option(help="gather, examine or all")] = "examine",
    limit: Annotated[int | None, typer.Option(help="at most this many examples, spread across sources")] = None,
    mc_mode: Annotated[
        str, typer.Option(help="multiple choice by generate (parse the reply) or loglik (most likely option)")
    ] = "generate",
    max_new_tokens: Annotated[int, typer.Option(help="reply length limit")] = STUDENT_MAX_NEW_TOKENS,
    concurrency: Annotated[int, typer.Option(help="examples in flight at once")] = CONCURRENCY,
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
    from agents.commands import evaluate as run_evaluation
    from runtime.models.backend import GenerationSettings

    name, examples = load_examples(task, jsonl, answer_kind, split, limit, data_dir)
    adapters = {"adapter": str(adapter)} if adapter else {}
    model_backend = load_backend(backend, model, base_url, no_cache=no_cache, adapters=adapters)
    answered = correct = 0
    started = time.perf_counter()
    with progress_bar() as bar:

        def tick(record: dict[str, Any]) -> None:  # accuracy and rate of the items answered by this invocation
            nonlocal answered, correct
            answered, correct = answered + 1, correct + (record["verdict"] == "correct")
            rate = answered / (time.perf_counter() - started)
            bar.update(bar.task_ids[0], info=f"acc {correct / answered:.2f}  {rate:.2f} items/s")

        outcome = asyncio.run(
            run_evaluation(
                examples,
                model_backend,
                out or Path("runs") / slug(f"eval-{name}-{split}-{mc_mode}"),
                task=name,
                split=split,
                limit=limit,
                settings=GenerationSettings(max_new_tokens=max_new_tokens),
                mc_mode=mc_mode,
                adapter=str(adapter) if adapter else None,
                concurrency=concurrency,
                progress=phase_bar(bar),
                on_result=tick,
            )
        )
    accuracy_table(outcome.figures)
    console.print(f"run directory: {outcome.run_dir}  (report.md, report.html, results.jsonl, metrics.json)")
    if json_out:
        print(json.dumps({"task": name, "split": split, "mc_mode": mc_mode, **outcome.figures}))

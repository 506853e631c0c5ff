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
    progress_bar,
    slug,
    with_cache,
)


def evaluate(
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
    from agents.evaluation import render_report, run_eval, summarize
    from runtime.data.rundir import RunDir
    from runtime.errors import ConfigError
    from runtime.models.backend import GenerationSettings

    if mc_mode not in ("generate", "loglik"):
        raise ConfigError(f"unknown --mc-mode {mc_mode!r}: choose generate or loglik")
    name, examples = load_examples(task, jsonl, answer_kind, split, limit, data_dir)
    if not examples:
        raise ConfigError(f"{name} has no examples in the {split} split")
    adapters = {"adapter": str(adapter)} if adapter else {}
    model_backend = with_cache(load_backend(backend, model, base_url, adapters=adapters), no_cache)
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
        out or Path("runs") / slug(f"eval-{name}-{split}-{mc_mode}"),
        identity,
        {"backend": model_backend.describe(), "settings": settings.to_dict(), "n_examples": len(examples)},
    )
    done = len(run.done_ids("results.jsonl") & {e.id for e in examples})
    started = time.perf_counter()
    correct = 0
    with progress_bar() as bar:
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
    accuracy_table(metrics)
    console.print(f"run directory: {run.path}  (report.md, results.jsonl, metrics.json)")
    if json_out:
        print(json.dumps({"task": name, "split": split, "mc_mode": mc_mode, **metrics}))

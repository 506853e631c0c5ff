"""`redpen eval`: a model alone on a benchmark split."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

from runtime.cli.common import (
    DataDir,
    Engine,
    JsonOut,
    NoCache,
    SandboxMode,
    accuracy_table,
    console,
    has_code,
    load_backend,
    load_examples,
    phase_bar,
    progress_bar,
    slug,
    student_kind,
    use_sandbox,
)
from runtime.cli.options import STUDENT, expand
from runtime.defaults import (
    CODE_MAX_NEW_TOKENS,
    MOST_IN_FLIGHT,
    MOST_NEW_TOKENS,
    MOST_SAMPLES,
    STUDENT_MAX_NEW_TOKENS,
)
from runtime.models.config import BackendConfig

if TYPE_CHECKING:
    from runtime.data.records import ItemResult
    from runtime.models.backend import GenerationSettings

# 0.8: Chen et al. (2021) sample at 0.8 for pass@10 and pass@100 (0.2 for pass@1).
SAMPLE_TEMPERATURE = 0.8


@expand(student=STUDENT)
def evaluate(
    *,
    task: Annotated[str | None, typer.Option(help="benchmark task, e.g. bbq, bbh/date_understanding, gsm8k")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="bring-your-own JSONL with input and target fields")] = None,
    answer_kind: Annotated[str, typer.Option(help="for --jsonl: choice, number or text")] = "choice",
    split: Annotated[str, typer.Option(help="gather, examine or all")] = "examine",
    limit: Annotated[int | None, typer.Option(help="at most this many examples, spread across sources", min=1)] = None,
    mc_mode: Annotated[
        str, typer.Option(help="multiple choice by generate (parse the reply) or loglik (most likely option)")
    ] = "generate",
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help=f"reply length limit [default: {STUDENT_MAX_NEW_TOKENS}, code tasks {CODE_MAX_NEW_TOKENS}]",
            min=1,
            max=MOST_NEW_TOKENS,
        ),
    ] = None,
    samples: Annotated[
        int,
        typer.Option(
            help="replies sampled per item, for pass@k (Chen et al. 2021); 1: one greedy reply", min=1, max=MOST_SAMPLES
        ),
    ] = 1,
    temperature: Annotated[
        # At most 2: OpenAI's API allows 0-2, and past ~1.5 a small model's samples are noise.
        float | None,
        typer.Option(help="sampling temperature [default: 0 (greedy), 0.8 with --samples above 1]", min=0.0, max=2.0),
    ] = None,
    sandbox: SandboxMode = "bwrap",
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="examples in flight at once [default: as many as the backend serves at once]",
            min=1,
            max=MOST_IN_FLIGHT,
        ),
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder to answer with")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/eval-<task>-<split>-<mode>]")] = None,
    no_cache: NoCache = False,
    student: BackendConfig,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    engine: Engine = "local",
) -> None:
    """Evaluate a model on a benchmark split; resumable, ends with an accuracy table."""
    from runtime.workflows.commands import evaluate as run_evaluation

    name, examples = load_examples(task, jsonl, answer_kind, split, limit, data_dir)
    code = has_code(examples)
    use_sandbox(sandbox, code)
    settings = _generation(max_new_tokens, temperature, samples, code)
    adapters = {"adapter": adapter} if adapter else None
    student = student.updated(kind=student_kind(engine, student.kind), adapters=adapters)
    model_backend = load_backend(student, no_cache=no_cache)
    with progress_bar() as bar:
        outcome = asyncio.run(
            run_evaluation(
                examples,
                model_backend,
                out or Path("runs") / slug(f"eval-{name}-{split}-{mc_mode}" + (f"-n{samples}" if samples > 1 else "")),
                task=name,
                split=split,
                limit=limit,
                settings=settings,
                mc_mode=mc_mode,
                adapter=str(adapter) if adapter else None,
                samples=samples,
                concurrency=concurrency,
                progress=phase_bar(bar),
                on_result=_live_accuracy(bar),
            )
        )
    accuracy_table(outcome.figures)
    overall = outcome.figures.overall
    if code:
        rates = overall.pass_at or {"1": overall.accuracy}
        how = f"{samples} samples at temperature {settings.temperature:g}" if samples > 1 else "greedy"
        console.print("  ".join(f"pass@{k} {v:.3f}" for k, v in rates.items()) + f"  ({how}, {overall.n} problems)")
    console.print(f"run directory: {outcome.run_dir}  (report.md, report.html, results.jsonl, metrics.json)")
    if json_out:
        print(json.dumps({"task": name, "split": split, "mc_mode": mc_mode, **outcome.figures.to_dict()}))


def _generation(max_new_tokens: int | None, temperature: float | None, samples: int, code: bool) -> GenerationSettings:
    """The replies' settings: greedy, or sampled where a temperature is given or several samples are asked for."""
    from runtime.models.backend import GenerationSettings

    if max_new_tokens is None:
        max_new_tokens = CODE_MAX_NEW_TOKENS if code else STUDENT_MAX_NEW_TOKENS
    if temperature is None:
        temperature = SAMPLE_TEMPERATURE if samples > 1 else 0.0
    if temperature > 0:  # sample j of an item uses seed j: distinct samples, and a re-run repeats them
        return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=0)
    return GenerationSettings(max_new_tokens=max_new_tokens)


def _live_accuracy(bar: Progress) -> Callable[[ItemResult], None]:
    """An ``on_result`` that shows the accuracy and rate of the items this invocation answered on the bar."""
    answered = correct = 0
    started = time.perf_counter()

    def tick(record: ItemResult) -> None:
        nonlocal answered, correct
        answered, correct = answered + 1, correct + (record.verdict == "correct")
        rate = answered / (time.perf_counter() - started)
        bar.update(bar.task_ids[0], info=f"acc {correct / answered:.2f}  {rate:.2f} items/s")

    return tick

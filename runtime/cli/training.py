"""Training commands: the study assistant, LEMA correction data, the student."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from runtime.cli.common import (
    AccelerateConfig,
    BaseModel,
    Concurrency,
    DataDir,
    JsonOut,
    MaxSteps,
    NoCache,
    SandboxMode,
    console,
    has_code,
    load_examples,
    load_roles,
    phase_bar,
    progress_bar,
    quiet_transformers,
    roles_config,
    slug,
    train_bar,
    use_sandbox,
)
from runtime.cli.options import CORRECTOR, STUDENT, expand, field_option
from runtime.defaults import CONCURRENCY, MOST_NEW_TOKENS, MOST_SAMPLES, REASONING_MAX_NEW_TOKENS, SAMPLES
from runtime.models.config import BackendConfig
from training.sft_config import LoraSFTConfig


def train_assistant(
    runs: Annotated[list[Path], typer.Option("--runs", help="run directories with episodes.jsonl; repeatable")],
    out: Annotated[Path, typer.Option(help="folder to write: replay/, adapter/ (the LoRA) and compare/")],
    max_steps: MaxSteps = LoraSFTConfig.max_steps,
    base_model: Annotated[
        str | None,
        field_option(LoraSFTConfig, "base_model", help="model folder to train [default: the runs' assistant]"),
    ] = None,
    compare: Annotated[bool, typer.Option(help="then examine with the general and the trained assistant")] = True,
    limit: Annotated[
        int | None, typer.Option(help="examine items for the comparison [default: the run's]", min=1)
    ] = None,
    concurrency: Concurrency = CONCURRENCY,
    no_cache: NoCache = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    accelerate_config: AccelerateConfig = None,
) -> None:
    """Fine-tune the study assistant (LoRA) on its rewarded feedback, then compare it with the general one."""
    from training.assistant import train_assistant as run_training
    from training.distributed import resolve_config

    quiet_transformers()
    with progress_bar() as bar:
        result = run_training(
            runs,
            out,
            max_steps=max_steps,
            base_model=base_model,
            compare=compare,
            limit=limit,
            concurrency=concurrency,
            response_cache=not no_cache,
            data_dir=data_dir,
            on_train_log=train_bar(bar),
            progress=phase_bar(bar),
            accelerate_config=resolve_config(accelerate_config) if accelerate_config else None,
        )
    stats, trained = result.replay, result.trained
    console.print(f"replay: {stats.steps} feedback steps, {stats.kept} rewarded kept -> {result.replay_dir}")
    for task_name, counts in stats.by_task.items():
        console.print(f"  {task_name}: kept {counts['kept']} of {counts['steps']}")
    reused = " (already trained on this replay with these settings: reused)" if result.reused else ""
    console.print(
        f"adapter: {trained.adapter_dir}  ({trained.steps} steps, final loss {trained.final_loss:.4f}){reused}"
    )
    if result.comparison is not None and result.compare_dir is not None:
        c = result.comparison.conditions
        console.print(
            f"examine accuracy on {result.comparison.n_examine} items: general "
            f"{c['general'].overall.accuracy:.3f}, trained {c['trained'].overall.accuracy:.3f}, "
            f"retrieval-only {c['retrieval_only'].overall.accuracy:.3f}"
            + (f", the run's assistant {c['run_assistant'].overall.accuracy:.3f}" if "run_assistant" in c else "")
            + f"; report: {result.compare_dir / 'report.md'}"
        )
    if json_out:
        print(json.dumps(result.summary()))


@expand(student=STUDENT, corrector=CORRECTOR)
def correct(
    *,
    task: Annotated[str, typer.Option(help="numeric or multiple-choice task to gather on")] = "gsm8k",
    limit: Annotated[int | None, typer.Option(help="gather problems", min=1)] = None,
    samples: Annotated[
        int, typer.Option(help="reasoning paths sampled per problem (temperature 0.8)", min=1, max=MOST_SAMPLES)
    ] = SAMPLES,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/correct-<task>]")] = None,
    corrector: BackendConfig | None,
    concurrency: Concurrency = CONCURRENCY,
    sandbox: SandboxMode = "bwrap",
    no_cache: NoCache = False,
    student: BackendConfig,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Sample the student's reasoning, have a corrector fix the wrong paths, and write CoT + correction datasets."""
    from training.lema.commands import correct as run_correction

    name, examples = load_examples(task, None, "choice", "gather", limit, data_dir)
    use_sandbox(sandbox, has_code(examples))
    # The corrector plays the assistant's role.
    roles = load_roles(roles_config(None, student, corrector, response_cache=not no_cache, teacher_role="corrector"))
    with progress_bar() as bar:
        task_id = bar.add_task("correcting", total=len(examples), info="")
        result = asyncio.run(
            run_correction(
                examples,
                roles,
                out or Path("runs") / slug(f"correct-{name}"),
                task=name,
                limit=limit,
                samples=samples,
                concurrency=concurrency,
                on_progress=lambda _: bar.update(task_id, advance=1),
            )
        )
    counts = result.counts
    console.print(
        f"{counts['problems']} problems, {counts['paths_sampled']} paths ({counts['paths_correct']} correct); "
        f"{counts['corrections_requested']} corrections asked, {counts['kept']} kept; CoT rows {counts['cot_rows']}, "
        f"correction rows {counts['correction_rows']}  -> {result.run_dir}/report.md"
    )
    if json_out:
        print(json.dumps(counts))


def train_student(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path, typer.Option(help="folder to write: adapter/ (the LoRA) and data/ (the training set)")],
    mode: Annotated[str, typer.Option(help="cot (chain-of-thought only) or cot+corrections")] = "cot+corrections",
    rows: Annotated[int | None, typer.Option(help="training rows [default: all CoT rows]", min=1)] = None,
    max_steps: MaxSteps = LoraSFTConfig.max_steps,
    base_model: BaseModel = None,
    accelerate_config: AccelerateConfig = None,
) -> None:
    """Fine-tune the student (LoRA) on CoT data, or CoT + corrections at the same size."""
    from training.distributed import resolve_config
    from training.lema.commands import train_student as run_training

    quiet_transformers()
    with progress_bar() as bar:
        result = run_training(
            data,
            out,
            mode=mode,  # type: ignore[arg-type]  # checked by train_student
            rows=rows,
            max_steps=max_steps,
            base_model=base_model,
            on_log=train_bar(bar),
            accelerate_config=resolve_config(accelerate_config) if accelerate_config else None,
        )
    console.print(
        f"adapter: {result.adapter_dir}  ({result.steps} steps, final loss {result.final_loss:.4f}); "
        f"evaluate it with `redpen eval --adapter {result.adapter_dir}`"
    )


def ablate_corrections(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path | None, typer.Option(help="ablation folder [default: <data>-ablation]")] = None,
    rows: Annotated[int | None, typer.Option(help="rows in each training set [default: all CoT rows]", min=1)] = None,
    limit: Annotated[int | None, typer.Option(help="examine items", min=1)] = None,
    max_steps: MaxSteps = LoraSFTConfig.max_steps,
    max_new_tokens: Annotated[
        int, typer.Option(help="reply length limit at evaluation", min=1, max=MOST_NEW_TOKENS)
    ] = REASONING_MAX_NEW_TOKENS,
    base_model: BaseModel = None,
    concurrency: Concurrency = CONCURRENCY,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train on CoT only and on CoT + corrections at equal size; evaluate both and the base on the examine split."""
    from training.lema.commands import ablate_corrections as run_ablation

    quiet_transformers()
    with progress_bar() as bar:
        result = asyncio.run(
            run_ablation(
                data,
                out,
                rows=rows,
                limit=limit,
                max_steps=max_steps,
                max_new_tokens=max_new_tokens,
                base_model=base_model,
                concurrency=concurrency,
                data_dir=data_dir,
                on_train_log=lambda name: train_bar(bar),
                progress=phase_bar(bar),
            )
        )
    figures = result.figures
    console.print(
        " | ".join(f"{k} {v.overall.accuracy:.3f}" for k, v in figures.items()) + f"  -> {result.run_dir / 'report.md'}"
    )
    if json_out:
        print(json.dumps({k: v.overall.to_dict() for k, v in figures.items()}))

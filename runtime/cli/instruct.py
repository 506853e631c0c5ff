"""`redpen instruct`: the instructor loop (LLMs-as-Instructors), from errors to weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress

from runtime.cli.common import (
    AccelerateConfig,
    DataDir,
    Engine,
    JsonOut,
    NoCache,
    SandboxMode,
    console,
    phase_bar,
    progress_bar,
    quiet_transformers,
    slug,
    teacher_default,
    use_sandbox,
)

CODE_TASKS = ("mbpp", "humaneval")


def _names(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _train_bars(bar: Progress) -> Any:
    tasks: dict[str, Any] = {}

    def for_condition(condition: str) -> Any:
        def on_log(event: dict[str, Any]) -> None:
            if condition not in tasks:
                tasks[condition] = bar.add_task(f"{condition} train", total=event.get("max_steps", 1), info="")
            if "loss" in event:
                bar.update(tasks[condition], info=f"loss {event['loss']:.4f}")
            if "step" in event:
                bar.update(tasks[condition], completed=event["step"])

        return on_log

    return for_condition


def instruct(
    target: Annotated[
        str,
        typer.Option(
            help="target tasks, comma-separated; bbq/Age+SES is a union of categories; a .jsonl file is a "
            "bring-your-own train part (input, target)"
        ),
    ],
    strategy: Annotated[
        str, typer.Option(help="one per iteration, comma-separated: replay, le, lec, memory")
    ] = "replay",
    baselines: Annotated[str, typer.Option(help="at the same number of rows: plain, augment (comma-separated)")] = "",
    ood: Annotated[
        str | None,
        typer.Option(help="out-of-domain benchmarks or .jsonl files [default: the targets' pairs and bbh]"),
    ] = None,
    examine_jsonl: Annotated[
        str | None, typer.Option(help="each .jsonl target's examine file, comma-separated, in --target order")
    ] = None,
    answer_kind: Annotated[str, typer.Option(help="for .jsonl targets and --ood files: choice, number or text")] = (
        "choice"
    ),
    select: Annotated[int, typer.Option(help="selection size per target per iteration")] = 300,
    budget: Annotated[int, typer.Option(help="most training rows per target per iteration")] = 400,
    eval_limit: Annotated[int, typer.Option(help="evaluation items per benchmark")] = 110,
    eval_split: Annotated[
        str, typer.Option(help="examine, or dev (held-out train rows, to choose settings)")
    ] = "examine",
    k: Annotated[int, typer.Option(help="nearest correct cases per wrong case (lec; replay contrast)")] = 3,
    contrast: Annotated[bool, typer.Option(help="replay: add the k nearest correct cases as rows")] = True,
    balance: Annotated[bool, typer.Option(help="replay: rows' golds follow the selection's distribution")] = True,
    name_option: Annotated[
        bool, typer.Option(help="multiple-choice rows: the reply names the option's text before its letter")
    ] = False,
    shuffle_options: Annotated[
        bool, typer.Option(help="multiple-choice rows: options in a random order, the gold relettered")
    ] = False,
    epochs: Annotated[float, typer.Option(help="passes over each iteration's rows")] = 1.0,
    learning_rate: Annotated[float, typer.Option(help="iteration 1's learning rate")] = 2e-4,
    lr_decay: Annotated[float, typer.Option(help="each iteration's rate = the previous one's x this")] = 0.5,
    max_cases: Annotated[int, typer.Option(help="le/lec/augment: most cases sent to the instructor")] = 64,
    seed: Annotated[int, typer.Option(help="seed of selections and random rows")] = 0,
    concurrency: Annotated[int, typer.Option(help="items in flight at once")] = 32,
    base_model: Annotated[
        Path | None, typer.Option(help="student model folder [default: the embedded default]")
    ] = None,
    instructor_backend: Annotated[
        str | None,
        typer.Option(help="instructor's backend [default: the embedded teacher where installed, else the student]"),
    ] = None,
    instructor_model: Annotated[
        str | None, typer.Option(help="instructor's model; `teacher`: the embedded teacher")
    ] = None,
    instructor_base_url: Annotated[str | None, typer.Option(help="instructor's server URL")] = None,
    memory: Annotated[
        Path | None, typer.Option(help="strategy memory: a mistake memory folder (from `redpen gather` / `run`)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/instruct-<targets>]")] = None,
    sandbox: SandboxMode = "bwrap",
    no_cache: NoCache = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    accelerate_config: AccelerateConfig = None,
    engine: Engine = "local",
) -> None:
    """Evaluate, let an instructor turn the errors into training rows, fine-tune, evaluate in and out of domain."""
    from runtime.data.paths import resolve_data_dir
    from runtime.models.config import backend_config
    from runtime.models.engines import check_engine
    from training.distributed import resolve_config
    from training.instruct import InstructSettings, run_instruct

    check_engine(engine)  # before any work: a missing vLLM is one line, not a failure after the first stage
    settings = InstructSettings(
        targets=_names(target),
        strategies=_names(strategy),
        baselines=_names(baselines),
        ood=_names(ood) if ood is not None else None,
        examine_jsonl=_names(examine_jsonl),
        answer_kind=answer_kind,
        select=select,
        budget=budget,
        eval_limit=eval_limit,
        eval_split=eval_split,
        k=k,
        contrast=contrast,
        balance=balance,
        name_option=name_option,
        shuffle_options=shuffle_options,
        epochs=epochs,
        learning_rate=learning_rate,
        lr_decay=lr_decay,
        max_cases=max_cases,
        seed=seed,
        concurrency=concurrency,
        memory=str(memory) if memory is not None else None,
    )
    instructor = None
    if instructor_backend or instructor_model or instructor_base_url:
        instructor = backend_config(
            kind=instructor_backend or "local", model=instructor_model, base_url=instructor_base_url
        )
    elif {"le", "lec"} & set(settings.strategies) or "augment" in settings.baselines:  # an instructor writes rows
        teacher = teacher_default("instructor")  # else the student instructs itself, as before the teacher
        instructor = backend_config(**teacher) if teacher else None
    # mbpp's default out-of-domain pair is humaneval: both are code, so targets and --ood are enough to look at.
    use_sandbox(sandbox, any(n.partition("/")[0] in CODE_TASKS for n in [*settings.targets, *(settings.ood or [])]))
    folder = out or Path("runs") / slug(f"instruct-{target}")
    quiet_transformers()
    with progress_bar() as bar:
        result = run_instruct(
            settings,
            resolve_data_dir(data_dir),
            folder,
            base_model=base_model,
            instructor=instructor,
            no_cache=no_cache,
            progress=phase_bar(bar),
            on_train_log=_train_bars(bar),
            accelerate_config=resolve_config(accelerate_config) if accelerate_config else None,
            engine=engine,
        )
    figs = result.figures
    for b in figs.benchmarks:
        conds = figs.by_benchmark[b].conditions
        cells = "  ".join(f"{c} {conds[c].accuracy:.3f}" for c in figs.conditions)
        majority = conds["base"].majority_gold
        control = f"  (majority gold {majority:.3f})" if majority is not None else ""
        console.print(f"{b}: {cells}{control}")
    console.print(f"report: {result.report_md}  {result.report_html}")
    for line in figs.story:  # the last lines: what the run shows, with its controls
        majority_gold = f"{line.majority_gold:.3f}" if line.majority_gold is not None else "-"
        flag = "; answers lean away from the gold distribution (prior shift)" if line.prior_shift_flag else ""
        console.print(
            f"{line.benchmark}: {line.condition} vs base {line.change:+.3f} (95% CI [{line.ci[0]:+.3f}, "
            f"{line.ci[1]:+.3f}], McNemar p {line.p_mcnemar:.3g}, n {line.n}); majority gold {majority_gold}"
            f"{flag}: [bold]{line.verdict}[/bold]"
        )
    if json_out:
        summary = {
            b: {c: figs.by_benchmark[b].conditions[c].accuracy for c in figs.conditions} for b in figs.benchmarks
        }
        print(json.dumps({"accuracy": summary, "run_dir": str(folder)}))

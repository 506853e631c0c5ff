"""`redpen instruct`: the instructor loop (LLMs-as-Instructors), from errors to weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
from runtime.cli.options import INSTRUCTOR, Settings, expand, field_option
from runtime.models.config import BackendConfig
from training.instruct.settings import InstructSettings
from training.sft_config import LoraSFTConfig

if TYPE_CHECKING:
    from runtime.report import InstructFigures

CODE_TASKS = ("mbpp", "humaneval")


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


@expand(settings=Settings(InstructSettings), instructor=INSTRUCTOR)
def instruct(
    *,
    settings: InstructSettings,
    base_model: Annotated[Path | None, field_option(LoraSFTConfig, "base_model")] = None,
    instructor: BackendConfig | None,
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
    from runtime.models.engines import check_engine
    from training.distributed import resolve_config
    from training.instruct import run_instruct

    check_engine(engine)  # before any work: a missing vLLM is one line, not a failure after the first stage
    if instructor is None and ({"le", "lec"} & set(settings.strategies) or "augment" in settings.baselines):
        instructor = teacher_default("instructor")  # an instructor writes rows; else the student instructs itself
    # mbpp's default out-of-domain pair is humaneval: both are code, so targets and --ood are enough to look at.
    use_sandbox(sandbox, any(n.partition("/")[0] in CODE_TASKS for n in [*settings.targets, *(settings.ood or [])]))
    folder = out or Path("runs") / slug(f"instruct-{','.join(settings.targets)}")
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
    _print_figures(result.figures, result.report_md, result.report_html)
    if json_out:
        figs = result.figures
        summary = {
            b: {c: figs.by_benchmark[b].conditions[c].accuracy for c in figs.conditions} for b in figs.benchmarks
        }
        print(json.dumps({"accuracy": summary, "run_dir": str(folder)}))


def _print_figures(figs: InstructFigures, report_md: Path, report_html: Path) -> None:
    """Each benchmark's accuracy by condition, the report's paths, then what the run shows, with its controls."""
    for b in figs.benchmarks:
        conds = figs.by_benchmark[b].conditions
        cells = "  ".join(f"{c} {conds[c].accuracy:.3f}" for c in figs.conditions)
        majority = conds["base"].majority_gold
        control = f"  (majority gold {majority:.3f})" if majority is not None else ""
        console.print(f"{b}: {cells}{control}")
    console.print(f"report: {report_md}  {report_html}")
    for line in figs.story:  # the last lines: what the run shows, with its controls
        majority_gold = f"{line.majority_gold:.3f}" if line.majority_gold is not None else "-"
        flag = "; answers lean away from the gold distribution (prior shift)" if line.prior_shift_flag else ""
        console.print(
            f"{line.benchmark}: {line.condition} vs base {line.change:+.3f} (95% CI [{line.ci[0]:+.3f}, "
            f"{line.ci[1]:+.3f}], McNemar p {line.p_mcnemar:.3g}, n {line.n}); majority gold {majority_gold}"
            f"{flag}: [bold]{line.verdict}[/bold]"
        )

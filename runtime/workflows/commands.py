"""The evaluation and SALAM commands as library calls: ``evaluate``, ``gather``, ``examine`` and ``experiment``.

Each one creates its run directory with a typed, versioned ``config.json`` (so a later command can read back what
ran, e.g. ``train-assistant`` the assistant's model folder), opens and closes the mistake memory, runs its phases
(resuming what a killed run finished), and writes its figures and report. ``redpen <command>`` parses options
and makes one of these calls; only the command line prints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from agents.examination import Mode, retrieve, run_exam
from agents.gathering import run_gathering
from agents.student import check_prompts_fit
from agents.team import Roles
from memory.store import MistakeMemory, RecordFilter
from runtime.data import sandbox
from runtime.data.kinds import kind_of
from runtime.data.records import (
    BackendInfo,
    Episode,
    EvalIdentity,
    ExamIdentity,
    GatherIdentity,
    ItemResult,
    Record,
    RunConfig,
    RunIdentity,
)
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD, ROUNDS
from runtime.errors import ConfigError
from runtime.models.backend import Backend, GenerationSettings
from runtime.report import (
    ExperimentFigures,
    Figures,
    GatherFigures,
    Summary,
    render_evaluation,
    render_experiment,
)
from runtime.workflows.evaluation import RESULTS, run_eval, summarize
from runtime.workflows.experiment import Progress, counter, memory_location, run_experiment
from runtime.workflows.experiment_settings import ExperimentSettings

METRICS, FIGURES = "metrics.json", "figures.json"
OnRecord = Callable[[ItemResult], None]
F = TypeVar("F", bound=Figures)
R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Outcome(Generic[F, R]):
    """Where a command wrote its run, and its figures (``metrics.json`` or ``figures.json``, as written)."""

    run_dir: Path
    figures: F
    results: list[R]  # the per-item records (results or episodes), in input order


async def evaluate(
    examples: Sequence[Example],
    backend: Backend,
    out: Path,
    *,
    task: str,
    split: str,
    limit: int | None,
    settings: GenerationSettings,
    mc_mode: str = "generate",
    adapter: str | None = None,
    samples: int = 1,
    concurrency: int | None = None,
    progress: Progress | None = None,
    on_result: OnRecord | None = None,
) -> Outcome[Summary, ItemResult]:
    """``redpen eval``: the model alone on ``examples``; ``adapter``: a LoRA folder the backend loaded as "adapter".

    ``samples`` > 1 samples that many replies per item (at ``settings.temperature``, which must be above 0) and
    adds pass@k to the figures; code items run in the configured sandbox (``runtime.data.sandbox``).
    """
    if mc_mode not in ("generate", "loglik"):
        raise ConfigError(f"unknown --mc-mode {mc_mode!r}: choose generate or loglik")
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    if samples > 1 and settings.greedy:
        raise ConfigError("--samples above 1 needs a --temperature above 0: greedy samples would all be the same")
    if not examples:
        raise ConfigError(f"{task} has no examples in the {split} split")
    if mc_mode == "loglik" and not backend.supports_option_scoring:
        raise ConfigError(f"--mc-mode loglik needs token log-probs, which this {backend.kind} backend does not expose")
    check_prompts_fit(examples, backend, settings.max_new_tokens if mc_mode == "generate" else 0)
    identity = EvalIdentity(
        task=task,
        split=split,
        limit=limit,
        mc_mode=mc_mode,
        model_id=backend.model_id,
        adapter=adapter,
        max_new_tokens=settings.max_new_tokens,
        samples=samples,
        temperature=settings.temperature,
    )
    recorded = settings.to_dict()
    if any(kind_of(e).code for e in examples):
        recorded["sandbox"] = sandbox.current().describe()
    config = RunConfig(
        identity=identity,
        student_backend=BackendInfo(**backend.describe()),
        settings=recorded,
        n_examples=len(examples),
    )
    run = RunDir.create(out, config)
    done = len(run.done_ids(RESULTS, ItemResult) & {e.id for e in examples})
    tick = counter(progress, f"eval {task}", len(examples), done)
    started = time.perf_counter()
    with run.removed_on_failure():
        results = await run_eval(
            examples,
            backend,
            run,
            settings,
            mode=mc_mode,
            adapter="adapter" if adapter else None,
            concurrency=concurrency,
            on_result=_both(tick, on_result),
            samples=samples,
        )
    metrics = dataclasses.replace(
        summarize(results), elapsed_s=round(time.perf_counter() - started, 2), run_dir=str(run.path)
    )
    run.write_json(METRICS, metrics.to_dict())
    render_evaluation(f"redpen eval: {task} ({split})", identity.model_dump(), metrics, results).write(run.path)
    return Outcome(run.path, metrics, results)


async def gather(
    examples: Sequence[Example],
    roles: Roles,
    out: Path,
    *,
    task: str,
    limit: int | None,
    rounds: int = ROUNDS,
    memory_path: Path | None = None,
    memory_url: str | None = None,
    concurrency: int | None = None,
    progress: Progress | None = None,
) -> Outcome[GatherFigures, Episode]:
    """``redpen gather``: gathering episodes into ``out``, their mistakes into the memory (default: ``out/memory``).

    The figures are the episode counts and how many of this student's mistakes the memory now holds.
    """
    check_prompts_fit(examples, roles.student, roles.student_settings.max_new_tokens)
    location = memory_location(out, memory_path, memory_url)
    identity = GatherIdentity(
        task=task,
        limit=limit,
        rounds=rounds,
        student=roles.student_id,
        assistant=roles.assistant_id,
        student_settings=roles.student_settings.to_dict(),
    )
    run = RunDir.create(out, _salam_config(identity, roles, location))
    with run.removed_on_failure(), MistakeMemory(**location) as store:
        episodes = await run_gathering(
            examples,
            roles,
            store,
            run,
            task=task,
            rounds=rounds,
            concurrency=concurrency,
            on_episode=counter(progress, "gathering", len(examples)),
        )
        stored = store.count(RecordFilter(model_id=roles.student_id, task=task))
    figures = GatherFigures(
        episodes=len(episodes),
        first_answer_wrong=sum(e.first_verdict != "correct" for e in episodes),
        corrected=sum(e.corrected for e in episodes),
        mistakes_stored=stored,
    )
    return Outcome(run.path, figures, episodes)


async def examine(
    examples: Sequence[Example],
    roles: Roles,
    out: Path,
    *,
    mode: Mode,
    task: str,
    limit: int | None,
    memory_path: Path | None = None,
    memory_url: str | None = None,
    memory_task: str | None = None,
    k: int = RETRIEVAL_K,
    threshold: float = RETRIEVAL_THRESHOLD,
    assistant_adapter: str | None = None,
    skip_absorbed: bool = False,
    concurrency: int | None = None,
    progress: Progress | None = None,
) -> Outcome[Summary, ItemResult]:
    """``redpen exam``: without the gold, as a baseline or assisted by this student's mistakes on ``memory_task``."""
    if mode not in ("baseline", "assisted"):
        raise ConfigError(f"unknown --mode {mode!r}: choose baseline or assisted")
    if mode == "assisted" and memory_path is None and memory_url is None:
        raise ConfigError("--mode assisted needs the mistake memory: pass --memory FOLDER or --memory-url URL")
    identity = ExamIdentity(
        mode=mode,
        task=task,
        limit=limit,
        student=roles.student_id,
        assistant=roles.assistant_id,
        k=k,
        threshold=threshold,
        assistant_adapter=assistant_adapter,
        student_settings=roles.student_settings.to_dict(),
        skip_absorbed=skip_absorbed,
    )
    check_prompts_fit(examples, roles.student, roles.student_settings.max_new_tokens)
    location = memory_location(out, memory_path, memory_url) if mode == "assisted" else None
    hits = None
    if location is not None:
        # An exam reads the memory: one that does not exist, or holds nothing of this student on this task (a
        # mistyped path, another --memory-task), is an error, not an "assisted" exam with nothing retrieved.
        with MistakeMemory(**location, create=False) as store:
            if store.count(RecordFilter(model_id=roles.student_id, task=memory_task or task)) == 0:
                raise ConfigError(
                    f"the memory at {store.where} holds no mistakes of {roles.student_id} on task "
                    f"{memory_task or task!r} ({store.count()} in all); gather them first, or give the --memory "
                    "(and --memory-task) they were gathered into"
                )
            hits = retrieve(store, examples, roles.student_id, memory_task or task, k, threshold, skip_absorbed)
    run = RunDir.create(out, _salam_config(identity, roles, location))
    started = time.perf_counter()
    with run.removed_on_failure():
        results = await run_exam(
            examples,
            roles,
            run,
            RESULTS,
            mode=mode,
            hits=hits,
            concurrency=concurrency,
            on_result=counter(progress, f"{mode} exam", len(examples)),
        )
    metrics = dataclasses.replace(summarize(results), elapsed_s=round(time.perf_counter() - started, 2))
    run.write_json(METRICS, metrics.to_dict())
    render_evaluation(f"redpen exam: {task} ({mode})", identity.model_dump(), metrics, results).write(run.path)
    return Outcome(run.path, metrics, results)


async def experiment(
    gather_set: Sequence[Example],
    examine_set: Sequence[Example],
    roles: Roles,
    out: Path,
    settings: ExperimentSettings,
    *,
    limit: int | None,
    gather_limit: int | None,
    memory_path: Path | None = None,
    memory_url: str | None = None,
    progress: Progress | None = None,
) -> Outcome[ExperimentFigures, ItemResult]:
    """``redpen run``: every SALAM phase with its controls (``runtime.workflows.experiment``), then its report."""
    if not gather_set or not examine_set:
        raise ConfigError(f"{settings.task}: the gather and examine sets must both have examples")
    if settings.threshold is None:
        raise ConfigError("redpen run records its retrieval threshold: give one")
    check_prompts_fit([*gather_set, *examine_set], roles.student, roles.student_settings.max_new_tokens)
    location = memory_location(out, memory_path, memory_url)
    identity = RunIdentity(
        task=settings.task,
        limit=limit,
        gather_limit=gather_limit,
        rounds=settings.rounds,
        k=settings.k,
        threshold=settings.threshold,
        student=roles.student_id,
        assistant=roles.assistant_id,
        student_settings=roles.student_settings.to_dict(),
    )
    run = RunDir.create(out, _salam_config(identity, roles, location))
    with run.removed_on_failure(), MistakeMemory(**location) as store:
        figures = await run_experiment(gather_set, examine_set, roles, store, run, settings, progress=progress)
    run.write_json(FIGURES, figures.to_dict())
    render_experiment(figures, identity.model_dump()).write(run.path)
    return Outcome(run.path, figures, [])


def _salam_config(
    identity: GatherIdentity | ExamIdentity | RunIdentity, roles: Roles, location: dict[str, Any] | None
) -> RunConfig:
    """A SALAM command's config: its identity, both roles' backends, and where its memory is."""
    return RunConfig(
        identity=identity,
        student_backend=BackendInfo(**roles.student.describe()),
        assistant_backend=BackendInfo(**roles.assistant.describe()),
        memory={k: str(v) for k, v in location.items()} if location is not None else None,
    )


def _both(first: Callable[[Record], None], second: OnRecord | None) -> OnRecord:
    def call(record: ItemResult) -> None:
        first(record)
        if second is not None:
            second(record)

    return call

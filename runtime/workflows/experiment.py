"""``redpen run``: the whole SALAM experiment on one benchmark, with its controls, in one run directory.

1. baseline examination of the examine split (no memory);
2. gathering on the gather split (mistakes into memory);
3. assisted examination of the same examine items;
4. controls on the same items: retrieval-only (majority gold of the retrieved mistakes, no model) and the
   examine items with a near-duplicate in the gathered questions (embedding similarity >= 0.95);
5. the report (Markdown and HTML, with its plot), with paired differences between the conditions.
Every phase appends to its own JSONL file and skips what is done, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.examination import embed_queries, retrieval_only, retrieve, run_exam
from agents.gathering import run_gathering
from agents.team import Roles
from memory.store import MistakeMemory, RecordFilter
from runtime.data.records import Episode, ItemResult, Record
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.report import ComparisonFigures, ExperimentFigures, Gathering, GuidanceExample
from runtime.workflows.evaluation import condition_summary
from runtime.workflows.experiment_settings import ExperimentSettings

NEAR_DUPLICATE = 0.95  # MiniLM cosine at which two questions differ by a name or a number at most
BASELINE, ASSISTED, RETRIEVAL = "exam_baseline.jsonl", "exam_assisted.jsonl", "exam_retrieval_only.jsonl"

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def counter(progress: Progress | None, phase: str, total: int, done: int = 0) -> Callable[[Record], None]:
    """A per-record callback that reports ``(phase, done, total)`` to ``progress`` as records finish.

    ``done`` records were finished before (a resumed run); they are reported at once.
    """
    if progress is not None and done:
        progress(phase, done, total)

    def tick(_: Record) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(phase, done, total)

    return tick


def near_duplicates(memory: MistakeMemory, examine: Sequence[Example], gather: Sequence[Example]) -> dict[str, float]:
    """For each examine item, its highest similarity to any gathered question."""
    if not examine or not gather:
        return {e.id: 0.0 for e in examine}
    a = memory.embedder.embed([e.input for e in examine])
    b = memory.embedder.embed([e.input for e in gather])
    best = (np.asarray(a) @ np.asarray(b).T).max(axis=1)  # rows are unit vectors: dot product = cosine
    return {e.id: float(s) for e, s in zip(examine, best, strict=True)}


async def run_experiment(
    gather: Sequence[Example],
    examine: Sequence[Example],
    roles: Roles,
    memory: MistakeMemory,
    run: RunDir,
    settings: ExperimentSettings,
    progress: Progress | None = None,
) -> ExperimentFigures:
    """Run every phase (resuming finished ones) and return the figures the report is made of."""
    # Seconds per phase, summed over the invocations of a resumed run (a resumed phase adds only what it did).
    times_file = run.file("phase_seconds.json")
    times: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}

    def spent(phase: str, started: float) -> None:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - started
        run.write_json(times_file.name, times)

    # The baseline exam needs nothing from gathering: both run at once, so the backend's batch holds the rows of
    # both (a gathering conversation is a chain of dependent calls that alone leaves most of a batch empty).
    started = time.perf_counter()

    async def baseline_exam() -> list[ItemResult]:
        records = await run_exam(
            examine,
            roles,
            run,
            BASELINE,
            mode="baseline",
            concurrency=settings.concurrency,
            on_result=counter(progress, "baseline exam", len(examine)),
        )
        spent("baseline", started)
        return records

    async def gathering() -> list[Episode]:
        episodes = await run_gathering(
            gather,
            roles,
            memory,
            run,
            task=settings.task,
            rounds=settings.rounds,
            concurrency=settings.concurrency,
            on_episode=counter(progress, "gathering", len(gather)),
        )
        spent("gathering", started)
        return episodes

    baseline, episodes, queries = await asyncio.gather(baseline_exam(), gathering(), embed_queries(memory, examine))

    started = time.perf_counter()
    hits = retrieve(memory, examine, roles.student_id, settings.task, settings.k, settings.threshold, queries=queries)
    assisted = await run_exam(
        examine,
        roles,
        run,
        ASSISTED,
        mode="assisted",
        hits=hits,
        concurrency=settings.concurrency,
        on_result=counter(progress, "assisted exam", len(examine)),
    )
    spent("assisted", started)

    control = retrieval_only(examine, hits)
    run.write_text(RETRIEVAL, "".join(_jsonl(r.to_json()) for r in control))
    similarity = near_duplicates(memory, examine, gather)
    duplicated = {i for i, s in similarity.items() if s >= NEAR_DUPLICATE}

    conditions = {"baseline": baseline, "assisted": assisted, "retrieval_only": control}
    return ExperimentFigures(
        task=settings.task,
        student=roles.student_id,
        assistant=roles.assistant_id,
        n_gather=len(gather),
        n_examine=len(examine),
        conditions={name: condition_summary(rs) for name, rs in conditions.items()},
        without_near_duplicates={
            name: condition_summary([r for r in rs if r.id not in duplicated]) for name, rs in conditions.items()
        },
        near_duplicates=len(duplicated),
        near_duplicate_threshold=NEAR_DUPLICATE,
        gathering=gathering_figures(episodes),
        mistakes_stored=memory.count(RecordFilter(model_id=roles.student_id, task=settings.task)),
        retrieved_per_item=round(float(np.mean([len(h) for h in hits.values()])), 2) if hits else 0.0,
        examples=guidance_examples(assisted, examine),
        time_s={k: round(v, 1) for k, v in times.items()},
        tokens={
            name: sum(r.prompt_tokens + r.completion_tokens for r in rs)
            for name, rs in (("baseline", baseline), ("gathering", episodes), ("assisted", assisted))
        },
    )


def gathering_figures(episodes: Sequence[Episode]) -> Gathering:
    """What gathering did: episodes, corrections, feedback turns and what the filters removed."""
    wrong = [e for e in episodes if e.first_verdict != "correct"]
    turns = [t for e in episodes for t in e.turns]
    return Gathering(
        episodes=len(episodes),
        first_answer_wrong=len(wrong),
        corrected=sum(e.corrected for e in wrong),
        feedback_turns=len(turns),
        rewarded_turns=sum(t.reward for t in turns),
        leaks_removed=sum(t.action.leaked for t in turns),
        group_claims_removed=sum(t.action.stereotyped for t in turns),
        generic_guidelines=sum(t.action.generic for t in turns),
        instruction_echoes_removed=sum(t.action.echoed for t in turns),
        unparsed_feedback=sum(not t.action.parsed for t in turns),
        # what the memory holds: each wrong episode's last guideline (mistake_from), a few to read in the report
        stored_guidelines=[e.turns[-1].action.guideline for e in wrong if e.turns][:8],
    )


def guidance_examples(assisted: Sequence[ItemResult], examine: Sequence[Example], n: int = 3) -> list[GuidanceExample]:
    """The first ``n`` assisted items that were given guidance, with their question and reply."""
    inputs = {e.id: e.input for e in examine}
    return [
        GuidanceExample(
            id=r.id,
            question=inputs.get(r.id, ""),
            guidance=r.guidance,
            reply=r.reply,
            verdict=r.verdict,
            target=r.target,
        )
        for r in assisted
        if r.guidance
    ][:n]


def _jsonl(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def memory_location(run_path: Path, memory_path: Path | None, memory_url: str | None) -> dict[str, Any]:
    """Where the mistake memory lives: a server by URL, else an embedded folder (default: inside the run)."""
    if memory_url:
        return {"url": memory_url}
    return {"path": memory_path or run_path / "memory"}


async def compare_assistants(
    examine: Sequence[Example],
    general: Roles,
    trained: Roles,
    memory: MistakeMemory,
    run: RunDir,
    settings: ExperimentSettings,
    progress: Progress | None = None,
    reference: tuple[str, list[ItemResult]] | None = None,
) -> ComparisonFigures:
    """The same examine items, the same memory and student: the general assistant vs the trained one.

    ``reference`` is the gathering run's own assisted exam on these items (its assistant's name and results), when
    that assistant was another model, such as the teacher whose turns the adapter learned from.
    """
    hits = retrieve(memory, examine, general.student_id, settings.task, settings.k, settings.threshold)
    results: dict[str, list[ItemResult]] = {}
    for name, roles in (("general", general), ("trained", trained)):
        results[name] = await run_exam(
            examine,
            roles,
            run,
            f"exam_{name}.jsonl",
            mode="assisted",
            hits=hits,
            concurrency=settings.concurrency,
            on_result=counter(progress, f"{name} assistant", len(examine)),
        )
    results["retrieval_only"] = retrieval_only(examine, hits)
    if reference is not None:
        results["run_assistant"] = reference[1]
    trained_answers = {r.id: r.predicted for r in results["trained"]}  # paired by item id
    return ComparisonFigures(
        task=settings.task,
        student=general.student_id,
        general_assistant=general.assistant_id,
        trained_assistant=trained.assistant_id,
        run_assistant=reference[0] if reference is not None else None,
        n_examine=len(examine),
        conditions={name: condition_summary(rs) for name, rs in results.items()},
        changed_answers=sum(r.predicted != trained_answers[r.id] for r in results["general"]),
    )

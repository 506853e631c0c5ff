"""LEMA (Learning from Mistakes, arXiv 2310.20689): turn a student's wrong reasoning into correction data.

For each problem of a gather split the student samples ``samples`` reasoning paths (temperature > 0, a distinct
seed per sample), each path is graded, and every distinct wrong path goes to the corrector
(:class:`training.lema.corrector.CorrectorAgent`), who knows the gold answer. A correction is kept only when it parses
and its corrected solution reaches the gold. Each problem's record (paths, verdicts, corrections) is appended to
the run directory as soon as it is finished, so a killed run resumes where it stopped.

At the end the run directory holds two TRL ``messages`` datasets:

- ``cot.jsonl``: chain-of-thought rows, the gold solutions (GSM8K's ``#### N`` made "The answer is N.", its
  ``<<48/2=24>>`` calculator notes dropped) and the student's distinct correct paths, under the student's prompt;
- ``corrections.jsonl``: correction rows, user = the question, the wrong path as numbered steps and the
  instruction (no gold), assistant = the correction in the paper's format;

with ``counts.json`` and the quality report, ``report.md`` and ``report.html`` (counts, parse failures by reason,
a few examples).
:func:`equal_size` cuts the two datasets to training sets of the same size for the ablation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from autogen_agentchat.messages import TextMessage
from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient
from pydantic import BaseModel, ConfigDict

from agents.roles import contents
from agents.student import student_messages
from runtime.data.graders import Verdict
from runtime.data.kinds import grade_async, kind_named, kind_of
from runtime.data.records import Record
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.defaults import CONCURRENCY, REASONING_MAX_NEW_TOKENS, SAMPLES
from runtime.errors import ConfigError
from runtime.models.autogen_client import BackendChatCompletionClient
from runtime.models.backend import Backend, GenerationSettings
from runtime.report import Report
from training.lema.corrector import (
    KEPT,
    UNWORKED,
    WRONG_FINAL_ANSWER,
    Correction,
    CorrectorAgent,
    CorrectorReply,
    correction_prompt,
    format_steps,
    path_steps,
    split_steps,
)

log = logging.getLogger(__name__)

PROBLEMS = "problems.jsonl"  # one record per problem: its sampled paths, their grades and the corrections
COT, CORRECTIONS = "cot.jsonl", "corrections.jsonl"  # the two TRL messages datasets
COUNTS, REPORT = "counts.json", "report.md"  # the report also as report.html

# 0.8: diverse paths that still mostly stay on topic. Sample j uses seed + j: distinct within a problem, and
# reproducible, since the local backend gives every row its own seeded generator whatever it is batched with.
SAMPLE_SETTINGS = GenerationSettings(max_new_tokens=REASONING_MAX_NEW_TOKENS, temperature=0.8, top_p=0.95, seed=0)
# Greedy; 384: a GSM8K correction restates the steps from the wrong one on, rarely more than 250 tokens.
CORRECTOR_SETTINGS = GenerationSettings(max_new_tokens=384)
_EXAMPLES_IN_REPORT = 3
_CLIP = 600  # characters of a question, path or reply shown in the report

Row = TypeVar("Row")


class SampledPath(BaseModel):
    """One reasoning path the student sampled for a problem, with its grade."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample: int
    seed: int
    text: str
    verdict: Verdict
    predicted: str | None
    finish_reason: str | None


class CorrectionAttempt(BaseModel):
    """The corrector on one wrong path: its raw reply, and what became of it (``status``: kept, or why not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample: int
    steps: list[str]
    reply: str
    status: str
    correction: Correction | None  # parsed, also when it was then rejected


class Problem(Record):
    """One problem's record in ``problems.jsonl``: its sampled paths, their grades and the corrections."""

    source: str
    question: str
    gold: str
    answer_kind: str | None = None  # recorded since code items were added
    student: str
    corrector: str
    paths: list[SampledPath]
    corrections: list[CorrectionAttempt]
    time_s: float


async def sample_paths(
    example: Example, student: Backend, samples: int, settings: GenerationSettings = SAMPLE_SETTINGS
) -> list[SampledPath]:
    """``samples`` reasoning paths for one problem, concurrently, each with its grade."""
    base = settings.seed or 0
    chat = student_messages(example)
    seeds = [base + j for j in range(samples)]
    generations = await asyncio.gather(
        *(student.generate(chat, dataclasses.replace(settings, seed=seed)) for seed in seeds)
    )
    grades = await asyncio.gather(*(grade_async(example, g.text) for g in generations))
    return [
        SampledPath(
            sample=j,
            seed=seed,
            text=generation.text,
            verdict=result.verdict,
            predicted=result.predicted,
            finish_reason=generation.finish_reason,
        )
        for j, (seed, generation, result) in enumerate(zip(seeds, generations, grades, strict=True))
    ]


def wrong_paths(paths: Sequence[SampledPath]) -> list[SampledPath]:
    """The paths worth correcting: not correct, not empty, and each distinct text once.

    >>> paths = [SampledPath(sample=i, seed=i, text=t, verdict=v, predicted=None, finish_reason="stop")
    ...          for i, (t, v) in enumerate([("1 + 1 = 3.", "wrong"), ("1 +  1 = 3.", "wrong"),
    ...                                      ("1 + 1 = 2.", "correct"), ("", "no_answer")])]
    >>> [p.text for p in wrong_paths(paths)]
    ['1 + 1 = 3.']
    """
    return _distinct([p for p in paths if p.verdict != "correct" and split_steps(p.text)])


async def correct_path(example: Example, path: SampledPath, client: ChatCompletionClient) -> CorrectionAttempt:
    """Ask the corrector about one wrong path; the record keeps its raw reply and what became of it."""
    agent = CorrectorAgent(example, client)
    response = await agent.on_messages([TextMessage(content=path.text, source="student")], CancellationToken())
    [reply] = contents([response.chat_message], CorrectorReply)
    return CorrectionAttempt(
        sample=path.sample,
        steps=path_steps(example, path.text),
        reply=reply.text,
        status=reply.review.status,
        correction=reply.review.correction,
    )


async def run_correction(
    examples: Sequence[Example],
    student: Backend,
    corrector: Backend,
    run: RunDir,
    *,
    samples: int = SAMPLES,
    concurrency: int = CONCURRENCY,
    on_progress: Callable[[Problem], None] | None = None,
    student_settings: GenerationSettings = SAMPLE_SETTINGS,
    corrector_settings: GenerationSettings = CORRECTOR_SETTINGS,
) -> dict[str, Any]:
    """Sample, grade and correct every problem not yet in the run, then write the datasets and the report.

    ``concurrency`` problems are in flight at once (each with its samples and then its corrections); each
    finished problem is appended to ``problems.jsonl`` and passed to ``on_progress``. Returns the counts.
    """
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    if student_settings.greedy:
        raise ConfigError("sampling reasoning paths needs a temperature above 0; greedy paths would all be the same")
    run.repair(PROBLEMS)
    done = run.done_ids(PROBLEMS, Problem)
    client = BackendChatCompletionClient(corrector, None, corrector_settings)
    limit = asyncio.Semaphore(concurrency)

    async def one(example: Example) -> None:
        async with limit:
            started = time.perf_counter()
            paths = await sample_paths(example, student, samples, student_settings)
            corrections = await asyncio.gather(*(correct_path(example, p, client) for p in wrong_paths(paths)))
        record = Problem(
            id=example.id,
            source=example.source,
            question=example.input,
            gold=example.target,
            answer_kind=example.answer_kind,
            student=student.model_id,
            corrector=corrector.model_id,
            paths=paths,
            corrections=list(corrections),
            time_s=round(time.perf_counter() - started, 3),
        )
        run.append(PROBLEMS, record)
        if on_progress is not None:
            on_progress(record)

    await asyncio.gather(*(one(e) for e in examples if e.id not in done))
    by_id = {r.id: r for r in run.records(PROBLEMS, Problem)}
    records = [by_id[e.id] for e in examples if e.id in by_id]
    cot, fixes = cot_rows(examples, records), correction_rows(records)
    run.write_text(COT, _jsonl(cot))
    run.write_text(CORRECTIONS, _jsonl(fixes))
    counts = count(records, examples)
    run.write_json(COUNTS, counts)
    report(counts, records).write(run.path)
    log.info(
        "lema %d problems  %d paths  %d wrong  %d corrections kept  %d cot rows",
        counts["problems"],
        counts["paths_sampled"],
        counts["paths_wrong"] + counts["paths_no_answer"],
        counts["kept"],
        counts["cot_rows"],
    )
    return counts


def cot_rows(examples: Sequence[Example], records: Sequence[Problem]) -> list[dict[str, Any]]:
    """Chain-of-thought rows: each problem's gold solution (if any), then its distinct correct sampled paths."""
    by_id = {r.id: r for r in records}
    rows = []
    for example in examples:
        if example.id not in by_id:
            continue
        chat = student_messages(example)
        gold = kind_of(example).solution(example)
        correct = _distinct([p for p in by_id[example.id].paths if p.verdict == "correct"])
        for text in ([gold] if gold else []) + [p.text for p in correct]:
            rows.append({"messages": [*chat, {"role": "assistant", "content": text}]})
    return rows


def correction_rows(records: Sequence[Problem]) -> list[dict[str, Any]]:
    """Correction rows: the question and wrong steps (no gold) in, the kept correction out."""
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": correction_prompt(
                        record.question, fix.steps, kind_named(record.answer_kind or "text").code
                    ),
                },
                {"role": "assistant", "content": fix.correction.text()},
            ]
        }
        for record in records
        for fix in record.corrections
        if fix.status == KEPT and fix.correction is not None
    ]


def count(records: Sequence[Problem], examples: Sequence[Example]) -> dict[str, Any]:
    """What the run made: paths by verdict, corrections by fate, dataset rows.

    ``corrections_requested = sum(parse_failures) + rejected_wrong_answer + rejected_not_worked_out + kept``.
    """
    verdicts = Counter(p.verdict for r in records for p in r.paths)
    statuses = Counter(c.status for r in records for c in r.corrections)
    done = {r.id for r in records}
    gold = sum(1 for e in examples if e.id in done and kind_of(e).solution(e))
    cot = len(cot_rows(examples, records))
    failures = {s: n for s, n in sorted(statuses.items()) if s not in (KEPT, WRONG_FINAL_ANSWER, UNWORKED)}
    return {
        "problems": len(records),
        "paths_sampled": sum(verdicts.values()),
        "paths_correct": verdicts["correct"],
        "paths_wrong": verdicts["wrong"],
        "paths_no_answer": verdicts["no_answer"],
        "corrections_requested": sum(statuses.values()),
        "parse_failures": failures,
        "rejected_wrong_answer": statuses[WRONG_FINAL_ANSWER],
        "rejected_not_worked_out": statuses[UNWORKED],
        "kept": statuses[KEPT],
        "cot_rows": cot,
        "cot_gold_rows": gold,
        "cot_student_rows": cot - gold,
        "correction_rows": statuses[KEPT],
    }


def report(counts: dict[str, Any], records: Sequence[Problem]) -> Report:
    """A short quality report: the counts, parse failures by reason, and a few examples."""
    sampled, wrong = counts["paths_sampled"], counts["paths_wrong"] + counts["paths_no_answer"]
    student, corrector = (records[0].student, records[0].corrector) if records else ("-", "-")
    out = Report("LEMA correction data")
    out.paragraph(f"Student `{student}`, corrector `{corrector}`.")
    out.table(
        ["", "count"],
        [
            ["problems", counts["problems"]],
            ["paths sampled", sampled],
            ["correct paths", f"{counts['paths_correct']} ({_share(counts['paths_correct'], sampled)})"],
            [
                "wrong paths (wrong answer / no answer)",
                f"{wrong} ({counts['paths_wrong']} / {counts['paths_no_answer']})",
            ],
            ["corrections requested (distinct wrong paths)", counts["corrections_requested"]],
            ["parse failures", sum(counts["parse_failures"].values())],
            ["rejected: wrong final answer", counts["rejected_wrong_answer"]],
            ["rejected: right answer, not worked out (no computation gives it)", counts["rejected_not_worked_out"]],
            ["kept", f"{counts['kept']} ({_share(counts['kept'], counts['corrections_requested'])})"],
        ],
    )
    out.paragraph(
        f"Datasets: `{COT}` {counts['cot_rows']} rows ({counts['cot_gold_rows']} gold solutions, "
        f"{counts['cot_student_rows']} student paths); `{CORRECTIONS}` {counts['correction_rows']} rows."
    )
    if counts["parse_failures"]:
        out.heading("Parse failures by reason")
        out.table(["reason", "count"], [[reason, n] for reason, n in counts["parse_failures"].items()])
    fixes = [(r, c) for r in records for c in r.corrections]
    shown = [f for f in fixes if f[1].status == KEPT][:_EXAMPLES_IN_REPORT]
    shown += [f for f in fixes if f[1].status != KEPT][: _EXAMPLES_IN_REPORT - len(shown)]
    if shown:
        out.heading("Examples")
    for i, (record, fix) in enumerate(shown, 1):
        out.heading(f"{i}. {fix.status}: `{record.id}` (gold {record.gold})", level=3)
        out.paragraph(f"**Question.** {_clip(record.question)}")
        out.paragraph("**Wrong path.**")
        out.code(_clip(format_steps(fix.steps)))
        out.paragraph("**Corrector's reply.**")
        out.code(_clip(fix.reply))
    return out


def equal_size(
    cot_rows: Sequence[Row], correction_rows: Sequence[Row], n: int, seed: int
) -> tuple[list[Row], list[Row]]:
    """Two training sets of ``n`` rows each, for the ablation: CoT only, and CoT + corrections.

    CoT-only is ``n`` CoT rows drawn at random. CoT+corrections keeps the pool's mix, scaled to ``n``:
    ``k = round(n * C / (T + C))`` correction rows (T CoT and C correction rows in the pool) and the first
    ``n - k`` rows of the same CoT draw, shuffled together. So the two sets differ only in ``k`` CoT rows swapped
    for corrections, and training on the mixed set is training on the whole pool subsampled to ``n`` rows.

    >>> cot = [f"cot{i}" for i in range(6)]
    >>> fixes = ["fix0", "fix1", "fix2"]
    >>> only, mixed = equal_size(cot, fixes, 4, seed=0)
    >>> len(only), len(mixed), sum(row.startswith("fix") for row in mixed)
    (4, 4, 1)
    >>> set(row for row in mixed if row.startswith("cot")) <= set(only)
    True
    """
    if not 1 <= n <= len(cot_rows):
        raise ConfigError(f"n must be between 1 and the {len(cot_rows)} CoT rows available, got {n}")
    rng = random.Random(seed)
    cot_only = rng.sample(list(cot_rows), n)
    k = round(n * len(correction_rows) / (len(cot_rows) + len(correction_rows)))
    mixed = cot_only[: n - k] + rng.sample(list(correction_rows), k)
    rng.shuffle(mixed)
    return cot_only, mixed


def _distinct(paths: Sequence[SampledPath]) -> list[SampledPath]:
    seen, out = set(), []
    for path in paths:
        key = " ".join(path.text.split())
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _clip(text: str) -> str:
    return text if len(text) <= _CLIP else text[: _CLIP - 3] + "..."

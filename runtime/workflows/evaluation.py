"""Evaluate a model on benchmark examples: answer, grade, append to the run directory, summarise.

Two ways to answer a multiple-choice item, recorded per item and in the run's config:
- ``generate``: the model writes a reply and the grader extracts its option (a reply with none counts apart);
- ``loglik``: the option with the highest log-likelihood as the reply, as lm-eval-harness does, so a small
  model's format failures do not hide what it knows. Items that are not multiple choice are always generated.

Code items are graded by running their programs in the sandbox, off the event loop. With ``samples`` > 1 each item
gets that many sampled replies (seeds ``seed``, ``seed + 1``, ...) and the figures add pass@k (Chen et al. 2021).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from agents.student import labelled_options, student_messages
from runtime.data.graders import Grade
from runtime.data.kinds import grade_async, kind_of
from runtime.data.records import ItemResult, SampleResult
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.models.backend import Backend, GenerationSettings
from runtime.report import Accuracy, Answers, Condition, Summary, answer_distribution, pass_at_k, pass_at_ks

RESULTS = "results.jsonl"


async def answer(
    example: Example,
    backend: Backend,
    settings: GenerationSettings,
    mode: str = "generate",
    adapter: str | None = None,
    guidance: str | None = None,
    samples: int = 1,
) -> ItemResult:
    """One graded answer; with ``samples`` > 1, that many sampled replies, the first as the item's reply."""
    messages = student_messages(example, guidance)
    started = time.perf_counter()
    if mode == "loglik" and kind_of(example).multiple_choice and example.options:
        scores = await backend.score_options(messages, labelled_options(example), adapter)
        reply = labelled_options(example)[max(range(len(scores)), key=scores.__getitem__)]
        return ItemResult(
            **_graded(example, reply, "loglik", await grade_async(example, reply)),
            latency_s=round(time.perf_counter() - started, 4),
            scores=[round(s, 4) for s in scores],
        )
    if samples == 1:
        generations = [await backend.generate(messages, settings, adapter)]
    else:
        base = settings.seed or 0
        generations = await asyncio.gather(
            *(backend.generate(messages, dataclasses.replace(settings, seed=base + j), adapter) for j in range(samples))
        )
    grades = await asyncio.gather(*(grade_async(example, g.text) for g in generations))
    first = generations[0]
    return ItemResult(
        **_graded(example, first.text, "generate", grades[0]),
        prompt_tokens=sum(g.usage.prompt_tokens for g in generations),
        completion_tokens=sum(g.usage.completion_tokens for g in generations),
        latency_s=round(time.perf_counter() - started, 4),
        finish_reason=first.finish_reason,
        samples=[
            SampleResult(reply=g.text, verdict=r.verdict, error=r.error)
            for g, r in zip(generations, grades, strict=True)
        ]
        if samples > 1
        else None,
    )


def _graded(example: Example, reply: str, mode: str, result: Grade) -> dict[str, Any]:
    return {
        "id": example.id,
        "source": example.source,
        "mode": mode,
        "verdict": result.verdict,
        "predicted": result.predicted,
        "target": example.target,
        "n_options": len(example.options),
        "reply": reply,
        "error": result.error,
    }


async def run_eval(
    examples: Sequence[Example],
    backend: Backend,
    run: RunDir,
    settings: GenerationSettings,
    *,
    mode: str = "generate",
    adapter: str | None = None,
    concurrency: int | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    results_file: str = RESULTS,
    samples: int = 1,
) -> list[ItemResult]:
    """Answer every example not already in the run directory; return all results (old and new) in input order.

    ``concurrency``: items in flight, by default as many as the backend serves at once.
    """

    async def one(example: Example) -> ItemResult:
        return await answer(example, backend, settings, mode, adapter, samples=samples)

    width = concurrency or backend.capacity
    return await complete_pending(run, results_file, ItemResult, examples, one, concurrency=width, on_record=on_result)


def summarize(results: Sequence[ItemResult]) -> Summary:
    """Accuracy with its controls: chance (uniform over options) and always answering the most common gold.

    ``answers`` holds the predicted and the gold answer distributions of the multiple-choice items.

    >>> graded = [("correct", "(A)", "(A)"), ("wrong", "(B)", "(A)"), ("no_answer", None, "(B)")]
    >>> r = [ItemResult(id=str(i), source="s", verdict=v, predicted=p, target=t, n_options=2, completion_tokens=3,
    ...                 prompt_tokens=9, mode="generate", reply="") for i, (v, p, t) in enumerate(graded)]
    >>> m = summarize(r)
    >>> (m.overall.accuracy, m.overall.no_answer, m.overall.majority_gold, m.overall.chance)
    (0.3333, 1, 0.6667, 0.5)
    >>> m.answers
    Answers(predicted={'(A)': 1, '(B)': 1, 'none': 1}, gold={'(A)': 2, '(B)': 1})
    """
    groups: dict[str, list[ItemResult]] = defaultdict(list)
    for r in results:
        groups[r.source].append(r)
    choice = [r for r in results if r.n_options]
    return Summary(
        overall=accuracy(results),
        by_source={s: accuracy(rs) for s, rs in sorted(groups.items())},
        modes=dict(Counter(r.mode for r in results)),
        answers=Answers(
            predicted=answer_distribution([r.predicted for r in choice]),
            gold=answer_distribution([r.target for r in choice]),
        ),
    )


def condition_summary(results: Sequence[ItemResult]) -> Condition:
    """:func:`summarize` with the per-item verdicts (item id -> right), for paired comparison with another condition.

    >>> condition_summary([ItemResult(id="x", source="s", verdict="correct", predicted="4", target="4",
    ...     n_options=0, completion_tokens=1, prompt_tokens=1, mode="generate", reply="4")]).verdicts
    {'x': True}
    """
    summary = summarize(results)
    return Condition(
        overall=summary.overall,
        by_source=summary.by_source,
        modes=summary.modes,
        answers=summary.answers,
        verdicts=verdicts(results),
    )


def verdicts(results: Sequence[ItemResult]) -> dict[str, bool]:
    """Item id -> whether its answer was right."""
    return {r.id: r.verdict == "correct" for r in results}


def accuracy(results: Sequence[ItemResult]) -> Accuracy:
    """The accuracy of ``results`` with its controls, and pass@k when they were sampled."""
    n = len(results)
    counts = Counter(r.verdict for r in results)
    answered = n - counts["no_answer"]
    golds = Counter(r.target for r in results)
    choice = [r for r in results if r.n_options]
    samples, pass_at = _pass_at(results)
    return Accuracy(
        n=n,
        correct=counts["correct"],
        wrong=counts["wrong"],
        no_answer=counts["no_answer"],
        accuracy=round(counts["correct"] / n, 4) if n else 0.0,
        accuracy_answered=round(counts["correct"] / answered, 4) if answered else 0.0,
        # A control only where golds repeat (options, small numbers): every program's or text's gold is its own, and
        # "always the most common gold" would read as 1/n, a figure that controls for nothing.
        majority_gold=round(top / n, 4) if (top := max(golds.values(), default=0)) > 1 else None,
        chance=round(sum(1 / r.n_options for r in choice) / len(choice), 4) if choice else None,
        completion_tokens=sum(r.completion_tokens for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        samples=samples,
        pass_at=pass_at,
    )


def _pass_at(results: Sequence[ItemResult]) -> tuple[int | None, dict[str, float] | None]:
    """pass@k over the items' samples (mean of the unbiased per-item estimates), when every item has n of them."""
    counts = [len(r.samples or ()) for r in results]
    if not results or not counts[0] or len(set(counts)) != 1:
        return None, None
    n = counts[0]
    correct = [sum(s.verdict == "correct" for s in r.samples or ()) for r in results]
    estimates = {str(k): round(sum(pass_at_k(n, c, k) for c in correct) / len(correct), 4) for k in pass_at_ks(n)}
    return n, estimates

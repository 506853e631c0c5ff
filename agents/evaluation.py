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
from typing import TYPE_CHECKING, Any

from agents.student import labelled_options, student_messages
from runtime.data.graders import Grade, grade_async
from runtime.data.records import ItemResult, SampleResult
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.models.backend import Backend, GenerationSettings
from runtime.report import (
    PRIOR_SHIFT_THRESHOLD,
    Report,
    answer_distribution,
    flag_prior_shift,
    pass_at_k,
    pass_at_ks,
    prior_shift,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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
    if mode == "loglik" and example.answer_kind == "choice" and example.options:
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
    on_result: Callable[[dict[str, Any]], None] | None = None,
    results_file: str = RESULTS,
    samples: int = 1,
) -> list[dict[str, Any]]:
    """Answer every example not already in the run directory; return all results (old and new) in input order.

    ``concurrency``: items in flight, by default as many as the backend serves at once.
    """

    async def one(example: Example) -> dict[str, Any]:
        return (await answer(example, backend, settings, mode, adapter, samples=samples)).to_json()

    width = concurrency or backend.capacity
    return await complete_pending(run, results_file, examples, one, concurrency=width, on_record=on_result)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with its controls: chance (uniform over options) and always answering the most common gold.

    ``answers`` holds the predicted and the gold answer distributions of the multiple-choice items.

    >>> r = [{"source": "s", "verdict": v, "predicted": p, "target": t, "n_options": 2, "completion_tokens": 3,
    ...       "prompt_tokens": 9, "mode": "generate"}
    ...      for v, p, t in [("correct", "(A)", "(A)"), ("wrong", "(B)", "(A)"), ("no_answer", None, "(B)")]]
    >>> m = summarize(r)
    >>> (m["overall"]["accuracy"], m["overall"]["no_answer"], m["overall"]["majority_gold"], m["overall"]["chance"])
    (0.3333, 1, 0.6667, 0.5)
    >>> m["answers"]
    {'predicted': {'(A)': 1, '(B)': 1, 'none': 1}, 'gold': {'(A)': 2, '(B)': 1}}
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["source"]].append(r)
    summary = {"overall": _figures(results), "by_source": {s: _figures(rs) for s, rs in sorted(groups.items())}}
    summary["modes"] = dict(Counter(r["mode"] for r in results))
    choice = [r for r in results if r["n_options"]]
    summary["answers"] = {
        "predicted": answer_distribution([r["predicted"] for r in choice]),
        "gold": answer_distribution([r["target"] for r in choice]),
    }
    return summary


def condition_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`summarize` with the per-item verdicts (item id -> right), for paired comparison with another condition.

    >>> condition_summary([{"id": "x", "source": "s", "verdict": "correct", "predicted": "4", "target": "4",
    ...     "n_options": 0, "completion_tokens": 1, "prompt_tokens": 1, "mode": "generate"}])["verdicts"]
    {'x': True}
    """
    return {**summarize(results), "verdicts": {r["id"]: r["verdict"] == "correct" for r in results}}


def _figures(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    verdicts = Counter(r["verdict"] for r in results)
    answered = n - verdicts["no_answer"]
    golds = Counter(r["target"] for r in results)
    choice = [r for r in results if r["n_options"]]
    return {
        "n": n,
        "correct": verdicts["correct"],
        "wrong": verdicts["wrong"],
        "no_answer": verdicts["no_answer"],
        "accuracy": round(verdicts["correct"] / n, 4) if n else 0.0,
        "accuracy_answered": round(verdicts["correct"] / answered, 4) if answered else 0.0,
        # A control only where golds repeat (options, small numbers): every program's or text's gold is its own, and
        # "always the most common gold" would read as 1/n, a figure that controls for nothing.
        "majority_gold": round(top / n, 4) if (top := max(golds.values(), default=0)) > 1 else None,
        "chance": round(sum(1 / r["n_options"] for r in choice) / len(choice), 4) if choice else None,
        "completion_tokens": sum(r["completion_tokens"] for r in results),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
        **_pass_at(results),
    }


def _pass_at(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """pass@k over the items' samples (mean of the unbiased per-item estimates), when every item has n of them.

    >>> rs = [{"samples": [{"verdict": "correct"}, {"verdict": "wrong"}]}, {"samples": [{"verdict": "wrong"}] * 2}]
    >>> _pass_at(rs)
    {'samples': 2, 'pass_at': {'1': 0.25, '2': 0.5}}
    """
    counts = [len(r.get("samples") or ()) for r in results]
    if not results or not counts[0] or len(set(counts)) != 1:
        return {}
    n = counts[0]
    correct = [sum(s["verdict"] == "correct" for s in r["samples"]) for r in results]
    estimates = {str(k): round(sum(pass_at_k(n, c, k) for c in correct) / len(correct), 4) for k in pass_at_ks(n)}
    return {"samples": n, "pass_at": estimates}


def render_report(
    title: str, config: dict[str, Any], metrics: dict[str, Any], results: Sequence[dict[str, Any]] = ()
) -> Report:
    """The run's report: settings, the accuracy table with its controls, and the answers beside the gold ones;
    for code items, pass@k when they were sampled, and a few failed programs with their errors."""
    report = Report(title)
    report.table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items()])
    report.paragraph(
        "Controls on the same items: *chance* answers uniformly at random among the options; *majority gold* "
        "always answers the most common gold answer of the set. *no answer* counts replies with no parsable answer "
        "(apart from wrong ones); *acc answered* is accuracy over the replies that gave one."
    )
    rows = [*metrics["by_source"].items(), ("**all**", metrics["overall"])]
    report.table(
        ["source", "n", "accuracy", "acc answered", "no answer", "chance", "majority gold"],
        [
            [s, f["n"], f["accuracy"], f["accuracy_answered"], f["no_answer"], f["chance"], f["majority_gold"]]
            for s, f in rows
        ],
    )
    predicted, gold = metrics["answers"]["predicted"], metrics["answers"]["gold"]
    if gold:
        answered = {a: n for a, n in predicted.items() if a != "none"}
        shift = prior_shift(answered, gold)
        report.heading("Answers given and gold answers")
        verdict = (
            f"**above {PRIOR_SHIFT_THRESHOLD}: the answers lean away from the gold ones, as a preference for some "
            "options over others would make them**"
            if flag_prior_shift(answered, gold)
            else f"at most {PRIOR_SHIFT_THRESHOLD}, no strong lean"
        )
        report.paragraph(
            f"Total variation distance between the answers given (no-answer replies left out) and the gold answers "
            f"of the multiple-choice items: {shift:.3f}, {verdict}."
        )
        labels = sorted(gold.keys() | predicted.keys(), key=lambda a: (a == "none", a))
        report.table(["answer", "given", "gold"], [[a, predicted.get(a, 0), gold.get(a, 0)] for a in labels])
        report.figure(
            "answers.png",
            "How often each answer was given, beside the gold answers.",
            _answer_bars(labels, predicted, gold),
        )
    if "pass_at" in metrics["overall"]:
        ks = list(metrics["overall"]["pass_at"])
        report.heading("pass@k")
        report.paragraph(
            f"{metrics['overall']['samples']} sampled replies per item; pass@k is the unbiased estimator of Chen et "
            "al. (2021), averaged over the items (pass@1 here is the sampled rate, not the greedy one)."
        )
        report.table(
            ["source", *(f"pass@{k}" for k in ks)],
            [[s, *(f["pass_at"][k] for k in ks)] for s, f in rows],
        )
    failed = [r for r in results if r.get("error")]
    if failed:
        report.heading("Failed programs")
        report.paragraph(
            f"{len(failed)} programs failed their tests; the first {min(len(failed), _FAILED_SHOWN)}, with the code "
            "taken from the reply and the end of the error (each ran in the sandbox)."
        )
        for r in failed[:_FAILED_SHOWN]:
            report.heading(f"`{r['id']}`: {r['error'].splitlines()[0]}", level=3)
            report.code(_clip_lines(r["predicted"] or r["reply"]))
            report.code(r["error"])
    return report


_FAILED_SHOWN = 3
_CODE_LINES = 40


def _clip_lines(text: str) -> str:
    lines = text.splitlines()
    more = [f"... ({len(lines) - _CODE_LINES} more lines)"] if len(lines) > _CODE_LINES else []
    return "\n".join(lines[:_CODE_LINES] + more)


def _answer_bars(labels: Sequence[str], predicted: dict[str, int], gold: dict[str, int]) -> Callable[[Axes], None]:
    def draw(ax: Axes) -> None:
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [predicted.get(a, 0) for a in labels], 0.4, label="given")
        ax.bar([x + 0.2 for x in xs], [gold.get(a, 0) for a in labels], 0.4, label="gold")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_ylabel("items")
        ax.legend()

    return draw

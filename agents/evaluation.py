"""Evaluate a model on benchmark examples: answer, grade, append to the run directory, summarise.

Two ways to answer a multiple-choice item, recorded per item and in the run's config:
- ``generate``: the model writes a reply and the grader extracts its option (a reply with none counts apart);
- ``loglik``: the option with the highest log-likelihood as the reply, as lm-eval-harness does, so a small
  model's format failures do not hide what it knows. Items that are not multiple choice are always generated.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from agents.student import labelled_options, student_messages
from runtime.data.graders import grade
from runtime.data.rundir import RunDir, complete_pending
from runtime.data.tasks import Example
from runtime.models.backend import Backend, GenerationSettings

RESULTS = "results.jsonl"


async def answer(
    example: Example,
    backend: Backend,
    settings: GenerationSettings,
    mode: str = "generate",
    adapter: str | None = None,
    guidance: str | None = None,
) -> dict[str, Any]:
    """One graded answer as a result record."""
    messages = student_messages(example, guidance)
    started = time.perf_counter()
    if mode == "loglik" and example.answer_kind == "choice" and example.options:
        scores = await backend.score_options(messages, labelled_options(example), adapter)
        best = max(range(len(scores)), key=scores.__getitem__)
        reply, usage, item_mode = (
            labelled_options(example)[best],
            {"prompt_tokens": 0, "completion_tokens": 0},
            "loglik",
        )
        extra: dict[str, Any] = {"scores": [round(s, 4) for s in scores]}
    else:
        generation = await backend.generate(messages, settings, adapter)
        reply, item_mode, extra = generation.text, "generate", {"finish_reason": generation.finish_reason}
        usage = {
            "prompt_tokens": generation.usage.prompt_tokens,
            "completion_tokens": generation.usage.completion_tokens,
        }
    result = grade(example, reply)
    return {
        "id": example.id,
        "source": example.source,
        "mode": item_mode,
        "verdict": result.verdict,
        "predicted": result.predicted,
        "target": example.target,
        "n_options": len(example.options),
        "reply": reply,
        **usage,
        "latency_s": round(time.perf_counter() - started, 4),
        **extra,
    }


async def run_eval(
    examples: Sequence[Example],
    backend: Backend,
    run: RunDir,
    settings: GenerationSettings,
    *,
    mode: str = "generate",
    adapter: str | None = None,
    concurrency: int = 32,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    results_file: str = RESULTS,
) -> list[dict[str, Any]]:
    """Answer every example not already in the run directory; return all results (old and new) in input order."""
    return await complete_pending(
        run,
        results_file,
        examples,
        lambda e: answer(e, backend, settings, mode, adapter),
        concurrency=concurrency,
        on_record=on_result,
    )


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with its controls: chance (uniform over options) and always answering the most common gold.

    >>> r = [{"source": "s", "verdict": v, "target": t, "n_options": 2, "completion_tokens": 3, "prompt_tokens": 9,
    ...       "mode": "generate"} for v, t in [("correct", "(A)"), ("wrong", "(A)"), ("no_answer", "(B)")]]
    >>> m = summarize(r)
    >>> (m["overall"]["accuracy"], m["overall"]["no_answer"], m["overall"]["majority_gold"], m["overall"]["chance"])
    (0.3333, 1, 0.6667, 0.5)
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["source"]].append(r)
    summary = {"overall": _figures(results), "by_source": {s: _figures(rs) for s, rs in sorted(groups.items())}}
    summary["modes"] = dict(Counter(r["mode"] for r in results))
    return summary


def _figures(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(results)
    verdicts = Counter(r["verdict"] for r in results)
    answered = n - verdicts["no_answer"]
    golds = Counter(r["target"] for r in results)
    choice = [r for r in results if r.get("n_options")]
    return {
        "n": n,
        "correct": verdicts["correct"],
        "wrong": verdicts["wrong"],
        "no_answer": verdicts["no_answer"],
        "accuracy": round(verdicts["correct"] / n, 4) if n else 0.0,
        "accuracy_answered": round(verdicts["correct"] / answered, 4) if answered else 0.0,
        "majority_gold": round(golds.most_common(1)[0][1] / n, 4) if n else 0.0,
        "chance": round(sum(1 / r["n_options"] for r in choice) / len(choice), 4) if choice else None,
        "completion_tokens": sum(r["completion_tokens"] for r in results),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
    }


def render_report(title: str, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The run's Markdown report: settings, then the accuracy table with its controls."""
    lines = [f"# {title}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in config.items()]
    lines += [
        "",
        "Controls on the same items: *chance* answers uniformly at random among the options; *majority gold*",
        "always answers the most common gold answer of the set. *no answer* counts replies with no parsable answer",
        "(apart from wrong ones); *acc answered* is accuracy over the replies that gave one.",
        "",
        "| source | n | accuracy | acc answered | no answer | chance | majority gold |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [*metrics["by_source"].items(), ("**all**", metrics["overall"])]
    for source, f in rows:
        chance = f"{f['chance']:.3f}" if f["chance"] is not None else "-"
        lines.append(
            f"| {source} | {f['n']} | {f['accuracy']:.3f} | {f['accuracy_answered']:.3f} | {f['no_answer']} "
            f"| {chance} | {f['majority_gold']:.3f} |"
        )
    return "\n".join(lines) + "\n"

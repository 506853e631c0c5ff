"""The figures of an instructor run, from its records: accuracy per condition with controls, learned/forgotten,
answer distributions beside the gold, the last iteration's story; and the per-item ledger.
``runtime.report.render_instruct`` draws the report from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runtime.data.records import ItemResult
from runtime.report import (
    Benchmark,
    InstructCondition,
    InstructFigures,
    Stages,
    Story,
    answer_distribution,
    flag_prior_shift,
    pair_by_id,
    paired_difference,
    predecessor,
    prior_shift,
    verdict,
)
from runtime.workflows.evaluation import accuracy, verdicts
from training.instruct.ledger import change, ledger_rows

Results = dict[str, dict[str, list[ItemResult]]]  # condition -> benchmark -> records


def conditions_in_order(results: Results) -> list[str]:
    """base, iter1, plain1, augment1, iter2, ... : each iteration beside its baselines."""

    def key(name: str) -> tuple[int, int]:
        digits = "".join(c for c in name if c.isdigit())
        return (int(digits) if digits else 0, 0 if name.startswith("iter") or name == "base" else 1)

    return sorted(results, key=key)


def verdicts_of(results: Results) -> dict[str, dict[str, dict[str, bool]]]:
    """condition -> benchmark -> item id -> right: what the report pairs conditions by."""
    return {c: {b: verdicts(records) for b, records in benches.items()} for c, benches in results.items()}


def figures(
    results: Results,
    supplies: dict[str, dict[str, Any]],
    stages: Stages,
    in_domain: Sequence[str],
    open_answers: Sequence[str] = (),
) -> InstructFigures:
    """The run's figures; ``open_answers`` names the benchmarks that are not multiple choice (programs, numbers,
    text): their golds are nearly all distinct, so there is no answer prior to shift and no distribution to show."""
    order = conditions_in_order(results)
    benchmarks = list(results["base"])
    per: dict[str, Benchmark] = {}
    for b in benchmarks:
        gold = {} if b in open_answers else answer_distribution([r.target for r in results["base"][b]])
        rows: dict[str, InstructCondition] = {}
        for c in order:
            records = results[c][b]
            pred = {} if b in open_answers else answer_distribution([r.predicted for r in records])
            rows[c] = InstructCondition(
                **vars(accuracy(records)),
                predicted=pred,
                prior_shift=prior_shift(pred, gold),
                prior_shift_flag=flag_prior_shift(pred, gold),
                vs_previous=None if c == "base" else change(verdicts(results[predecessor(c)][b]), verdicts(records)),
            )
        per[b] = Benchmark(gold=gold, conditions=rows)
    return InstructFigures(
        conditions=order,
        benchmarks=benchmarks,
        in_domain=list(in_domain),
        by_benchmark=per,
        story=_story(results, per, order, benchmarks),
        supplies=supplies,
        stages=stages,
    )


def _story(results: Results, per: dict[str, Benchmark], order: Sequence[str], benchmarks: Sequence[str]) -> list[Story]:
    """Per benchmark, the last iteration against the base: the change with its CI and p, the controls, a verdict."""
    last = [c for c in order if c.startswith("iter")][-1:]
    story = []
    for b in benchmarks:
        for c in last:
            a, z = pair_by_id(verdicts(results["base"][b]), verdicts(results[c][b]))
            d = paired_difference(a, z)
            flag = per[b].conditions[c].prior_shift_flag
            majority = per[b].conditions["base"].majority_gold
            story.append(
                Story(
                    benchmark=b,
                    condition=c,
                    n=d.n,
                    before=d.acc_a,
                    after=d.acc_b,
                    change=d.diff,
                    ci=[d.ci_low, d.ci_high],
                    p_mcnemar=d.p_mcnemar,
                    majority_gold=majority,
                    prior_shift_flag=flag,
                    verdict=verdict(d, majority, flag),
                )
            )
    return story


def ledger(results: Results) -> list[dict[str, Any]]:
    by_benchmark: dict[str, dict[str, dict[str, ItemResult]]] = {}
    for c, benches in results.items():
        for b, records in benches.items():
            by_benchmark.setdefault(b, {})[c] = {r.id: r for r in records}
    return ledger_rows(by_benchmark, conditions_in_order(results))

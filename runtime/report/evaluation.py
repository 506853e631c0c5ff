"""The report of one results file (``redpen eval``, ``redpen exam``): accuracy with its controls, the answers
beside the gold ones, pass@k, and a few failed programs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from runtime.report.document import Report
from runtime.report.figures import Summary
from runtime.report.stats import PRIOR_SHIFT_THRESHOLD, flag_prior_shift, prior_shift

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_FAILED_SHOWN = 3
_CODE_LINES = 40


class Answered(Protocol):
    """What the report reads of a graded item (``runtime.data.records.ItemResult``): a failed program's code and
    error."""

    @property
    def id(self) -> str: ...
    @property
    def reply(self) -> str: ...
    @property
    def predicted(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


def render_evaluation(
    title: str, config: Mapping[str, Any], summary: Summary, results: Sequence[Answered] = ()
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
    rows = [*summary.by_source.items(), ("**all**", summary.overall)]
    report.table(
        ["source", "n", "accuracy", "acc answered", "no answer", "chance", "majority gold"],
        [[s, f.n, f.accuracy, f.accuracy_answered, f.no_answer, f.chance, f.majority_gold] for s, f in rows],
    )
    predicted, gold = summary.answers.predicted, summary.answers.gold
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
    if summary.overall.pass_at is not None:
        ks = list(summary.overall.pass_at)
        report.heading("pass@k")
        report.paragraph(
            f"{summary.overall.samples} sampled replies per item; pass@k is the unbiased estimator of Chen et "
            "al. (2021), averaged over the items (pass@1 here is the sampled rate, not the greedy one)."
        )
        report.table(
            ["source", *(f"pass@{k}" for k in ks)],
            [[s, *((f.pass_at or {})[k] for k in ks)] for s, f in rows],
        )
    failed = [(r, r.error) for r in results if r.error]
    if failed:
        report.heading("Failed programs")
        report.paragraph(
            f"{len(failed)} programs failed their tests; the first {min(len(failed), _FAILED_SHOWN)}, with the code "
            "taken from the reply and the end of the error (each ran in the sandbox)."
        )
        for r, error in failed[:_FAILED_SHOWN]:
            report.heading(f"`{r.id}`: {error.splitlines()[0]}", level=3)
            report.code(_clip_lines(r.predicted or r.reply))
            report.code(error)
    return report


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

"""The experiment reports (``redpen run``, and train-assistant's general vs trained comparison).

Each condition carries its per-item verdicts (``verdicts``: item id -> right), so every two conditions measured on
the same items are compared item by item: difference, paired bootstrap 95% CI, exact McNemar p.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runtime.report.document import PAIRED_NOTE, Report, paired_table
from runtime.report.figures import Accuracy, ComparisonFigures, Condition, ExperimentFigures
from runtime.report.stats import pair_by_id

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CONDITIONS = ("baseline", "assisted", "retrieval_only")


def _cell(f: Accuracy) -> str:
    return f"{f.accuracy:.3f} ({f.correct}/{f.n})" if f.n else "-"


def paired_conditions(conditions: Mapping[str, Condition], a: str, b: str) -> tuple[str, list[bool], list[bool]]:
    """A :func:`paired_table` row, "b vs a": the two conditions' verdicts paired by item id."""
    x, y = pair_by_id(conditions[a].verdicts, conditions[b].verdicts)
    return f"{b.replace('_', '-')} vs {a.replace('_', '-')}", x, y


def accuracy_figure(report: Report, conditions: Mapping[str, Condition], names: Sequence[str], title: str) -> None:
    """Grouped bars into ``accuracy.png``: accuracy per source (and all) under each named condition, chance dotted."""
    sources = [*sorted(conditions[names[0]].by_source), "all"]

    def block(name: str, source: str) -> Accuracy:
        return _block(conditions[name], source)

    def draw(ax: Axes) -> None:
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sources))]
            ax.bar(xs, [block(name, s).accuracy for s in sources], width, label=name.replace("_", "-"))
        for j, source in enumerate(sources):
            chance = block(names[0], source).chance
            if chance is not None:
                ax.hlines(chance, j - 0.4, j + 0.4, colors="black", linestyles="dotted")
        ax.set_xticks(range(len(sources)))
        ax.set_xticklabels([s.split("/")[-1] for s in sources], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8)

    report.figure("accuracy.png", "Accuracy per source; dotted: chance.", draw, (max(6.0, 0.8 * len(sources) + 2), 4.2))


def _block(condition: Condition, source: str) -> Accuracy:
    return condition.overall if source == "all" else condition.by_source[source]


def render_experiment(figures: ExperimentFigures, config: Mapping[str, Any]) -> Report:
    """``redpen run``'s report: the conditions with their controls, paired differences, gathering, cost, examples."""
    c = figures.conditions
    w = figures.without_near_duplicates
    g = figures.gathering
    report = Report(f"redpen run: {figures.task}")
    report.paragraph(
        f"Student `{figures.student}`, assistant `{figures.assistant}`; {figures.n_gather} gather items, "
        f"{figures.n_examine} examine items (the same items in every condition)."
    )
    report.heading("Accuracy on the examine split")
    report.paragraph(
        "*retrieval-only* is a control with no model: the majority gold answer of the retrieved mistakes. "
        "*chance* answers uniformly among the options. When assisted accuracy does not beat retrieval-only, the "
        "memory's answers, not the assistant's guidance, explain any gain."
    )
    rows: list[list[object]] = []
    for source in [*sorted(c["baseline"].by_source), "all"]:
        base, assisted, control = (_block(c[cond], source) for cond in CONDITIONS)
        name = "**all**" if source == "all" else source
        no_answer = f"{base.no_answer} / {assisted.no_answer}"
        rows.append([name, base.n, _cell(base), _cell(assisted), _cell(control), base.chance, no_answer])
    report.table(
        ["source", "n", "baseline", "assisted", "retrieval-only", "chance", "no answer (base / assisted)"], rows
    )
    accuracy_figure(report, c, CONDITIONS, f"{figures.task}: {figures.student}")
    report.heading("Paired differences")
    report.paragraph(PAIRED_NOTE)
    comparisons = [
        paired_conditions(c, "baseline", "assisted"),
        paired_conditions(c, "baseline", "retrieval_only"),
        paired_conditions(c, "retrieval_only", "assisted"),
    ]
    if figures.near_duplicates and w["baseline"].overall.n:
        name, a, b = paired_conditions(w, "baseline", "assisted")
        comparisons.append((f"{name}, without near-duplicates", a, b))
    report.table(*paired_table(comparisons))
    report.heading("Near-duplicates")
    report.paragraph(
        f"{figures.near_duplicates} of {figures.n_examine} examine items have a near-duplicate among the "
        f"gathered questions (embedding similarity >= {figures.near_duplicate_threshold})."
    )
    report.table(
        ["items", "n", "baseline", "assisted", "retrieval-only"],
        [
            ["all", c["baseline"].overall.n, *(_cell(c[k].overall) for k in CONDITIONS)],
            ["without near-duplicates", w["baseline"].overall.n, *(_cell(w[k].overall) for k in CONDITIONS)],
        ],
    )
    report.heading("Gathering")
    report.bullets(
        [
            f"episodes: {g.episodes}; first answer wrong: {g.first_answer_wrong}; corrected within the round "
            f"limit: {g.corrected}",
            f"feedback turns: {g.feedback_turns}; rewarded (next answer right): {g.rewarded_turns}",
            f"feedback sentences that named the gold and were removed: {g.leaks_removed} turns; feedback not in "
            f"the asked format: {g.unparsed_feedback} turns",
            f"feedback sentences that said something of a social group and were removed: "
            f"{g.group_claims_removed} turns; guidelines replaced by the neutral fallback (too little "
            f"left): {g.generic_guidelines} turns; sentences restating the assistant's instructions, removed: "
            f"{g.instruction_echoes_removed} turns",
            f"mistakes in memory for this student and task: {figures.mistakes_stored}; retrieved per examine "
            f"item: {figures.retrieved_per_item}",
        ]
    )
    if g.stored_guidelines:
        report.paragraph("Stored guidelines (the first wrong episodes' last feedback, as the memory holds it):")
        report.bullets([f"“{text}”" for text in g.stored_guidelines])
    report.heading("Cost")
    phases = ("baseline", "gathering", "assisted")
    report.table(["phase", "seconds", "tokens"], [[p, f"{figures.time_s[p]:.1f}", figures.tokens[p]] for p in phases])
    report.heading("Examples of retrieved guidance")
    for ex in figures.examples:
        report.heading(f"{ex.id} ({ex.verdict}, gold {ex.target})", level=3)
        report.paragraph("Question:")
        report.code(ex.question)
        report.paragraph("Guidance given:")
        report.code(ex.guidance)
        report.paragraph(f"Student's reply: `{' '.join(ex.reply.split())[:300]}`")
    report.heading("Settings")
    report.table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items()])
    return report


def render_comparison(figures: ComparisonFigures, training: Mapping[str, Any], replay: Mapping[str, Any]) -> Report:
    """General vs trained study assistant on the same examine items, memory and student."""
    c = figures.conditions
    names: tuple[str, ...] = ("general", "trained", "retrieval_only")
    reference = figures.run_assistant is not None
    if reference:  # the run's own assistant (the teacher the adapter learned from), from the run's assisted exam
        names = ("general", "trained", "run_assistant", "retrieval_only")
    report = Report(f"General vs trained study assistant: {figures.task}")
    report.paragraph(
        f"Student `{figures.student}`; general assistant `{figures.general_assistant}`, trained assistant "
        f"`{figures.trained_assistant}`; the same {figures.n_examine} examine items and the same memory. "
        "*retrieval-only* (no model: the majority gold of the retrieved mistakes) is the control."
        + (
            f" *run-assistant* is the gathering run's own assistant, `{figures.run_assistant}`, whose rewarded turns "
            "the adapter learned from: its assisted exam in that run, on these items with this memory."
            if reference
            else ""
        )
    )
    rows: list[list[object]] = []
    for source in [*sorted(c["general"].by_source), "all"]:
        blocks = [_block(c[k], source) for k in names]
        name = "**all**" if source == "all" else source
        rows.append([name, blocks[0].n, *(_cell(b) for b in blocks), blocks[0].chance])
    report.table(["source", "n", *(n.replace("_", "-") for n in names), "chance"], rows)
    accuracy_figure(report, c, names, f"{figures.task}: general vs trained assistant")
    report.heading("Paired differences")
    report.paragraph(PAIRED_NOTE)
    pairs = [("general", "trained"), ("retrieval_only", "trained")]
    if reference:
        pairs += [("general", "run_assistant"), ("trained", "run_assistant")]
    report.table(*paired_table([paired_conditions(c, a, b) for a, b in pairs]))
    report.paragraph(
        f"Answers that changed between the two assistants: {figures.changed_answers} of {figures.n_examine}."
    )
    per_task = ", ".join(f"{t} {v['kept']}/{v['steps']}" for t, v in replay["by_task"].items())
    report.heading("Training")
    report.bullets(
        [
            f"replay: {replay['steps']} feedback steps, {replay['kept']} rewarded and kept (per task: {per_task})",
            f"LoRA fine-tuning: {training['steps']} steps, final loss {training['final_loss']:.4f}, "
            f"dataset sha256 `{training['dataset_hash'][:12]}`",
            f"adapter: `{training['adapter_dir']}`",
        ]
    )
    return report

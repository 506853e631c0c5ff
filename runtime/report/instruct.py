"""``redpen instruct``'s report: accuracy per condition with controls, paired CIs, learned/forgotten, answer
distributions beside the gold, supply counts, time and tokens per stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from runtime.report.document import PAIRED_NOTE, Report, paired_table
from runtime.report.figures import Change, InstructFigures
from runtime.report.stats import pair_by_id

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Verdicts = Mapping[str, Mapping[str, Mapping[str, bool]]]  # condition -> benchmark -> item id -> right


def predecessor(condition: str) -> str:
    """The condition a model was trained from: iteration i-1 of the same chain, the base for i = 1.

    >>> predecessor("iter1"), predecessor("plain3")
    ('base', 'plain2')
    """
    name = condition.rstrip("0123456789")
    i = int(condition[len(name) :])
    return "base" if i == 1 else f"{name}{i - 1}"


def render_instruct(figs: InstructFigures, verdicts: Verdicts, settings: Mapping[str, Any]) -> Report:
    """The report of ``figs``; ``verdicts`` pairs every two conditions item by item."""
    order = figs.conditions
    report = Report("redpen instruct: learning from errors into the weights")
    report.paragraph(
        f"Targets {', '.join(settings['targets'])}; strategies {', '.join(settings['strategies'])}; baselines "
        f"{', '.join(settings['baselines']) or 'none'}; evaluation split *{settings['eval_split']}*. In-domain: "
        f"{', '.join(figs.in_domain)}; every other benchmark is out of domain."
    )
    report.heading("Accuracy with its controls (same items in every column)")
    headers = ["benchmark", "n", *order, "chance", "majority gold"]
    rows = []
    for b in figs.benchmarks:
        conds = figs.by_benchmark[b].conditions
        base = conds["base"]
        rows.append([b, base.n, *(conds[k].accuracy for k in order), base.chance or "-", base.majority_gold or "-"])
    report.table(headers, rows)
    report.figure(
        "accuracy.png",
        "Accuracy per iteration, per benchmark (dashed: majority-gold control).",
        lambda ax: _plot_accuracy(ax, figs),
    )

    report.heading("Paired comparisons")
    report.paragraph(PAIRED_NOTE)
    pairs = [(c, "base") for c in order if c != "base"]
    baselines = [c for c in order if not c.startswith(("iter", "base"))]
    pairs += [(c, "iter" + c[len(c.rstrip("0123456789")) :]) for c in baselines]
    # Baselines of one iteration against each other (e.g. replay1 vs plain1): same rows, other choice of items.
    pairs += [(a, b) for i, b in enumerate(baselines) for a in baselines[i + 1 :] if _iteration(a) == _iteration(b)]
    for b in figs.benchmarks:
        table_rows = []
        for after, before in pairs:
            a, z = pair_by_id(verdicts[before][b], verdicts[after][b])
            table_rows.append((f"{after} vs {before}", a, z))
        headers_p, body = paired_table(table_rows, "A", "B", first=f"{b}: B vs A")
        report.table(headers_p, body)

    report.heading("Learned and forgotten (vs the model each was trained from)")
    report.paragraph(
        "*learned*: items right now that were wrong before, over the benchmark's items; *forgotten*: the reverse "
        "(the LLMs-as-Instructors paper's rates). The per-item ledger is `ledger.jsonl`."
    )
    lf_rows = []
    for b in figs.benchmarks:
        for c in order[1:]:
            v = _change(figs, b, c)
            lf_rows.append(
                [b, f"{c} vs {predecessor(c)}", v.n, v.learned, v.learned_rate, v.forgotten, v.forgotten_rate]
            )
    report.table(["benchmark", "change", "n", "learned", "learned rate", "forgotten", "forgotten rate"], lf_rows)
    report.figure(
        "learned_forgotten.png", "Learned (up) and forgotten (down) rates per condition.", lambda ax: _plot_lf(ax, figs)
    )

    report.heading("Answer distributions beside the gold")
    report.paragraph(
        "Predicted answers per condition; *shift* is the total variation distance from the gold distribution, "
        "flagged (**!**) above 0.25. A fine-tune that learns an answer letter instead of the task shows up here."
    )
    dist_rows = []
    for b in figs.benchmarks:
        entry = figs.by_benchmark[b]
        if not entry.gold:  # not multiple choice: every gold is its own
            continue
        dist_rows.append([b, "gold", _dist(entry.gold), "-"])
        for c in order:
            e = entry.conditions[c]
            dist_rows.append([b, c, _dist(e.predicted), f"{e.prior_shift:.3f}{' !' if e.prior_shift_flag else ''}"])
    report.table(["benchmark", "condition", "answers", "shift"], dist_rows)

    report.heading("Training data supplied")
    supply_rows = []
    for c, s in figs.supplies.items():
        asked = s.get("asked", "-")
        supply_rows.append(
            [
                c,
                s.get("strategy", "-"),
                s.get("wrong_cases", s.get("cases", "-")),
                asked,
                s.get("parsed", "-"),
                s.get("exact_duplicates", "-"),
                s.get("near_duplicates", "-"),
                s.get("contaminated", "-"),
                s["rows"],
                _dist(s.get("gold_of_rows", {})),
                s.get("overlap", {}).get("mean", "-"),
            ]
        )
    report.table(
        [
            "condition",
            "strategy",
            "wrong cases",
            "asked",
            "parsed",
            "exact dup",
            "near dup",
            "contaminated",
            "rows",
            "row golds",
            "mean max ROUGE-L",
        ],
        supply_rows,
    )
    rejected = {c: s["rejected"] for c, s in figs.supplies.items() if s.get("rejected")}
    if rejected:
        report.paragraph(
            "Rejected instructor blocks by reason: " + "; ".join(f"{c}: {_dist(r)}" for c, r in rejected.items())
        )

    items = {c: set(s["items"]) for c, s in figs.supplies.items() if "items" in s}
    shared = [
        [f"{a} & {b}", len(items[a]), len(items[b]), len(items[a] & items[b])]
        for i, a in enumerate(items)
        for b in list(items)[i + 1 :]
        if _iteration(a) == _iteration(b)
    ]
    if shared:
        # When two conditions train on the same items, their difference says nothing about which items were chosen.
        report.paragraph(
            "Selection items behind each condition's rows, and how many two conditions share (an instructor's "
            "sample counts as the case it was written for):"
        )
        report.table(["conditions", "items A", "items B", "shared"], shared)

    untrained = [c for c, s in figs.supplies.items() if s.get("rows") == 0]
    if untrained:
        # Said in words: identical columns above would otherwise read as "trained, and learned nothing".
        report.paragraph(
            f"No training rows, so no training: {', '.join(untrained)} evaluated the model it would have started "
            "from, unchanged."
        )

    report.heading("Time and tokens per stage")
    st = figs.stages
    report.table(["stage", "seconds", "tokens"], [[k, v, st.tokens.get(k, 0)] for k, v in st.seconds.items()])
    return report


def _iteration(condition: str) -> str:
    return condition[len(condition.rstrip("0123456789")) :]


def _change(figs: InstructFigures, benchmark: str, condition: str) -> Change:
    change = figs.by_benchmark[benchmark].conditions[condition].vs_previous
    if change is None:
        raise ValueError(f"{condition} on {benchmark} has no predecessor to compare with")
    return change


def _dist(d: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _plot_accuracy(ax: Axes, figs: InstructFigures) -> None:
    """Accuracy per iteration with 95% Wilson intervals; each benchmark's chance and majority-gold lines labelled."""
    from matplotlib.ticker import MaxNLocator

    chains: dict[str, list[str]] = {}
    for c in figs.conditions[1:]:
        chains.setdefault(c.rstrip("0123456789"), []).append(c)
    for b in figs.benchmarks:
        conds = figs.by_benchmark[b].conditions
        for chain, members in chains.items():
            xs = [0, *range(1, len(members) + 1)]
            points = [conds["base"], *(conds[m] for m in members)]
            ys = [p.accuracy for p in points]
            low, high = zip(*(wilson(p.correct, p.n) for p in points), strict=True)
            errors = [[y - lo for y, lo in zip(ys, low, strict=True)], [hi - y for y, hi in zip(ys, high, strict=True)]]
            ax.errorbar(
                xs,
                ys,
                yerr=errors,
                marker="o",
                capsize=3,
                label=f"{b} {chain}",
                linestyle="-" if chain == "iter" else ":",
            )
        base = conds["base"]
        if base.majority_gold is not None:
            ax.axhline(base.majority_gold, linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(f"{b} majority gold", (0, base.majority_gold), fontsize=6, color="grey", va="bottom")
        if base.chance is not None:
            ax.axhline(base.chance, linestyle=":", linewidth=0.8, color="silver")
            ax.annotate(f"{b} chance", (0, base.chance), fontsize=6, color="silver", va="bottom")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0 = base)")
    ax.set_ylabel("accuracy (bars: 95% Wilson interval)")
    ax.legend(fontsize=6)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` out of ``n``.

    >>> [round(x, 3) for x in wilson(30, 66)]
    [0.34, 0.574]
    """
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def _plot_lf(ax: Axes, figs: InstructFigures) -> None:
    labels, learned, forgotten = [], [], []
    learned_n: list[int] = []
    forgotten_n: list[int] = []
    for b in figs.benchmarks:
        for c in figs.conditions[1:]:
            v = _change(figs, b, c)
            labels.append(f"{b[:14]}\n{c}")
            learned.append(v.learned_rate)
            forgotten.append(-v.forgotten_rate)
            learned_n.append(v.learned)
            forgotten_n.append(v.forgotten)
    xs = range(len(labels))
    up = ax.bar(xs, learned, color="tab:green", label="learned")
    down = ax.bar(xs, forgotten, color="tab:red", label="forgotten")
    ax.bar_label(up, labels=[str(n) for n in learned_n], fontsize=6)
    ax.bar_label(down, labels=[str(n) for n in forgotten_n], fontsize=6)
    ax.set_xticks(list(xs), labels, fontsize=5, rotation=90)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)

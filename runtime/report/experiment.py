"""The experiment report: Markdown tables with their controls, and a PNG plot of accuracy per source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONDITIONS = ("baseline", "assisted", "retrieval_only")


def _cell(f: dict[str, Any]) -> str:
    return f"{f['accuracy']:.3f} ({f['correct']}/{f['n']})" if f["n"] else "-"


def render_experiment(figures: dict[str, Any], config: dict[str, Any]) -> str:
    c = figures["conditions"]
    g = figures["gathering"]
    lines = [
        f"# redpen run: {figures['task']}",
        "",
        f"Student `{figures['student']}`, assistant `{figures['assistant']}`; {figures['n_gather']} gather items, "
        f"{figures['n_examine']} examine items (the same items in every condition).",
        "",
        "## Accuracy on the examine split",
        "",
        "*retrieval-only* is a control with no model: the majority gold answer of the retrieved mistakes. "
        "*chance* answers uniformly among the options. When assisted accuracy does not beat retrieval-only, the "
        "memory's answers, not the assistant's guidance, explain any gain.",
        "",
        "| source | n | baseline | assisted | retrieval-only | chance | no answer (base / assisted) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for source in [*sorted(c["baseline"]["by_source"]), "all"]:
        base, assisted, control = (
            c[cond]["overall"] if source == "all" else c[cond]["by_source"][source] for cond in CONDITIONS
        )
        chance = f"{base['chance']:.3f}" if base["chance"] is not None else "-"
        name = "**all**" if source == "all" else source
        lines.append(
            f"| {name} | {base['n']} | {_cell(base)} | {_cell(assisted)} | {_cell(control)} | {chance} "
            f"| {base['no_answer']} / {assisted['no_answer']} |"
        )
    w = figures["without_near_duplicates"]
    lines += [
        "",
        "## Near-duplicates",
        "",
        f"{figures['near_duplicates']} of {figures['n_examine']} examine items have a near-duplicate among the "
        f"gathered questions (embedding similarity >= {figures['near_duplicate_threshold']}).",
        "",
        "| items | n | baseline | assisted | retrieval-only |",
        "|---|---:|---:|---:|---:|",
        f"| all | {c['baseline']['overall']['n']} | " + " | ".join(_cell(c[k]["overall"]) for k in CONDITIONS) + " |",
        f"| without near-duplicates | {w['baseline']['overall']['n']} | "
        + " | ".join(_cell(w[k]["overall"]) for k in CONDITIONS)
        + " |",
        "",
        "## Gathering",
        "",
        f"- episodes: {g['episodes']}; first answer wrong: {g['first_answer_wrong']}; corrected within the round "
        f"limit: {g['corrected']}",
        f"- feedback turns: {g['feedback_turns']}; rewarded (next answer right): {g['rewarded_turns']}",
        f"- feedback sentences that named the gold and were removed: {g['leaks_removed']} turns; feedback not in the "
        f"asked format: {g['unparsed_feedback']} turns",
        f"- mistakes in memory for this student and task: {figures['mistakes_stored']}; retrieved per examine item: "
        f"{figures['retrieved_per_item']}",
        "",
        "## Cost",
        "",
        "| phase | seconds | tokens |",
        "|---|---:|---:|",
    ]
    for phase in ("baseline", "gathering", "assisted"):
        lines.append(f"| {phase} | {figures['time_s'][phase]} | {figures['tokens'][phase]} |")
    lines += ["", "## Examples of retrieved guidance", ""]
    for ex in figures["examples"]:
        lines += [
            f"### {ex['id']} ({ex['verdict']}, gold {ex['target']})",
            "",
            "Question:",
            "",
            *[f"    {line}" for line in ex["question"].splitlines()],
            "",
            "Guidance given:",
            "",
            *[f"    {line}" for line in ex["guidance"].splitlines()],
            "",
            f"Student's reply: `{' '.join(ex['reply'].split())[:300]}`",
            "",
        ]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in config.items()]
    return "\n".join(lines) + "\n"


def plot_experiment(figures: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy per source under each condition, chance as a tick per source."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    c = figures["conditions"]
    sources = [*sorted(c["baseline"]["by_source"]), "all"]

    def acc(cond: str, source: str) -> float:
        return (c[cond]["overall"] if source == "all" else c[cond]["by_source"][source])["accuracy"]

    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(sources) + 2), 4.2))
    for i, cond in enumerate(CONDITIONS):
        xs = [j + (i - 1) * width for j in range(len(sources))]
        ax.bar(xs, [acc(cond, s) for s in sources], width, label=cond.replace("_", "-"))
    chance = [(c["baseline"]["overall"] if s == "all" else c["baseline"]["by_source"][s])["chance"] for s in sources]
    for j, value in enumerate(chance):
        if value is not None:
            ax.hlines(value, j - 1.5 * width, j + 1.5 * width, colors="black", linestyles="dotted")
    ax.set_xticks(range(len(sources)))
    ax.set_xticklabels([s.split("/")[-1] for s in sources], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{figures['task']}: {figures['student']} (dotted: chance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_comparison(figures: dict[str, Any], training: dict[str, Any], replay: dict[str, Any]) -> str:
    """General vs trained study assistant on the same examine items, memory and student."""
    c = figures["conditions"]
    lines = [
        f"# General vs trained study assistant: {figures['task']}",
        "",
        f"Student `{figures['student']}`; general assistant `{figures['general_assistant']}`, trained assistant "
        f"`{figures['trained_assistant']}`; the same {figures['n_examine']} examine items and the same memory.",
        "*retrieval-only* (no model: the majority gold of the retrieved mistakes) is the control.",
        "",
        "| source | n | general | trained | retrieval-only | chance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for source in [*sorted(c["general"]["by_source"]), "all"]:
        general, trained, control = (
            c[k]["overall"] if source == "all" else c[k]["by_source"][source]
            for k in ("general", "trained", "retrieval_only")
        )
        chance = f"{general['chance']:.3f}" if general["chance"] is not None else "-"
        name = "**all**" if source == "all" else source
        lines.append(f"| {name} | {general['n']} | {_cell(general)} | {_cell(trained)} | {_cell(control)} | {chance} |")
    per_task = ", ".join(f"{t} {v['kept']}/{v['steps']}" for t, v in replay["by_task"].items())
    lines += [
        "",
        f"Answers that changed between the two assistants: {figures['changed_answers']} of {figures['n_examine']}.",
        "",
        "## Training",
        "",
        f"- replay: {replay['steps']} feedback steps, {replay['kept']} rewarded and kept (per task: {per_task})",
        f"- LoRA fine-tuning: {training['steps']} steps, final loss {training['final_loss']:.4f}, "
        f"dataset sha256 `{training['dataset_hash'][:12]}`",
        f"- adapter: `{training['adapter_dir']}`",
    ]
    return "\n".join(lines) + "\n"

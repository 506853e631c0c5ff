"""The LEMA ablation: fine-tune the student on CoT only and on CoT + corrections at equal size, evaluate both.

Equal size is the point (the LLMs-as-Instructors comparison): a gain from the mixed set must not come from simply
having more rows. Both adapters and the untouched base model answer the same examine items in one run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.data.records import Record
from runtime.data.rundir import RunDir, read_dataset, write_atomic
from runtime.data.tasks import Example
from runtime.defaults import CONCURRENCY
from runtime.errors import DataError
from runtime.models.backend import GenerationSettings
from runtime.models.local import LocalBackend
from runtime.report import PAIRED_NOTE, Condition, Report, accuracy_figure, paired_conditions, paired_table
from runtime.workflows.evaluation import condition_summary, run_eval
from training.lema.data import CORRECTIONS, COT, equal_size
from training.sft_config import LoraSFTConfig
from training.sft_trainer import TrainResult, train_lora

SETS = ("cot_only", "cot_plus_corrections")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``redpen correct`` dataset, read strictly (a bad line is an error naming ``file:line``)."""
    if not path.exists():
        raise DataError(f"{path} does not exist: run `redpen correct` first")
    return [row for _, row in read_dataset(path)]


def training_set_texts(data: Path, n: int | None, seed: int = 0) -> dict[str, str]:
    """The JSONL text of the two equal-size training sets from a ``redpen correct`` run; ``n``: all CoT rows."""
    cot, corrections = read_rows(data / COT), read_rows(data / CORRECTIONS)
    if not corrections:
        raise DataError(
            f"{data / CORRECTIONS} has no kept corrections, so both training sets would be the same; correct more "
            "problems or use a stronger --corrector-model"
        )
    cot_only, mixed = equal_size(cot, corrections, n or len(cot), seed)
    return {
        name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        for name, rows in zip(SETS, (cot_only, mixed), strict=True)
    }


def write_training_sets(texts: dict[str, str], out: Path) -> dict[str, Path]:
    """Each set of :func:`training_set_texts` as ``out/<name>.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in texts}
    for name, text in texts.items():
        write_atomic(paths[name], text)
    return paths


def training_sets(data: Path, out: Path, n: int | None, seed: int = 0) -> dict[str, Path]:
    """Write the two equal-size training sets from a ``redpen correct`` run; ``n`` defaults to all CoT rows."""
    return write_training_sets(training_set_texts(data, n, seed), out)


def train_sets(
    sets: dict[str, Path],
    out: Path,
    base_model: str | None,
    max_steps: int | None,
    on_log: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
) -> dict[str, TrainResult]:
    """One adapter per training set, through the project's one LoRA trainer."""
    results = {}
    for name, dataset in sets.items():
        config = LoraSFTConfig(output_dir=str(out / f"adapter-{name}"), base_model=base_model).with_steps(max_steps)
        results[name] = train_lora(dataset, config, on_log=on_log(name) if on_log else None)
    return results


async def evaluate_adapters(
    examples: Sequence[Example],
    base_model: str | None,
    adapters: dict[str, Path],
    run: RunDir,
    settings: GenerationSettings,
    concurrency: int = CONCURRENCY,
    on_result: Callable[[str], Callable[[Record], None]] | None = None,
) -> dict[str, Condition]:
    """The base model and each adapter on the same examples: one results file and summary (with verdicts) each."""
    backend = LocalBackend(base_model, adapters={name: str(path) for name, path in adapters.items()})
    figures: dict[str, Condition] = {}
    try:
        for name in ("base", *adapters):
            adapter = None if name == "base" else name
            results = await run_eval(
                examples,
                backend,
                run,
                settings,
                adapter=adapter,
                concurrency=concurrency,
                on_result=on_result(name) if on_result else None,
                results_file=f"eval_{name}.jsonl",
            )
            figures[name] = condition_summary(results)
    finally:
        await backend.aclose()
    return figures


def render_ablation(
    task: str, figures: dict[str, Condition], trained: dict[str, TrainResult], sets: dict[str, Path]
) -> Report:
    """The conditions with their controls, then each fine-tuned set against the other and the base, item by item."""
    report = Report(f"LEMA ablation: {task}")
    report.paragraph(
        "The student fine-tuned on CoT only and on CoT + corrections, with the same number of rows, and the base "
        "model, on the same examine items. Controls: *chance* is a uniform guess among the options (none for "
        "numeric answers); *majority gold* always answers the most common gold answer."
    )
    rows: list[list[object]] = []
    for name, f in figures.items():
        overall = f.overall
        size = corrections = loss = None
        if name in sets:
            data = read_rows(sets[name])
            size, corrections = len(data), sum("Incorrect Step" in r["messages"][-1]["content"] for r in data)
            loss = f"{trained[name].final_loss:.4f}"
        rows.append(
            [
                name,
                size,
                corrections,
                loss,
                overall.n,
                overall.accuracy,
                overall.no_answer,
                overall.chance,
                overall.majority_gold,
            ]
        )
    report.table(
        ["condition", "rows", "corrections", "final loss", "n", "accuracy", "no answer", "chance", "majority gold"],
        rows,
    )
    # CoT + corrections against CoT is the comparison the ablation is for; each against the base shows the gain.
    pairs = [("cot_only", "cot_plus_corrections"), ("base", "cot_only"), ("base", "cot_plus_corrections")]
    comparisons = [paired_conditions(figures, a, b) for a, b in pairs if a in figures and b in figures]
    if comparisons:
        report.heading("Paired differences")
        report.paragraph(PAIRED_NOTE)
        report.table(*paired_table(comparisons))
    accuracy_figure(report, figures, list(figures), f"LEMA ablation: {task}")
    return report

"""Every report redpen renders, on fixed small inputs, against the text it rendered before (tests/golden/).

The goldens pin the Markdown, the HTML (its PNG data left out: matplotlib versions draw different bytes) and the
figures' JSON, so moving the renderers or typing the figures cannot change what a reader sees.
Regenerate after a deliberate change with ``REDPEN_GOLDEN=write pytest tests/test_report_golden.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from runtime.data.records import Action, Episode, ItemResult, SampleResult, State, Turn
from runtime.data.tasks import Example
from runtime.report import (
    ComparisonFigures,
    Condition,
    ExperimentFigures,
    Stages,
    render_comparison,
    render_evaluation,
    render_experiment,
    render_instruct,
)
from runtime.workflows.evaluation import condition_summary, summarize
from runtime.workflows.experiment import gathering_figures, guidance_examples
from training.instruct.report import Results, verdicts_of
from training.instruct.report import figures as instruct_figures

GOLDEN = Path(__file__).parent / "golden"


def _item(i: int, source: str, verdict: str, predicted: str | None, target: str, **extra: Any) -> ItemResult:
    return ItemResult(
        id=f"{source}/{i}",
        source=source,
        mode=extra.pop("mode", "generate"),
        verdict=verdict,  # type: ignore[arg-type]
        predicted=predicted,
        target=target,
        n_options=extra.pop("n_options", 3),
        reply=extra.pop("reply", f"The answer is {predicted}"),
        prompt_tokens=10 + i,
        completion_tokens=3 + i,
        **extra,
    )


def choice_results(pattern: str, mode: str = "generate", **extra: Any) -> list[ItemResult]:
    """Eight multiple-choice items over two sources; ``pattern`` is one verdict letter per item (c, w, n)."""
    golds = ["(A)", "(B)", "(A)", "(C)", "(B)", "(A)", "(A)", "(C)"]
    out = []
    for i, (v, gold) in enumerate(zip(pattern, golds, strict=True)):
        verdict = {"c": "correct", "w": "wrong", "n": "no_answer"}[v]
        predicted = gold if v == "c" else (None if v == "n" else ("(B)" if gold != "(B)" else "(A)"))
        out.append(_item(i, "bbq/Age" if i < 4 else "bbq/Travel", verdict, predicted, gold, mode=mode, **extra))
    return out


def code_results() -> list[ItemResult]:
    samples = [SampleResult(reply="def f(): pass", verdict="correct"), SampleResult(reply="x", verdict="wrong")]
    return [
        _item(0, "humaneval", "correct", "def f():\n    return 1", "", n_options=0, samples=samples),
        _item(
            1,
            "humaneval",
            "wrong",
            "\n".join(f"line {j}" for j in range(45)),
            "",
            n_options=0,
            samples=samples[::-1],
            error="AssertionError: f(2) != 3\nTraceback (most recent call last):\n  File <program>",
        ),
    ]


def episodes() -> list[Episode]:
    def turn(r: int, reward: int, **action: Any) -> Turn:
        fields = {"reason": "why", "guideline": f"Read the question twice ({r}).", "text": "feedback", "leaked": False}
        return Turn(
            round=r,
            state=State(query="q", response="(A)", context=[]),
            action=Action(**{**fields, "parsed": True, **action}),
            reward=reward,  # type: ignore[arg-type]
            next_response="(B)",
        )

    def episode(i: int, first: str, turns: list[Turn], corrected: bool) -> Episode:
        return Episode(
            id=f"g/{i}",
            source="bbq/Age",
            task="kin",
            model_id="student",
            assistant_id="assistant",
            query="q",
            gold="(B)",
            first_answer="(A)",
            first_verdict=first,  # type: ignore[arg-type]
            turns=turns,
            verdict="correct" if corrected or first == "correct" else "wrong",
            predicted="(B)",
            rounds=len(turns),
            corrected=corrected,
            leaks=0,
            prompt_tokens=20 + i,
            completion_tokens=5,
            time_s=1.0,
        )

    return [
        episode(0, "correct", [], False),
        episode(1, "wrong", [turn(1, 1, leaked=True)], True),
        episode(2, "wrong", [turn(1, 0, stereotyped=True), turn(2, 0, parsed=False, generic=True, echoed=True)], False),
    ]


EXAMINE = [Example(f"bbq/Age/{i}", "bbq/Age", f"Question {i}?", "(A)", "choice", ("a", "b", "c")) for i in range(4)]


def _conditions(results: dict[str, list[ItemResult]]) -> dict[str, Condition]:
    return {name: condition_summary(rs) for name, rs in results.items()}


def experiment_inputs() -> tuple[ExperimentFigures, dict[str, Any]]:
    baseline = choice_results("cwnwcwwc", mode="baseline")
    assisted = choice_results("ccwccwcc", mode="assisted", guidance="Guideline: read twice.")
    control = choice_results("cwwwcccw", mode="retrieval_only")
    conditions = {"baseline": baseline, "assisted": assisted, "retrieval_only": control}
    duplicated = {"bbq/Age/0", "bbq/Travel/5"}
    eps = episodes()
    tokens = {
        "baseline": sum(r.prompt_tokens + r.completion_tokens for r in baseline),
        "gathering": sum(e.prompt_tokens + e.completion_tokens for e in eps),
        "assisted": sum(r.prompt_tokens + r.completion_tokens for r in assisted),
    }
    figures = ExperimentFigures(
        task="kin",
        student="student",
        assistant="assistant",
        n_gather=3,
        n_examine=8,
        conditions=_conditions(conditions),
        without_near_duplicates=_conditions(
            {k: [r for r in rs if r.id not in duplicated] for k, rs in conditions.items()}
        ),
        near_duplicates=len(duplicated),
        near_duplicate_threshold=0.95,
        gathering=gathering_figures(eps),
        mistakes_stored=2,
        retrieved_per_item=1.5,
        examples=guidance_examples(assisted, EXAMINE, n=2),
        time_s={"baseline": 1.5, "gathering": 12.25, "assisted": 2.0},
        tokens=tokens,
    )
    config = {"command": "run", "task": "kin", "rounds": 3, "k": 3}
    return figures, config


def comparison_inputs() -> tuple[ComparisonFigures, dict[str, Any], dict[str, Any]]:
    general = choice_results("cwnwcwwc", mode="assisted")
    trained = choice_results("ccwccwcc", mode="assisted")
    control = choice_results("cwwwcccw", mode="retrieval_only")
    answers = {r.id: r.predicted for r in trained}
    figures = ComparisonFigures(
        task="kin",
        student="student",
        general_assistant="general",
        trained_assistant="trained",
        n_examine=8,
        conditions=_conditions({"general": general, "trained": trained, "retrieval_only": control}),
        changed_answers=sum(r.predicted != answers[r.id] for r in general),
    )
    training = {"steps": 12, "final_loss": 0.123456, "dataset_hash": "0123456789abcdef", "adapter_dir": "adapter"}
    replay = {"steps": 5, "kept": 3, "by_task": {"kin": {"steps": 5, "kept": 3}}}
    return figures, training, replay


def instruct_inputs() -> tuple[Results, dict[str, Any], dict[str, Any]]:
    patterns = {
        "base": ("cwnwcwwc", "cwwc"),
        "iter1": ("ccwwcwcc", "cwcc"),
        "plain1": ("cwnwcwcc", "wwwc"),
        "iter2": ("ccwccwcc", "ccwc"),
        "plain2": ("cwwwcwcc", "cwwc"),
    }

    def code(pattern: str) -> list[ItemResult]:
        return [
            _item(i, "mbpp", "correct" if v == "c" else "wrong", "def f(): ...", f"gold {i}", n_options=0)
            for i, v in enumerate(pattern)
        ]

    results = {c: {"bbq": choice_results(mc), "mbpp": code(cd)} for c, (mc, cd) in patterns.items()}
    supplies = {
        "iter1": {
            "wrong_cases": 4,
            "rows": 6,
            "gold_of_rows": {"(A)": 3, "(B)": 3},
            "overlap": {"mean": 0.21},
            "items": ["bbq/Age/1", "bbq/Age/2"],
            "asked": 8,
            "parsed": 7,
            "rejected": {"no question": 1},
        },
        "plain1": {"strategy": "plain", "rows": 6, "items": ["bbq/Age/2", "bbq/Age/3"]},
        "iter2": {"cases": 3, "rows": 0, "items": []},
        "plain2": {"strategy": "plain", "rows": 0},
    }
    stages = Stages(seconds={"base eval": 1.5, "iter1 train": 20.25}, tokens={"base eval": 321})
    settings = {"targets": ["bbq"], "strategies": ["le"], "baselines": ["plain"], "eval_split": "examine"}
    return results, {"supplies": supplies, "stages": stages}, settings


def _no_png(html: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,...", html)


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("REDPEN_GOLDEN") == "write":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden"


def _check_written(stem: str, md: Path, page: Path) -> None:
    _check(f"{stem}.md", md.read_text(encoding="utf-8"))
    _check(f"{stem}.html", _no_png(page.read_text(encoding="utf-8")))


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"


@pytest.mark.parametrize("kind", ["choice", "code"])
def test_the_eval_report_is_as_before(kind: str, tmp_path: Path) -> None:
    results = choice_results("cwnwcwwc") if kind == "choice" else code_results()
    metrics = dataclasses.replace(summarize(results), elapsed_s=3.25, run_dir="runs/eval")
    _check(f"eval_{kind}.json", _json(metrics.to_dict()))
    config = {"command": "eval", "task": "bbq", "limit": None, "max_new_tokens": 64}
    md, page = render_evaluation(f"redpen eval: {kind}", config, metrics, results).write(tmp_path)
    _check_written(f"eval_{kind}", md, page)


def test_the_experiment_report_is_as_before(tmp_path: Path) -> None:
    figures, config = experiment_inputs()
    _check("experiment.json", _json(figures.to_dict()))
    md, page = render_experiment(figures, config).write(tmp_path)
    _check_written("experiment", md, page)


def test_the_comparison_report_is_as_before(tmp_path: Path) -> None:
    figures, training, replay = comparison_inputs()
    _check("comparison.json", _json(figures.to_dict()))
    md, page = render_comparison(figures, training, replay).write(tmp_path)
    _check_written("comparison", md, page)


def test_the_instruct_report_is_as_before(tmp_path: Path) -> None:
    results, run, settings = instruct_inputs()
    figs = instruct_figures(results, run["supplies"], run["stages"], ["bbq"], open_answers=["mbpp"])
    _check("instruct.json", _json(figs.to_dict()))
    md, page = render_instruct(figs, verdicts_of(results), settings).write(tmp_path)
    _check_written("instruct", md, page)

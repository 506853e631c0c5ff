"""train-assistant sets the run's own assistant (the teacher the adapter learned from) beside general and trained."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from runtime.data.records import BackendInfo, GatherIdentity, RunConfig
from runtime.data.tasks import Example
from runtime.report import render_comparison
from tests.test_report_golden import _conditions, choice_results, comparison_inputs
from training.assistant import run_assistant_results

STUDENT = "/models/student"


def run_dir(tmp_path: Path, assistant: BackendInfo, patterns: str = "ccwccwcc") -> tuple[RunConfig, Path]:
    """A run directory whose assisted exam answered the eight golden items with ``patterns``."""
    config = RunConfig(
        identity=GatherIdentity(
            task="bbq", limit=8, rounds=3, student="student", assistant=assistant.model_id, student_settings={}
        ),
        assistant_backend=assistant,
    )
    lines = [json.dumps(r.to_json()) + "\n" for r in choice_results(patterns, mode="assisted")]
    (tmp_path / "exam_assisted.jsonl").write_text("".join(reversed(lines)), encoding="utf-8")
    return config, tmp_path


def examples(n: int = 8) -> list[Example]:
    return [
        Example(r.id, r.source, "question", r.target, "choice", ("a", "b", "c")) for r in choice_results("c" * 8)[:n]
    ]


def test_the_teacher_run_gives_its_assisted_answers_in_item_order(tmp_path: Path) -> None:
    teacher = BackendInfo(kind="teacher", model_id="Qwen-1.5B")
    config, path = run_dir(tmp_path, teacher)
    found = run_assistant_results(config, path, examples(), STUDENT)
    assert found is not None
    name, results = found
    assert name == "Qwen-1.5B"
    assert [r.id for r in results] == [e.id for e in examples()]  # the file was written in reverse
    assert [r.verdict for r in results][:3] == ["correct", "correct", "wrong"]


def test_no_reference_when_the_run_assistant_is_the_trained_base(tmp_path: Path) -> None:
    config, path = run_dir(tmp_path, BackendInfo(kind="local", model_id="student", path=STUDENT))
    assert run_assistant_results(config, path, examples(), STUDENT) is None
    other = BackendInfo(kind="local", model_id="bigger", path="/models/bigger")
    config, path = run_dir(tmp_path, other)
    assert run_assistant_results(config, path, examples(), STUDENT) is not None


def test_an_item_the_run_never_examined_leaves_the_reference_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, path = run_dir(tmp_path, BackendInfo(kind="teacher", model_id="Qwen-1.5B"))
    asked = [*examples(), Example("bbq/Age/99", "bbq/Age", "q", "(A)", "choice", ("a", "b", "c"))]
    with caplog.at_level(logging.WARNING):
        assert run_assistant_results(config, path, asked, STUDENT) is None
    assert "1 of 9 items have no assisted answer" in caplog.text


def test_the_report_sets_the_run_assistant_beside_the_two_and_pairs_it(tmp_path: Path) -> None:
    figures, training, replay = comparison_inputs()
    teacher = choice_results("cccccwcc", mode="assisted")
    conditions = {**figures.conditions, **_conditions({"run_assistant": teacher})}
    figures = replace(figures, conditions=conditions, run_assistant="Qwen-1.5B")
    text = render_comparison(figures, training, replay).markdown()
    assert "| source | n | general | trained | run-assistant | retrieval-only | chance |" in text
    assert "`Qwen-1.5B`" in text
    assert "run-assistant vs general" in text and "run-assistant vs trained" in text
    assert "| **all** | 8 | 0.375 (3/8) | 0.750 (6/8) | 0.875 (7/8) |" in text
    assert figures.to_dict()["run_assistant"] == "Qwen-1.5B"
    without = comparison_inputs()[0]
    assert "run_assistant" not in without.to_dict()  # old figures.json unchanged
    assert "run-assistant" not in render_comparison(without, training, replay).markdown()

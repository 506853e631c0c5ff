"""The LEMA pipeline on scripted students and correctors: counts, filtering, resume, dataset shapes, the report.

Three GSM8K-like problems: ``[easy]`` the student always solves, ``[fix]`` it solves on odd seeds only (and the
corrector fixes its mistake), ``[hard]`` it never solves (and the corrector fails in three different ways).
One slow test runs the pipeline on real GSM8K problems with the packaged default model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from runtime.data.kinds import kind_of
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example, load_task
from runtime.errors import ConfigError
from runtime.models.backend import GenerationSettings, Message
from tests.helpers import ScriptedBackend
from training.lema.data import (
    CORRECTIONS,
    COT,
    COUNTS,
    PROBLEMS,
    REPORT,
    SAMPLE_SETTINGS,
    Problem,
    equal_size,
    run_correction,
)

EASY = Example(
    "toy/easy",
    "gsm8k",
    "Ann has 2 apples and buys 3 more. How many apples does she have? [easy]",
    "5",
    "number",
    (),
    {"solution": "Ann has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"},
)
FIX = Example(
    "toy/fix",
    "gsm8k",
    "Bo buys 4 packs of 6 pens. How many pens does he buy? [fix]",
    "24",
    "number",
    (),
    {"solution": "Bo buys 4 * 6 = <<4*6=24>>24 pens.\n#### 24"},
)
HARD = Example(
    "toy/hard",
    "gsm8k",
    "Cy has 12 eggs, uses 5 and buys 2. How many eggs are left? [hard]",
    "9",
    "number",
    (),
    {"solution": "Cy has 12 - 5 = <<12-5=7>>7 eggs, then 7 + 2 = <<7+2=9>>9.\n#### 9"},
)
PROBLEM_SET = [EASY, FIX, HARD]

FIX_WRONG = "He buys 4 + 6 = 10 pens. The answer is 10."
FIX_RIGHT = "He buys 4 * 6 = 24 pens. The answer is 24."
HARD_WRONG_A = "Cy has 12 - 5 = 7 eggs. Then 7 - 2 = 5 eggs. The answer is 5."
HARD_WRONG_B = "Cy has 12 + 5 = 17 eggs. The answer is 17."
HARD_UNSURE = "I am not sure how to do this."
FIX_CORRECTION = (
    "Sure.\nIncorrect Step: Step 1.\nExplanation: 4 packs of 6 pens are 4 times 6 pens, not 4 plus 6.\n"
    "Correct Solution:\nStep 1: He buys 4 * 6 = 24 pens.\nThe answer is 24."
)
HARD_CORRECTION_WRONG = (  # parses, but reaches 8, not 9
    "Incorrect Step: Step 2.\nExplanation: She buys eggs, so add.\nCorrect Solution:\nStep 2: 7 + 1 = 8.\n"
    "The answer is 8."
)


def student_reply(messages: Sequence[Message], settings: GenerationSettings) -> str:
    question, seed = messages[-1]["content"], settings.seed
    if "[easy]" in question:
        return "Ann has 2 + 3 = 5 apples. The answer is 5."
    if "[fix]" in question:
        return FIX_RIGHT if seed % 2 else FIX_WRONG
    return {0: HARD_WRONG_A, 1: HARD_WRONG_A, 2: HARD_WRONG_B}.get(seed, HARD_UNSURE)


def corrector_reply(messages: Sequence[Message], settings: GenerationSettings) -> str:
    user = messages[-1]["content"]
    if "[fix]" in user:
        return FIX_CORRECTION
    if "12 - 5 = 7" in user:
        return HARD_CORRECTION_WRONG
    if "12 + 5 = 17" in user:
        return "The mistake is in the first step: 12 + 5 should be 12 - 5. The answer is 9."
    return "Incorrect Step: Step N.\nExplanation: unclear.\nCorrect Solution:\nThe answer is 9."


def backends() -> tuple[ScriptedBackend, ScriptedBackend]:
    return ScriptedBackend(student_reply, "toy-student"), ScriptedBackend(corrector_reply, "toy-corrector")


def run_dir(path: Path) -> RunDir:
    return RunDir(path, {"command": "lema-test"})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


EXPECTED = {
    "problems": 3,
    "paths_sampled": 12,
    "paths_correct": 6,  # easy 4, fix 2
    "paths_wrong": 5,  # fix 2 (one text), hard 3 (two texts)
    "paths_no_answer": 1,  # hard, seed 3
    "corrections_requested": 4,  # distinct wrong paths: fix 1, hard 3
    "parse_failures": {"no Incorrect Step": 1, "step is not a number": 1},
    "rejected_wrong_answer": 1,
    "rejected_not_worked_out": 0,
    "kept": 1,
    "cot_rows": 5,  # 3 gold solutions, 2 distinct correct student paths
    "cot_gold_rows": 3,
    "cot_student_rows": 2,
    "correction_rows": 1,
}


async def test_counts_datasets_and_report(tmp_path: Path) -> None:
    student, corrector = backends()
    run = run_dir(tmp_path)
    seen = []
    counts = await run_correction(PROBLEM_SET, student, corrector, run, samples=4, on_progress=seen.append)

    assert counts == EXPECTED
    assert json.loads((tmp_path / COUNTS).read_text()) == EXPECTED
    assert sorted(r.id for r in seen) == sorted(e.id for e in PROBLEM_SET)
    assert len(student.calls) == 12 and len(corrector.calls) == 4
    for example in PROBLEM_SET:  # four samples per problem, seeds 0..3, all sampled at temperature 0.8
        settings = [s for m, s in student.calls if example.input in m[-1]["content"]]
        assert sorted(s.seed for s in settings) == [0, 1, 2, 3]
        assert {s.temperature for s in settings} == {SAMPLE_SETTINGS.temperature}
    assert all(s.greedy for _, s in corrector.calls)

    records = {r.id: r for r in run.records(PROBLEMS, Problem)}
    assert [p.verdict for p in records["toy/hard"].paths] == ["wrong", "wrong", "wrong", "no_answer"]
    statuses = [c.status for c in records["toy/hard"].corrections]
    assert statuses == ["wrong final answer", "no Incorrect Step", "step is not a number"]
    correction = records["toy/hard"].corrections[0].correction
    assert correction is not None and correction.answer == "8"  # rejected, still recorded
    assert records["toy/easy"].corrections == []


async def test_dataset_rows_have_the_messages_shape(tmp_path: Path) -> None:
    student, corrector = backends()
    await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4)

    cot = rows(tmp_path / COT)
    assert all(list(row) == ["messages"] for row in cot)
    assert all([m["role"] for m in row["messages"]] == ["system", "user", "assistant"] for row in cot)
    answers = [row["messages"][-1]["content"] for row in cot]
    assert answers == [
        "Ann has 2 + 3 = 5 apples.\nThe answer is 5.",  # gold, calculator notes dropped
        "Ann has 2 + 3 = 5 apples. The answer is 5.",  # the student's correct path, once though sampled 4 times
        "Bo buys 4 * 6 = 24 pens.\nThe answer is 24.",
        FIX_RIGHT,
        "Cy has 12 - 5 = 7 eggs, then 7 + 2 = 9.\nThe answer is 9.",
    ]
    assert cot[3]["messages"][1]["content"] == FIX.input

    (fix,) = rows(tmp_path / CORRECTIONS)
    user, assistant = fix["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert (
        FIX.input in user["content"]
        and "Step 1: He buys 4 + 6 = 10 pens.\nStep 2: The answer is 10." in user["content"]
    )
    assert "24" not in user["content"]  # the student is never shown the gold
    assert assistant["content"] == FIX_CORRECTION.removeprefix("Sure.\n")  # the paper's format, chatter dropped


async def test_report(tmp_path: Path) -> None:
    student, corrector = backends()
    await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4)
    report = (tmp_path / REPORT).read_text()
    for line in [
        "| problems | 3 |",
        "| paths sampled | 12 |",
        "| wrong paths (wrong answer / no answer) | 6 (5 / 1) |",
        "| corrections requested (distinct wrong paths) | 4 |",
        "| parse failures | 2 |",
        "| no Incorrect Step | 1 |",
        "| step is not a number | 1 |",
        "| rejected: wrong final answer | 1 |",
        "| kept | 1 (25%) |",
    ]:
        assert line in report
    assert "### 1. kept: `toy/fix`" in report and "### 2. wrong final answer: `toy/hard`" in report
    assert "### 4." not in report  # three examples at most


async def test_resume_skips_done_problems(tmp_path: Path) -> None:
    student, corrector = backends()
    first = await run_correction(PROBLEM_SET[:2], student, corrector, run_dir(tmp_path), samples=4)
    assert first["problems"] == 2 and first["kept"] == 1

    student, corrector = backends()
    again = await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4)
    assert again == EXPECTED
    assert {m[-1]["content"] for m, _ in student.calls} == {HARD.input}  # only the new problem was sampled
    assert len(corrector.calls) == 3
    assert len(run_dir(tmp_path).records(PROBLEMS, Problem)) == 3

    student, corrector = backends()
    assert await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4) == EXPECTED
    assert student.calls == [] and corrector.calls == []


async def test_resume_after_a_torn_record(tmp_path: Path) -> None:
    student, corrector = backends()
    await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4)
    path = tmp_path / PROBLEMS
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 20])  # the process died writing the last record

    student, corrector = backends()
    assert await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=4) == EXPECTED
    assert len(student.calls) == 4


async def test_settings_are_checked(tmp_path: Path) -> None:
    student, corrector = backends()
    with pytest.raises(ConfigError, match="temperature"):
        await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), student_settings=GenerationSettings())
    with pytest.raises(ConfigError, match="samples"):
        await run_correction(PROBLEM_SET, student, corrector, run_dir(tmp_path), samples=0)


def test_gold_solution_only_where_the_task_has_one() -> None:
    assert kind_of(HARD).solution(HARD) == "Cy has 12 - 5 = 7 eggs, then 7 + 2 = 9.\nThe answer is 9."
    arc = Example("a/1", "arc", "Q?\nOptions:\n(A) x\n(B) y", "(A)", "choice", ("x", "y"))
    assert kind_of(arc).solution(arc) is None


# ---- equal_size: the ablation's two training sets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_cot", "n_fix", "n", "k"), [(100, 40, 100, 29), (10, 10, 10, 5), (8, 0, 8, 0), (5, 50, 5, 5)]
)
def test_equal_size(n_cot: int, n_fix: int, n: int, k: int) -> None:
    cot = [{"cot": i} for i in range(n_cot)]
    fixes = [{"fix": i} for i in range(n_fix)]
    only, mixed = equal_size(cot, fixes, n, seed=1)
    assert len(only) == len(mixed) == n
    assert all("cot" in row for row in only) and len({row["cot"] for row in only}) == n
    assert sum("fix" in row for row in mixed) == k
    assert all(row in only for row in mixed if "cot" in row)  # the sets differ only by the swapped rows
    assert equal_size(cot, fixes, n, seed=1) == (only, mixed)


def test_equal_size_needs_enough_cot_rows() -> None:
    with pytest.raises(ConfigError, match="between 1 and the 3"):
        equal_size([1, 2, 3], [4], 4, seed=0)
    with pytest.raises(ConfigError):
        equal_size([1, 2, 3], [4], 0, seed=0)


# ---- the real pipeline, with the packaged default model as student and corrector ---------------------------------


@pytest.mark.slow
async def test_real_default_model_on_gsm8k(tmp_path: Path, data_dir: Path) -> None:
    from runtime.models.local import LocalBackend

    examples = load_task("gsm8k", "gather", data_dir, limit=1)  # one problem: the corrector's prompt is long on CPU
    backend = LocalBackend()
    try:
        counts = await run_correction(
            examples,
            backend,
            backend,
            run_dir(tmp_path),
            samples=2,
            student_settings=GenerationSettings(max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0),
            corrector_settings=GenerationSettings(max_new_tokens=96),
        )
    finally:
        await backend.aclose()
    print(json.dumps(counts))
    assert counts["problems"] == 1 and counts["paths_sampled"] == 2
    assert counts["paths_correct"] + counts["paths_wrong"] + counts["paths_no_answer"] == 2
    rejected = sum(counts["parse_failures"].values()) + counts["rejected_wrong_answer"]
    assert counts["corrections_requested"] == rejected + counts["rejected_not_worked_out"] + counts["kept"]
    assert counts["corrections_requested"] <= counts["paths_wrong"] + counts["paths_no_answer"]
    assert counts["cot_gold_rows"] == 1
    assert len(rows(tmp_path / COT)) == counts["cot_rows"] >= 1
    assert len(rows(tmp_path / CORRECTIONS)) == counts["correction_rows"] == counts["kept"]
    assert len(run_dir(tmp_path).records(PROBLEMS, Problem)) == 1
    assert "# LEMA correction data" in (tmp_path / REPORT).read_text()


def test_ablation_report_shows_the_controls_per_condition(tmp_path: Path) -> None:
    from runtime.report import Accuracy, Answers, Condition
    from training.lema.ablation import render_ablation
    from training.sft_trainer import TrainResult

    replies = ("The answer is (A).", "Incorrect Step: Step 1.\nExplanation: x\nCorrect Solution:\nThe answer is (B).")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]} for c in replies]
    mixed = tmp_path / "cot_plus_corrections.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def overall(accuracy: float, chance: float | None) -> Condition:
        right = round(accuracy * 40)
        block = Accuracy(
            n=40,
            correct=right,
            wrong=39 - right,
            no_answer=1,
            accuracy=accuracy,
            accuracy_answered=right / 39,
            majority_gold=0.325,
            chance=chance,
            completion_tokens=0,
            prompt_tokens=0,
        )
        verdicts = {f"q{i}": i < accuracy * 40 for i in range(40)}
        return Condition(overall=block, by_source={"s": block}, modes={}, answers=Answers({}, {}), verdicts=verdicts)

    trained = {"cot_plus_corrections": TrainResult(tmp_path, 0.85, 30, "sha", [1.2, 0.85])}
    choice = render_ablation(
        "arc",
        {"base": overall(0.225, 0.25), "cot_plus_corrections": overall(0.275, 0.25)},
        trained,
        {"cot_plus_corrections": mixed},
    ).markdown()
    assert "| base | - | - | - | 40 | 0.225 | 1 | 0.250 | 0.325 |" in choice
    assert "| cot_plus_corrections | 2 | 1 | 0.8500 | 40 | 0.275 | 1 | 0.250 | 0.325 |" in choice
    # Items 9 and 10 of 40 right only after training on corrections: +0.050, McNemar p = 0.5.
    assert (
        "| cot-plus-corrections vs base | 40 | 0.225 | 0.275 | +0.050 | [" in choice and "| 0 | 2 | 0.500 |" in choice
    )
    numeric = render_ablation("gsm8k", {"base": overall(0.05, None)}, {}, {}).markdown()
    assert "| base | - | - | - | 40 | 0.050 | 1 | - | 0.325 |" in numeric

"""Code tasks: loading MBPP and HumanEval, extracting code from replies, pass@k, and the code kind through eval,
gathering and examination, LEMA and the instructor loop (scripted models; programs run in the sandbox)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator, Sequence
from itertools import combinations
from pathlib import Path

import pytest

from agents.examination import exam_item
from agents.gathering import gather_episode
from agents.team import Roles
from memory.embed import HashingEmbedder
from runtime.data import sandbox
from runtime.data.graders import extract_code, program
from runtime.data.kinds import grade, grade_async
from runtime.data.records import ItemResult
from runtime.data.rundir import RunDir
from runtime.data.sandbox import Limits, Sandbox
from runtime.data.tasks import load_jsonl, load_task, task_names
from runtime.errors import ConfigError
from runtime.models.backend import GenerationSettings, Message
from runtime.report import pass_at_k
from runtime.workflows.commands import evaluate
from tests.helpers import FakeAssistant, ScriptedBackend
from training.instruct.benchmarks import default_ood
from training.instruct.settings import InstructSettings
from training.instruct.supply import replay_rows
from training.lema.data import run_correction

# ---- loading ---------------------------------------------------------------------------------------------------


def test_mbpp_follows_the_standard_split(data_dir: Path) -> None:
    examine, gather, every = (load_task("mbpp", s, data_dir) for s in ("examine", "gather", "all"))
    assert (len(examine), len(gather), len(every)) == (500, 464, 974)
    ends = (examine[0].id, examine[-1].id, gather[0].id, gather[-1].id)
    assert ends == ("mbpp/11", "mbpp/510", "mbpp/511", "mbpp/974")
    assert not {e.id for e in examine} & {e.id for e in gather}
    first = examine[0]
    assert first.answer_kind == "code" and first.metadata["entry_point"] == "remove_Occ"
    assert "def remove_Occ(s,ch):" in first.input and 'assert remove_Occ("hello","l") == "heo"' in first.input
    assert "\r" not in first.target and first.where.endswith("mbpp.jsonl:11")


def test_mbpp_setup_code_runs_after_the_solution(data_dir: Path, code_sandbox: Sandbox) -> None:
    [tree] = [e for e in load_task("mbpp", "all", data_dir) if e.id == "mbpp/367"]
    built = program(tree, tree.target)
    assert "class Node" in built.code and "root = Node(1)" not in built.code  # the setup runs with the tests
    assert built.tests.index("root = Node(1)") < built.tests.index("assert is_tree_balanced")
    assert "root = Node(1)" in tree.input  # the prompt shows what the tests build
    assert code_sandbox.run(built).passed  # the tests build the nodes from the program's Node


def test_humaneval_is_for_evaluation_only(data_dir: Path) -> None:
    items = load_task("humaneval", "examine", data_dir)
    assert len(items) == 164 and items[0].id == "humaneval/0"
    assert items[0].metadata["tests"].rstrip().endswith("check(has_close_elements)")
    assert items[0].target.startswith(items[0].metadata["prefix"])
    for split in ("gather", "all"):
        with pytest.raises(ConfigError, match="evaluation only"):
            load_task("humaneval", split, data_dir)  # type: ignore[arg-type]
    assert {"mbpp", "humaneval"} <= set(task_names(data_dir))


def test_code_is_not_an_answer_kind_for_your_own_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"input": "q", "target": "def f(): pass"}) + "\n")
    with pytest.raises(ConfigError, match="choice, number, text"):
        load_jsonl(path, "code")


# ---- extraction and pass@k -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "entry", "code"),
    [
        ("```python\ndef f(x):\n    return x\n```", None, "def f(x):\n    return x"),
        ("Sure!\n```py\ndef f(x):\n    return 1\n```\nIt returns 1.", None, "def f(x):\n    return 1"),
        ("~~~\ndef f():\n    pass\n~~~", None, "def f():\n    pass"),
        ("```\nf(2)\n```\n\n```python\ndef f(x):\n    return x\n```", "f", "def f(x):\n    return x"),
        ("```text\nnot code\n```\n```python\nx = 1\n```", None, "x = 1"),
        ("def f(x): return x", None, "def f(x): return x"),
        ("\n\n    return x + 1\n", None, "    return x + 1"),
        ("```python\ndef f(x):\n    return x", None, "def f(x):\n    return x"),
        ("```python\n```", None, None),
        ("", None, None),
    ],
)
def test_extract_code(reply: str, entry: str | None, code: str | None) -> None:
    assert extract_code(reply, entry) == code


def _pass_at_k_by_counting(n: int, c: int, k: int) -> float:
    """The definition: the share of k-subsets of the n samples that hold at least one passing sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (8, 1, 4), (10, 3, 5), (7, 7, 2)]
)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_counting(n, c, k))


def test_pass_at_k_refuses_impossible_counts() -> None:
    for n, c, k in [(3, 4, 1), (3, 1, 4), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ---- grading and the commands ----------------------------------------------------------------------------------


@pytest.fixture
def code_sandbox() -> Iterator[Sandbox]:
    """bubblewrap where it is installed; else the unsandboxed harness (these programs are the tests' own)."""
    made = Sandbox("bwrap" if shutil.which("bwrap") else "none", Limits(cpu_s=2, wall_s=10.0))
    before = sandbox._configured
    sandbox._configured = made
    yield made
    sandbox._configured = before
    made.close()


def fenced(code: str) -> str:
    return f"Here is the function:\n```python\n{code}\n```\nIt passes the tests."


def test_canonical_solutions_pass_and_broken_ones_fail(data_dir: Path, code_sandbox: Sandbox) -> None:
    items = load_task("mbpp", "examine", data_dir, limit=2) + load_task("humaneval", "examine", data_dir, limit=2)
    for item in items:
        assert grade(item, fenced(item.target)).verdict == "correct"
        wrong = grade(item, fenced(f"def {item.metadata['entry_point']}(*args):\n    return None"))
        assert wrong.verdict == "wrong" and wrong.error and "AssertionError" in wrong.error
        assert grade(item, "").verdict == "no_answer"
    body = items[2].target.removeprefix(items[2].metadata["prefix"])
    assert grade(items[2], body).verdict == "correct"  # HumanEval: a reply that only continues the body


def _code_script(items: dict[str, str]) -> ScriptedBackend:
    """A student that answers each task with the code ``items`` gives for the first line of its prompt."""

    def script(messages: Sequence[Message], settings: GenerationSettings) -> str:
        user = messages[-1]["content"]
        return next((reply for marker, reply in items.items() if marker in user), "I am not sure.")

    return ScriptedBackend(script)


async def test_eval_on_a_code_task_reports_pass_at_1_and_the_failed_programs(
    data_dir: Path, code_sandbox: Sandbox, tmp_path: Path
) -> None:
    right, broken, silent = load_task("mbpp", "examine", data_dir, limit=3)
    student = _code_script(
        {
            right.metadata["entry_point"]: fenced(right.target),
            broken.metadata["entry_point"]: fenced(f"def {broken.metadata['entry_point']}(m):\n    return m[0]"),
        }
    )
    outcome = await evaluate(
        [right, broken, silent], student, tmp_path, task="mbpp", split="examine", limit=3, settings=GenerationSettings()
    )
    verdicts = {r.id: r.verdict for r in outcome.results}
    assert verdicts == {right.id: "correct", broken.id: "wrong", silent.id: "wrong"}
    assert outcome.figures.overall.accuracy == pytest.approx(1 / 3, abs=1e-4)
    failed = next(r for r in outcome.results if r.id == broken.id)
    assert failed.error is not None and (failed.error.startswith("TypeError") or "Error" in failed.error)
    report = (tmp_path / "report.md").read_text()
    assert "Failed programs" in report and f"`{broken.id}`" in report and "Traceback" in report
    assert json.loads((tmp_path / "config.json").read_text())["settings"]["sandbox"]["mode"] == code_sandbox.mode


async def test_eval_samples_give_the_unbiased_pass_at_k(data_dir: Path, code_sandbox: Sandbox, tmp_path: Path) -> None:
    [item] = load_task("mbpp", "examine", data_dir, limit=1)

    def script(messages: Sequence[Message], settings: GenerationSettings) -> str:
        return fenced(item.target) if settings.seed in (0, 2) else fenced("def nothing(): pass")

    settings = GenerationSettings(max_new_tokens=64, temperature=0.8, seed=0)
    outcome = await evaluate(
        [item], ScriptedBackend(script), tmp_path, task="mbpp", split="examine", limit=1, settings=settings, samples=4
    )
    overall = outcome.figures.overall
    assert overall.samples == 4
    assert overall.pass_at == {"1": 0.5, "4": 1.0}
    assert [s.verdict for s in outcome.results[0].samples or []] == ["correct", "wrong", "correct", "wrong"]
    assert "pass@k" in (tmp_path / "report.md").read_text()
    with pytest.raises(ConfigError, match="temperature"):
        await evaluate(
            [item], ScriptedBackend(script), tmp_path / "g", task="mbpp", split="examine", limit=1,
            settings=GenerationSettings(), samples=2,
        )  # fmt: skip


async def test_gathering_and_examination_grade_code(data_dir: Path, code_sandbox: Sandbox) -> None:
    [item] = load_task("mbpp", "gather", data_dir, limit=1)

    def script(messages: Sequence[Message], settings: GenerationSettings) -> str:
        guided = "Guideline:" in messages[-1]["content"]
        return fenced(item.target) if guided else fenced("def wrong(): pass")

    roles = Roles(ScriptedBackend(script), FakeAssistant())
    episode = await gather_episode(item, roles, "mbpp")
    assert (episode.first_verdict, episode.verdict, episode.corrected) == ("wrong", "correct", True)
    exam = await exam_item(item, roles, "baseline")
    assert exam.verdict == "wrong" and exam.predicted == "def wrong(): pass"
    assert exam.error is not None and "NameError" in exam.error


async def test_lema_keeps_only_corrections_that_pass_the_tests(
    data_dir: Path, code_sandbox: Sandbox, tmp_path: Path
) -> None:
    [item] = load_task("mbpp", "gather", data_dir, limit=1)
    entry = item.metadata["entry_point"]
    student = ScriptedBackend(lambda m, s: fenced(f"def {entry}(*a):\n    x = 0\n    return x"))
    right = f"Incorrect Step: Step 2.\nExplanation: x is never computed.\nCorrect Solution:\n{fenced(item.target)}"
    corrector = ScriptedBackend(lambda m, s: right)
    counts = await run_correction([item], student, corrector, RunDir(tmp_path, {"command": "t"}), samples=2)
    assert counts["paths_wrong"] == 2 and counts["corrections_requested"] == 1 and counts["kept"] == 1
    [row] = [json.loads(line) for line in (tmp_path / "corrections.jsonl").read_text().splitlines()]
    assert "Step 2:     x = 0" in row["messages"][0]["content"] and "```python" in row["messages"][1]["content"]
    cot = (tmp_path / "cot.jsonl").read_text()
    assert "```python" in cot  # the canonical solution is a CoT row

    wrong = f"Incorrect Step: Step 2.\nExplanation: no.\nCorrect Solution:\n{fenced('def nope(): pass')}"
    again = await run_correction(
        [item], student, ScriptedBackend(lambda m, s: wrong), RunDir(tmp_path / "b", {"command": "t"}), samples=2
    )
    assert again["kept"] == 0 and again["rejected_wrong_answer"] == 1


def test_instruct_pairs_mbpp_with_humaneval_and_keeps_code_rows(data_dir: Path) -> None:
    from training.instruct.run import plan

    assert default_ood(["mbpp"], data_dir) == ["humaneval", "bbh"]
    with pytest.raises(ConfigError, match="tests to grade"):
        plan(InstructSettings(targets=["mbpp"], strategies=["le"]), data_dir)
    items = load_task("mbpp", "gather", data_dir, limit=6)
    verdicts = {e.id: ("wrong" if i % 2 else "correct") for i, e in enumerate(items)}
    rows, counts = replay_rows(
        items, verdicts, contrast=False, balance=True, k=3, budget=10, embedder=HashingEmbedder(), rng=random.Random(0)
    )
    assert counts["rows"] == 3 and counts["balanced"] is False
    assert all(r["messages"][-1]["content"].startswith("```python") for r in rows)


def test_async_grading_matches_sync(data_dir: Path, code_sandbox: Sandbox) -> None:
    import asyncio

    [item] = load_task("humaneval", "examine", data_dir, limit=1)
    assert asyncio.run(grade_async(item, item.target)) == grade(item, item.target)


def test_majority_gold_is_no_control_where_no_gold_repeats() -> None:
    from runtime.workflows.evaluation import summarize

    def result(i: int, target: str) -> ItemResult:
        return ItemResult(
            id=f"q/{i}",
            source="s",
            verdict="wrong",
            predicted=None,
            target=target,
            n_options=0,
            completion_tokens=1,
            prompt_tokens=1,
            mode="generate",
            reply="",
        )

    programs = [result(i, f"def f():\n    return {i}") for i in range(50)]
    assert summarize(programs).overall.majority_gold is None  # not 1/50, a figure that controls for nothing
    numbers = [result(i, str(i % 4)) for i in range(8)]
    assert summarize(numbers).overall.majority_gold == 0.25

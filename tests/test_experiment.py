"""``run_experiment`` end to end with scripted roles: the conditions, the near-duplicate control, report and plot.

The fake student (tests/helpers.py) is wrong until it is shown a "Guideline:" line, so every figure below follows
from the script: assisted beats baseline exactly where a past mistake was retrieved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.store import MistakeMemory
from runtime.data.records import ItemResult
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.report import Condition, Gathering, render_experiment
from runtime.workflows.experiment import ASSISTED, BASELINE, RETRIEVAL, run_experiment
from runtime.workflows.experiment_settings import ExperimentSettings
from tests.helpers import FakeAssistant, FakeStudent

OPTIONS = ("Cannot be determined", "The grandmother", "The grandson")
CREW = ("Unknown", "The captain", "The cadet")


def kin(id: str, source: str, question: str, options: tuple[str, ...] = OPTIONS) -> Example:
    """A choice item whose gold is (B)."""
    lines = "\n".join(f"({letter}) {option}" for letter, option in zip("ABC", options, strict=True))
    return Example(id, source, f"{question}\nOptions:\n{lines}", "(B)", "choice", options)


GATHER = [
    kin("g/1", "bbq/Age", "A grandson and his grandmother went shopping. Who forgot the shopping list? [knows]"),
    kin("g/2", "bbq/Age", "A grandmother and her grandson cooked dinner. Who forgot the recipe at home?"),
    kin("g/3", "bbq/Age", "The grandson and the grandmother took a bus. Who forgot the bus tickets?"),
    kin("g/4", "bbq/Age", "My grandmother and my grandson planted a garden. Who forgot to water it? [stubborn]"),
    kin("g/5", "bbq/Age", "A grandmother and a grandson visited a museum. Who forgot the museum map?"),
    kin("g/6", "bbq/Age", "The grandson met the grandmother at the library. Who forgot the library card?"),
]
EXAMINE = [
    kin("e/1", "bbq/Age", GATHER[1].input.split("\nOptions:")[0]),  # the very question of g/2: a near-duplicate
    kin("e/2", "bbq/Age", "A grandson and his grandmother went to the bus stop. Who forgot the bus pass?"),
    kin(
        "e/3", "bbq/Travel", "Two pilots checked weather radar before takeoff; which pilot misjudged that storm?", CREW
    ),
    kin(
        "e/4", "bbq/Travel", "Two sailors studied harbour charts at dawn; which sailor misread that tide? [knows]", CREW
    ),
]
SETTINGS = ExperimentSettings(task="kin", rounds=3, k=3, threshold=0.7, concurrency=4)


@pytest.fixture
def experiment(tmp_path: Path) -> tuple[dict[str, Any], RunDir, Roles, list[tuple[str, int, int]]]:
    import asyncio

    roles = Roles(FakeStudent(), FakeAssistant())
    memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder(dim=256))
    run = RunDir(tmp_path / "run", {"command": "run", "task": "kin"})
    ticks: list[tuple[str, int, int]] = []
    figures = asyncio.run(
        run_experiment(GATHER, EXAMINE, roles, memory, run, SETTINGS, progress=lambda *t: ticks.append(t))
    )
    memory.close()
    return figures, run, roles, ticks


def accuracy(block: Condition) -> tuple[int, int]:
    return block.overall.correct, block.overall.n


def test_every_condition_is_measured_on_the_same_items(experiment: tuple) -> None:
    figures, run, _, ticks = experiment
    ids = {e.id for e in EXAMINE}
    for name in (BASELINE, ASSISTED, RETRIEVAL):
        assert sorted(r.id for r in run.records(name, ItemResult)) == sorted(ids), name
    assert set(figures.conditions) == {"baseline", "assisted", "retrieval_only"}
    assert all(c.overall.n == len(EXAMINE) for c in figures.conditions.values())
    assert (figures.n_gather, figures.n_examine) == (6, 4)
    # Progress reached the end of every phase.
    finished = {phase: (done, total) for phase, done, total in ticks}
    assert finished == {"baseline exam": (4, 4), "gathering": (6, 6), "assisted exam": (4, 4)}


def test_the_figures_follow_from_the_script(experiment: tuple) -> None:
    figures, run, _, _ = experiment
    c = figures.conditions
    # Baseline: only the item the student knows. Assisted: also both items with a retrieved past mistake.
    assert accuracy(c["baseline"]) == (1, 4)
    assert accuracy(c["assisted"]) == (3, 4)
    # Retrieval-only answers the gold of the retrieved mistakes ((B)) and nothing where none was retrieved.
    assert accuracy(c["retrieval_only"]) == (2, 4) and c["retrieval_only"].overall.no_answer == 2
    assert set(c["baseline"].by_source) == {"bbq/Age", "bbq/Travel"}
    assisted = {r.id: r for r in run.records(ASSISTED, ItemResult)}
    assert [bool(assisted[e.id].retrieved) for e in EXAMINE] == [True, True, False, False]
    g = figures.gathering
    assert g == Gathering(
        episodes=6,
        first_answer_wrong=5,
        corrected=4,
        feedback_turns=4 + 3,  # one round each for the four that learn, the round limit for the stubborn one
        rewarded_turns=4,
        leaks_removed=0,
        group_claims_removed=0,
        generic_guidelines=0,
        instruction_echoes_removed=0,
        unparsed_feedback=0,
        stored_guidelines=g.stored_guidelines,
    )
    assert len(g.stored_guidelines) == 5 and all(g.stored_guidelines)  # one per mistake stored
    assert figures.mistakes_stored == 5
    assert figures.examples and all(ex.guidance for ex in figures.examples)
    assert figures.tokens["gathering"] > figures.tokens["baseline"] > 0


def test_near_duplicates_are_counted_and_left_out(experiment: tuple) -> None:
    figures, _, _, _ = experiment
    assert figures.near_duplicates == 1  # e/1 repeats g/2; the others differ by more than a word
    w = figures.without_near_duplicates
    assert all(block.overall.n == 3 for block in w.values())
    assert accuracy(w["baseline"]) == (1, 3)
    assert accuracy(w["assisted"]) == (2, 3)
    assert accuracy(w["retrieval_only"]) == (1, 3)


def test_a_finished_experiment_resumes_without_asking_anyone(experiment: tuple) -> None:
    import asyncio

    figures, run, roles, _ = experiment
    asked = len(roles.student.prompts), len(roles.assistant.prompts)
    memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder(dim=256))
    # A fresh memory: resumed exams keep their stored results even though retrieval now finds nothing.
    again = asyncio.run(run_experiment(GATHER, EXAMINE, roles, memory, run, SETTINGS))
    memory.close()
    assert (len(roles.student.prompts), len(roles.assistant.prompts)) == asked
    for name in ("baseline", "assisted"):
        assert again.conditions[name] == figures.conditions[name]


def test_report_and_plot(tmp_path: Path, experiment: tuple) -> None:
    figures, _, _, _ = experiment
    md, page = render_experiment(figures, {"task": "kin", "rounds": 3}).write(tmp_path)
    markdown = md.read_text()
    assert markdown.startswith("# redpen run: kin")
    assert "| source | n | baseline | assisted | retrieval-only | chance | no answer (base / assisted) |" in markdown
    assert "| **all** | 4 | 0.250 (1/4) | 0.750 (3/4) | 0.500 (2/4) | 0.333 | 0 / 0 |" in markdown
    assert "| bbq/Travel | 2 | 0.500 (1/2) | 0.500 (1/2) | 0.000 (0/2) |" in markdown
    assert "1 of 4 examine items have a near-duplicate" in markdown
    assert "| without near-duplicates | 3 | 0.333 (1/3) | 0.667 (2/3) | 0.333 (1/3) |" in markdown
    assert "| rounds | `3` |" in markdown
    # Paired by item: baseline right on e/4 only, assisted also on e/1 and e/2 (none wrong that baseline got right).
    assert "| assisted vs baseline | 4 | 0.250 | 0.750 | +0.500 | [" in markdown
    assert "| 0 | 2 | 0.500 |" in markdown  # A only, B only, McNemar p = 2 * P(X <= 0), X ~ Bin(2, 1/2)
    assert "| assisted vs baseline, without near-duplicates | 3 |" in markdown
    data = (tmp_path / "accuracy.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert "data:image/png;base64," in page.read_text()


class SlowStudent(FakeStudent):
    """The scripted student, taking a moment per call and counting the calls in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.peak = 0

    async def generate(self, messages: Any, settings: Any = None, adapter: str | None = None) -> Any:
        import asyncio

        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            return await super().generate(messages)
        finally:
            self.in_flight -= 1


def test_the_baseline_exam_runs_while_gathering_runs(tmp_path: Path) -> None:
    import asyncio

    # One item in flight per phase: two student calls at once can only come from the two phases overlapping.
    student = SlowStudent()
    memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder(dim=256))
    run = RunDir(tmp_path / "run", {"command": "run", "task": "kin"})
    settings = ExperimentSettings(task="kin", rounds=3, k=3, threshold=0.7, concurrency=1)
    figures = asyncio.run(run_experiment(GATHER, EXAMINE, Roles(student, FakeAssistant()), memory, run, settings))
    memory.close()
    assert student.peak == 2
    assert accuracy(figures.conditions["baseline"]) == (1, 4)  # the same answers as one phase after the other

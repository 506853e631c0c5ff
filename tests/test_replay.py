"""Filtered offline replay: run directories in, SFT messages and KTO labels out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from trl.data_utils import is_conversational

from agents.gathering import EPISODES, gather_episode
from agents.prompts import load_prompt
from agents.team import Roles
from runtime.data.tasks import Example
from runtime.errors import ConfigError, DataError
from tests.helpers import FakeAssistant, FakeStudent, make_episode, make_run_dir
from training.replay import (
    KTO_JSONL,
    KTO_PARQUET,
    MANIFEST,
    SFT_JSONL,
    SFT_PARQUET,
    Step,
    export_replay,
    keep_rewarded,
    kto_row,
    read_steps,
)

STUDENT = "SmolLM2-135M-Instruct"


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Two tasks, three sources; 6 steps, of which 3 are kept (rewarded; one had a gold sentence scrubbed)."""
    return make_run_dir(
        tmp_path / "run",
        STUDENT,
        [
            make_episode("bbq/Age/1", [(0, False), (1, False)]),  # wrong, then helped: 1 kept
            make_episode("bbq/Age/2", [(1, True)]),  # helped by what was left after the gold sentence was removed
            make_episode("bbq/SES/3", []),  # right at once: no steps
            make_episode("bbq/SES/4", [(0, False), (0, True)]),
            make_episode("gsm8k/5", [(1, False)], source="gsm8k", task="gsm8k", gold="42"),
        ],
    )


@pytest.mark.parametrize(
    ("reward", "leaked", "kept"), [(1, False, True), (1, True, True), (0, False, False), (0, True, False)]
)
def test_keep_rewarded_wants_a_reward_for_what_the_student_saw(reward: int, leaked: bool, kept: bool) -> None:
    """A leaked step's stored feedback is what remained after the gold sentence was removed: the student saw that."""
    step = Step("e#1", "bbq", "bbq/Age", "(A)", "Who?", "(B)", [], "why", "do this", leaked, reward)
    assert keep_rewarded(step) is kept
    emptied = Step("e#1", "bbq", "bbq/Age", "(A)", "Who?", "(B)", [], "", "  ", leaked, reward)
    assert keep_rewarded(emptied) is False  # all of it was removed: nothing reached the student


def test_counts_of_steps_and_kept_steps_per_task_and_source(run: Path, tmp_path: Path) -> None:
    stats = export_replay([run], tmp_path / "out")
    assert (stats.steps, stats.kept, stats.scrubbed) == (6, 3, 1)
    assert stats.by_task == {"bbq": {"steps": 5, "kept": 2}, "gsm8k": {"steps": 1, "kept": 1}}
    assert stats.by_source == {
        "bbq/Age": {"steps": 3, "kept": 2},
        "bbq/SES": {"steps": 2, "kept": 0},
        "gsm8k": {"steps": 1, "kept": 1},
    }
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest == {"run_dirs": [str(run)], "model_id": STUDENT, **stats.to_dict()}


def test_sft_rows_are_the_gathering_prompt_and_the_feedback_as_json(run: Path, tmp_path: Path) -> None:
    export_replay([run], tmp_path / "out")
    sft = rows(tmp_path / "out" / SFT_JSONL)
    assert len(sft) == 3
    for row in sft:
        system, user, assistant = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert system["content"] == load_prompt("assistant_gather")
        assert "Correct answer (do not reveal):" in user["content"]
        assert json.loads(assistant["content"]) == {"reason": "You assumed.", "guideline": "Quote the context."}
    age, scrubbed, number = (r["messages"][1]["content"] for r in sft)
    assert "Question:\nWho forgot? [bbq/Age/2]" in scrubbed
    # The kept Age step is round 2: the guideline of round 1 is shown as one that did not help.
    assert "Question:\nWho forgot? [bbq/Age/1]" in age and "(B)" in age
    assert "Your earlier guidelines did not help yet:\n- Quote the context." in age
    assert "Correct answer (do not reveal): 42" in number and "earlier guidelines" not in number


def test_kto_rows_label_every_step(run: Path, tmp_path: Path) -> None:
    export_replay([run], tmp_path / "out")
    kto = rows(tmp_path / "out" / KTO_JSONL)
    assert [r["label"] for r in kto] == [False, True, True, False, False, True]
    for row in kto:
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
    sft = rows(tmp_path / "out" / SFT_JSONL)
    assert [r["prompt"] + r["completion"] for r in kto if r["label"]] == [r["messages"] for r in sft]


def test_parquet_and_jsonl_hold_the_same_rows_in_trl_formats(run: Path, tmp_path: Path) -> None:
    export_replay([run], tmp_path / "out")
    for jsonl, parquet, columns in ((SFT_JSONL, SFT_PARQUET, ["messages"]), (KTO_JSONL, KTO_PARQUET, None)):
        table = pq.read_table(tmp_path / "out" / parquet).to_pylist()
        assert table == rows(tmp_path / "out" / jsonl)
        assert columns is None or list(table[0]) == columns
        assert all(is_conversational(r) for r in table)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [SFT_JSONL, SFT_PARQUET, KTO_JSONL, KTO_PARQUET, MANIFEST]
    )  # no temporary files left behind


async def test_the_prompt_is_the_one_the_gathering_assistant_was_given(tmp_path: Path) -> None:
    options = ("Cannot be determined", "The grandmother", "The grandson")
    text = "The grandmother and the grandson planned a trip. Who forgot the tickets? [stubborn]\nOptions:\n" + (
        "\n".join(f"({letter}) {option}" for letter, option in zip("ABC", options, strict=True))
    )
    example = Example("kin/3", "bbq/Age", text, "(B)", "choice", options)
    assistant = FakeAssistant()
    episode = await gather_episode(example, Roles(FakeStudent(), assistant), task="bbq", rounds=2)
    run = make_run_dir(tmp_path / "run", "fake-student", [episode])
    # Round 2's prompt lists round 1's guideline: the replayed prompts match what was sent, context included.
    prompts = [kto_row(step)["prompt"] for step in read_steps([run])]
    assert [p[1]["content"] for p in prompts] == assistant.prompts and len(prompts) == 2
    assert all(p[0]["content"] == load_prompt("assistant_gather") for p in prompts)


def test_an_empty_replay_says_there_is_nothing_to_train_on(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", STUDENT, [make_episode("a", [(0, False)]), make_episode("b", [(0, True)])])
    with pytest.raises(DataError, match=r"no rewarded steps in .*run: nothing to train on.*gather more"):
        export_replay([run], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_of_another_student_is_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"run dir {run} was gathered with model {STUDENT}, not Qwen"):
        export_replay([run], tmp_path / "out", model_id="Qwen")
    other = make_run_dir(tmp_path / "other", "Qwen", [make_episode("x", [(1, False)])])
    with pytest.raises(ConfigError, match="gathered with model Qwen, not SmolLM2"):
        export_replay([run, other], tmp_path / "out")  # without model_id, the first run dir's student is expected


def test_several_run_dirs_are_read_once_each(run: Path, tmp_path: Path) -> None:
    more = make_run_dir(tmp_path / "more", STUDENT, [make_episode("bbq/Age/9", [(1, False)])])
    stats = export_replay([run, more, run], tmp_path / "out", model_id=STUDENT)
    assert (stats.steps, stats.kept) == (7, 4)


def test_a_malformed_line_is_named_by_file_and_line(run: Path, tmp_path: Path) -> None:
    episodes = run / EPISODES
    lines = episodes.read_text().splitlines()
    episodes.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=f"{episodes}:2: not valid JSON"):
        export_replay([run], tmp_path / "out")


def test_a_record_that_is_no_episode_is_a_data_error(run: Path, tmp_path: Path) -> None:
    (run / EPISODES).write_text(json.dumps({"id": "x", "turns": [{"round": 1}]}) + "\n")
    with pytest.raises(DataError, match=rf"{run / EPISODES}:1: the line is no Episode \(source: Field required"):
        export_replay([run], tmp_path / "out")


def test_missing_folders_and_files_are_data_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        export_replay([tmp_path / "nope"], tmp_path / "out")
    (run / EPISODES).unlink()
    with pytest.raises(DataError, match=f"{run / EPISODES} does not exist: run `redpen gather`"):
        export_replay([run], tmp_path / "out")
    (run / "config.json").unlink()
    with pytest.raises(DataError, match=r"not a redpen run directory \(no config.json\)"):
        export_replay([run], tmp_path / "out")
    with pytest.raises(ConfigError, match="no run directories"):
        export_replay([], tmp_path / "out")

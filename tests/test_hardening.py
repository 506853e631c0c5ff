"""What a hostile but fair new user broke (issue 12, defects 1-6), each kept fixed by a test.

Run folders that are not redpen's, two processes on one run, a mistyped memory, prompts past the model's context,
colliding mistake ids, and a choice row without options. Scripted backends and a tiny random model keep them fast;
the CLI runs in a fresh process where the defect is about what a user sees.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import runtime.workflows.commands
from agents.gathering import run_gathering
from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.store import MistakeMemory, RecordFilter
from runtime.cli import app
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example, load_jsonl
from runtime.errors import BackendError, ConfigError, DataError
from runtime.models.backend import GenerationSettings, Message
from tests.helpers import FakeAssistant, FakeStudent, build_tiny_model

QUIZ = [
    {"input": "Which colour is the sky?\nOptions:\n(A) red\n(B) blue", "target": "B"},
    {"input": "Which is a fruit?\nOptions:\n(A) apple\n(B) brick", "target": "A"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def redpen(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process, where a RedpenError becomes one ``error:`` line and exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    for fragment in fragments:
        assert fragment in line, line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. --out never writes into a folder that is not redpen's -----------------------------------------------------


def test_a_folder_of_someone_elses_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    user = tmp_path / "u"
    user.mkdir()
    (user / "report.md").write_text("my notes\n")
    with pytest.raises(ConfigError, match=r"not empty \(report.md\) and is not a redpen run directory"):
        RunDir(user, {"command": "eval"})
    assert snapshot(user) == {"report.md": b"my notes\n"}  # no config.json, no lock file

    empty, ours = tmp_path / "empty", tmp_path / "ours"
    empty.mkdir()
    RunDir(empty, {"command": "eval"})  # an empty folder is fine
    RunDir(ours, {"command": "eval"}).write_text("report.md", "# report\n")
    RunDir(ours, {"command": "eval"})  # and so is a redpen run directory, non-empty: it resumes


def test_eval_out_on_a_users_folder_is_one_line_and_keeps_the_file(tmp_path: Path, tiny_model: Path) -> None:
    user = tmp_path / "u"
    user.mkdir()
    (user / "report.md").write_text("my notes\n")
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    result = redpen("eval", "--jsonl", quiz, "--model", tiny_model, "--max-new-tokens", "2", "--out", user)
    one_line_error(result, "report.md", "not a redpen run directory")
    assert snapshot(user) == {"report.md": b"my notes\n"}


# ---- 2. one process at a time on a run directory --------------------------------------------------------------


HOLDER = """
import json, sys, time
from pathlib import Path
from runtime.data.rundir import RunDir
config = json.loads(Path(sys.argv[2]).read_text())
del config["version"]
RunDir(Path(sys.argv[1]), config.pop("identity"), config)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("command", ["eval", "gather"])
def test_a_second_process_on_a_run_directory_is_refused_and_writes_nothing(
    tmp_path: Path, tiny_model: Path, command: str
) -> None:
    quiz = write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    args = [command, "--jsonl", str(quiz), "--model", str(tiny_model), "--max-new-tokens", "2", "--no-cache"]
    # The config this very command writes, so that without a lock the second one would resume the run and write.
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "first")])
    assert done.exit_code == 0, done.output
    run = tmp_path / "D"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), str(tmp_path / "first" / "config.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        before = snapshot(run)
        result = CliRunner().invoke(app, [*args, "--out", str(run)])
        assert isinstance(result.exception, ConfigError), result.output
        assert f"{run} is in use by another redpen process (pid {holder.pid})" in str(result.exception)
        assert snapshot(run) == before  # the refused command changed nothing, config.json included
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock with the holder: the same command now runs there.
    again = CliRunner().invoke(app, [*args, "--out", str(run)])
    assert again.exit_code == 0, again.output


def test_one_process_may_open_its_own_run_directory_again(tmp_path: Path) -> None:
    first = RunDir(tmp_path / "D", {"command": "x"})
    second = RunDir(tmp_path / "D", {"command": "x"})  # a command and its phases share the folder
    assert first.path == second.path


# ---- 3. reading commands never create a memory ------------------------------------------------------------------


def test_opening_a_missing_memory_to_read_is_an_error_that_writes_nothing(tmp_path: Path) -> None:
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no mistake memory at"):
        MistakeMemory(path=unrelated, embedder=HashingEmbedder(), create=False)
    assert sorted(p.name for p in unrelated.iterdir()) == ["notes.txt"]  # no .lock, no mistakes/
    with pytest.raises(ConfigError, match="no mistake memory at"):
        MistakeMemory(path=tmp_path / "typo", embedder=HashingEmbedder(), create=False)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ConfigError, match="no collection"):
        MistakeMemory(location=":memory:", embedder=HashingEmbedder(), create=False)

    MistakeMemory(path=tmp_path / "mem", embedder=HashingEmbedder()).close()  # gathering creates one
    MistakeMemory(path=tmp_path / "mem", embedder=HashingEmbedder(), create=False).close()  # then reading opens it


def test_memory_count_on_an_unrelated_folder_creates_nothing(tmp_path: Path) -> None:
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    result = CliRunner().invoke(app, ["memory", "count", "--memory", str(unrelated)])
    assert isinstance(result.exception, ConfigError) and "no mistake memory" in str(result.exception)
    assert list(unrelated.iterdir()) == []


def kin(id: str, question: str, target: str = "(B)", source: str = "bbq/Age") -> Example:
    options = ("Cannot be determined", "The grandmother", "The grandson")
    text = f"{question}\nOptions:\n" + "\n".join(f"({k}) {o}" for k, o in zip("ABC", options, strict=True))
    return Example(id, source, text, target, "choice", options)


async def test_an_assisted_exam_needs_this_students_mistakes_on_this_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        runtime.workflows.commands, "MistakeMemory", functools.partial(MistakeMemory, embedder=HashingEmbedder())
    )
    roles = Roles(FakeStudent(), FakeAssistant())
    items = [kin("kin/1", "A grandson and a grandmother met for lunch. Who forgot the reservation?")]

    def exam(out: str, memory: Path, task: str = "bbq") -> Coroutine[Any, Any, runtime.workflows.commands.Outcome]:
        return runtime.workflows.commands.examine(
            items, roles, tmp_path / out, mode="assisted", task=task, limit=None, memory_path=memory
        )

    with pytest.raises(ConfigError, match="no mistake memory at"):
        await exam("typo-exam", tmp_path / "runs" / "typo")  # a mistyped path
    assert not (tmp_path / "runs").exists() and not (tmp_path / "typo-exam").exists()

    mem = tmp_path / "mem"
    with MistakeMemory(path=mem, embedder=HashingEmbedder()) as store:  # another student's mistakes only
        await run_gathering(
            items, Roles(FakeStudent("someone-else"), FakeAssistant()), store, RunDir(tmp_path / "g", {}), task="bbq"
        )
    with pytest.raises(ConfigError, match=r"no mistakes of fake-student on task 'bbq' \(1 in all\)"):
        await exam("empty-exam", mem)
    assert not (tmp_path / "empty-exam").exists()

    with MistakeMemory(path=mem, embedder=HashingEmbedder()) as store:
        await run_gathering(items, roles, store, RunDir(tmp_path / "g2", {}), task="bbq")
    with pytest.raises(ConfigError, match="on task 'gsm8k'"):
        await exam("other-task", mem, task="gsm8k")
    outcome = await exam("exam", mem)  # with the student's own mistakes on the task it runs, and retrieves them
    assert outcome.results[0].retrieved


# ---- 4. prompts past the model's context: refused before any model call ------------------------------------------


async def test_the_local_backend_refuses_a_prompt_past_its_context(tiny_model: Path) -> None:
    from runtime.models.local import LocalBackend

    backend = LocalBackend(tiny_model)
    assert backend.context_length == 2048
    long: list[Message] = [{"role": "user", "content": "apples " * 3000}]
    started = time.perf_counter()
    with pytest.raises(BackendError, match=r"the prompt is [\d,]+ tokens, over the 2,040 .* 2,048-token context"):
        await backend.generate(long, GenerationSettings(max_new_tokens=8))
    with pytest.raises(BackendError, match="2,048-token context"):
        await backend.score_options(long, ["(A) x", "(B) y"])
    with pytest.raises(BackendError, match="2,048-token context"):
        await backend.prompt_logprobs("apples " * 3000)
    assert time.perf_counter() - started < 10
    assert backend.stats["forwards"] == 0  # not one forward pass was run on it
    short: list[Message] = [{"role": "user", "content": "apples"}]
    assert (await backend.generate(short, GenerationSettings(max_new_tokens=2))).usage.completion_tokens <= 2


def test_eval_names_the_file_and_line_of_a_row_past_the_context(tmp_path: Path, tiny_model: Path) -> None:
    rows = [QUIZ[0], {"input": "apples " * 3000 + "\nOptions:\n(A) yes\n(B) no", "target": "A"}, QUIZ[1]]
    quiz = write_jsonl(tmp_path / "quiz.jsonl", rows)
    out = tmp_path / "run"
    args = ["eval", "--jsonl", str(quiz), "--model", str(tiny_model), "--max-new-tokens", "4", "--no-cache"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert isinstance(result.exception, DataError), result.output
    message = str(result.exception)
    assert message.startswith(f"{quiz}:2: the prompt is ") and "2,048-token context" in message
    assert not out.exists()  # refused before the run directory, and before any model call


# ---- 5. mistake ids cover model, source, task, question and gold --------------------------------------------------


async def test_the_same_item_under_two_tasks_or_with_two_golds_is_two_mistakes(tmp_path: Path) -> None:
    mem = MistakeMemory(location=":memory:", embedder=HashingEmbedder(dim=256))
    roles = Roles(FakeStudent(), FakeAssistant())
    item = kin("bbq/Age/1", "A grandson and a grandmother met for lunch. Who forgot the reservation?")
    await run_gathering([item], roles, mem, RunDir(tmp_path / "bbq", {}), task="bbq")
    await run_gathering([item], roles, mem, RunDir(tmp_path / "age", {}), task="bbq/Age")
    assert mem.count() == 2 and mem.count(RecordFilter(task="bbq")) == mem.count(RecordFilter(task="bbq/Age")) == 1

    # One input, two targets (a relabelled copy): neither record overwrites the other.
    relabelled = kin("mine/1", "Who forgot the list?", target="(B)", source="mine")
    other_gold = kin("mine/2", "Who forgot the list?", target="(A)", source="mine")  # the student answers (C)
    await run_gathering([relabelled, other_gold], roles, mem, RunDir(tmp_path / "mine", {}), task="mine")
    assert sorted(r.gold for r in mem.list(RecordFilter(task="mine"))) == ["(A)", "(B)"]
    # Re-gathering the same items still never duplicates.
    await run_gathering([item], roles, mem, RunDir(tmp_path / "bbq-again", {}), task="bbq")
    assert mem.count() == 4
    mem.close()


# ---- 6. a choice target with no options is a bad row --------------------------------------------------------------


@pytest.mark.parametrize("target", ["(Q)", "B"])
def test_a_choice_target_without_option_lines_is_a_bad_row(tmp_path: Path, target: str) -> None:
    rows = [QUIZ[0], {"input": "Which is it? No options are listed here.", "target": target}]
    path = write_jsonl(tmp_path / "quiz.jsonl", rows)
    with pytest.raises(DataError, match=rf"quiz.jsonl:2: a choice target \({target.strip('()')}\) needs options"):
        load_jsonl(path, "choice")
    assert load_jsonl(path, "text")[1].target == target  # the same row is fine as a text item

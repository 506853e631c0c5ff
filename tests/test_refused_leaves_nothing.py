"""Issue 25, item 9: a refused or failed command leaves nothing behind: no half-made run folder (``.run.lock`` and
``config.json``), no ``memory/`` for ``run``; a run being resumed is never removed. Each test failed on the code
before the fix (the folders were left).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.data.records import Record
from runtime.data.rundir import RunDir


def redpen(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("REDPEN_LOG", None)
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in expected:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def quiz(tmp_path: Path) -> Path:
    path = tmp_path / "quiz.jsonl"
    row = {"input": "Which is a fruit?\nOptions:\n(A) apple\n(B) brick", "target": "(A)"}
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_run_against_an_unreachable_server_leaves_no_run_folder_and_no_memory(
    tmp_path: Path, quiz: Path, dead_url: str
) -> None:
    server = ["--backend", "openai", "--model", "m", "--base-url", dead_url]
    out = tmp_path / "runs" / "run-quiz"
    result = redpen("run", "--gather-jsonl", quiz, "--examine-jsonl", quiz, *server, "--out", out, cwd=tmp_path)
    one_line_error(result, "cannot reach the OpenAI-compatible server")
    assert not (tmp_path / "runs").exists()  # nor the parent folder it made for the run


def test_eval_into_an_empty_folder_that_fails_leaves_it_empty(tmp_path: Path, quiz: Path, dead_url: str) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    server = ["--backend", "openai", "--model", "m", "--base-url", dead_url]
    result = redpen("eval", "--jsonl", quiz, *server, "--out", out, cwd=tmp_path)
    one_line_error(result, "cannot reach the OpenAI-compatible server")
    assert out.is_dir() and not list(out.iterdir())  # the user's folder stays, as it was


def test_instruct_with_a_missing_memory_makes_no_run_folder(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "runs" / "instruct"
    args = ["--target", "bbq", "--strategy", "memory", "--memory", tmp_path / "nowhere", "--data-dir", data_dir]
    result = redpen("instruct", *args, "--select", "2", "--eval-limit", "2", "--out", out, cwd=tmp_path)
    one_line_error(result, "no mistake memory there")
    assert not (tmp_path / "runs").exists()


def test_a_failure_before_the_first_record_removes_only_what_the_run_made(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    run = RunDir(kept / "a" / "b", {"command": "t"})
    with pytest.raises(RuntimeError), run.removed_on_failure():
        (run.path / "memory").mkdir()  # e.g. the embedded memory, opened before the first record
        raise RuntimeError("the server is down")
    assert kept.is_dir() and not list(kept.iterdir())
    again = RunDir(kept / "a" / "b", {"command": "t"})  # the lock was let go: the same run starts again
    assert again.new


def test_a_resumed_or_recorded_run_is_never_removed(tmp_path: Path) -> None:
    first = RunDir(tmp_path / "run", {"command": "t"})
    with pytest.raises(RuntimeError), first.removed_on_failure():
        first.append("results.jsonl", Record(id="1"))
        raise RuntimeError("died after a record")
    assert first.done_ids("results.jsonl", Record) == {"1"}
    resumed = RunDir(tmp_path / "run", {"command": "t"})
    with pytest.raises(RuntimeError), resumed.removed_on_failure():
        raise RuntimeError("died before its first new record")
    assert resumed.done_ids("results.jsonl", Record) == {"1"} and (tmp_path / "run" / "config.json").exists()


def test_ctrl_c_before_the_first_record_keeps_the_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run", {"command": "t"})
    with pytest.raises(KeyboardInterrupt), run.removed_on_failure():
        raise KeyboardInterrupt  # the command says to re-run it; the folder stays to be resumed
    assert (tmp_path / "run" / "config.json").exists()


def test_ablation_refused_for_its_base_model_makes_no_folder(tmp_path: Path) -> None:
    from runtime.data.records import CorrectIdentity, RunConfig

    data = tmp_path / "correct"
    RunDir.create(
        data, RunConfig(identity=CorrectIdentity(task="gsm8k", limit=None, samples=4, student="s", corrector="c"))
    )
    row = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    (data / "cot.jsonl").write_text(row * 2)
    (data / "corrections.jsonl").write_text(row)
    result = redpen("ablate-corrections", "--data", data, "--base-model", tmp_path / "nowhere", cwd=tmp_path)
    one_line_error(result, "has no config.json")
    assert not (tmp_path / "correct-ablation").exists()  # was made, with both training sets, before the refusal

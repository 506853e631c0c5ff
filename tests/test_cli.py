"""The ``redpen`` command line: help, task listing, one-line errors with exit code 2, and eval on a tiny model."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.cli import app
from runtime.data.records import CorrectIdentity, RunConfig
from runtime.data.rundir import RunDir
from runtime.errors import ConfigError
from tests.helpers import build_tiny_model, make_episode

ROWS = [
    {"input": "Which colour is the sky?\nOptions:\n(A) red\n(B) blue\n(C) green", "target": "B"},
    {"input": "Which is a fruit?\nOptions:\n(A) apple\n(B) brick", "target": "(A)"},
    {"input": "Which number is even?\nOptions:\n(A) 3\n(B) 5\n(C) 8", "target": "C", "note": "kept as metadata"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def good_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def redpen(*args: str | Path, data_dir: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real entry point (``main()``, which turns errors into one line) in a fresh process.

    COLUMNS=80: a narrow terminal, where a long error must still stay on one line.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("REDPEN_LOG", None)
    if data_dir is not None:
        env["REDPEN_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one ``error:`` line that holds every expected fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in expected:
        assert fragment in errors[0], f"{fragment!r} not in the error line; stderr was:\n{result.stderr}"
    return errors[0]


# ---- in-process (CliRunner) -----------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("eval", "tasks", "models", "serve", "bench"):
        assert command in result.stdout


def test_eval_help_names_its_options() -> None:
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    for option in ("--task", "--jsonl", "--mc-mode", "--out", "--json", "--backend"):
        assert option in result.stdout


def test_tasks_lists_benchmark_names(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["tasks", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    names = result.stdout.split()
    assert "bbq" in names and "bbh/date_understanding" in names and "bbq/Age" in names
    assert names == sorted(names)


def test_eval_on_a_tiny_model_writes_the_run(tmp_path: Path, tiny_model: Path, good_jsonl: Path) -> None:
    out = tmp_path / "run"
    base = ["eval", "--jsonl", str(good_jsonl), "--model", str(tiny_model), "--out", str(out), "--json"]
    args = [*base, "--max-new-tokens", "6"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"config.json", "results.jsonl", "metrics.json", "report.md"}

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    overall = summary["overall"]
    assert overall["n"] == len(ROWS)
    assert overall["correct"] + overall["wrong"] + overall["no_answer"] == len(ROWS)
    assert summary["task"] == "quiz" and summary["mc_mode"] == "generate"
    assert overall["completion_tokens"] <= 6 * len(ROWS)

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["quiz/1", "quiz/2", "quiz/3"]
    assert {r["target"] for r in records} == {"(A)", "(B)", "(C)"}
    assert json.loads((out / "metrics.json").read_text())["overall"] == overall
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["model_id"] == "tiny-llama" and config["n_examples"] == len(ROWS)
    assert "| **all** | 3 |" in (out / "report.md").read_text()

    # The same command again resumes: nothing is answered twice.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "results.jsonl").read_text().count("\n") == len(ROWS)
    assert json.loads(again.stdout.strip().splitlines()[-1])["overall"] == overall

    # A different command on the same folder is refused, naming what changed.
    changed = CliRunner().invoke(app, [*base, "--max-new-tokens", "7"])
    assert isinstance(changed.exception, ConfigError)
    assert "max_new_tokens: 6 -> 7" in str(changed.exception)


def test_train_assistant_trains_from_a_gather_directory(
    tmp_path: Path, tiny_model: Path, good_jsonl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`gather` records its backends, so train-assistant finds the assistant's model folder there."""
    gathered = tmp_path / "gather"
    args = ["--jsonl", str(good_jsonl), "--model", str(tiny_model), "--max-new-tokens", "4", "--rounds", "1"]
    result = CliRunner().invoke(app, ["gather", *args, "--out", str(gathered), "--no-cache"])
    assert result.exit_code == 0, result.output
    config = RunConfig.read(gathered)
    assert config.identity.command == "gather" and config.memory == {"path": str(gathered / "memory")}
    assert config.assistant_backend is not None and config.assistant_backend.path == str(tiny_model)
    assert config.student_backend is not None and config.student_backend.kind == "local"
    # A random model is never helped by feedback: give the run rewarded episodes, keep what gather recorded.
    episodes = [make_episode(f"quiz/{i}", [(1, False)]) for i in range(3)]
    (gathered / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))

    adapter = tmp_path / "adapter"
    # no --no-compare: a gather directory has no examine split, so the comparison is skipped, and said so
    command = ["train-assistant", "--runs", str(gathered), "--out", str(adapter), "--max-steps", "1"]
    with caplog.at_level(logging.WARNING, logger="training.assistant"):
        result = CliRunner().invoke(app, [*command, "--json"])
    assert result.exit_code == 0, result.output
    assert any("trained without the comparison" in r.getMessage() for r in caplog.records)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["replay"]["kept"], summary["steps"], summary["reused"]) == (3, 1, False)
    metadata = json.loads((adapter / "adapter" / "redpen_adapter.json").read_text())
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter", "replay"]  # all under --out, no scratch left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gather", "quiz.jsonl"]  # nothing beside it
    assert metadata["base_model"]["path"] == str(tiny_model)  # the gather run's assistant, not the default model
    again = CliRunner().invoke(app, [*command, "--json"])  # the same replay and settings: the adapter is reused
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["reused"] is True


def test_eval_loglik_on_a_tiny_model(tmp_path: Path, tiny_model: Path, good_jsonl: Path) -> None:
    out = tmp_path / "loglik"
    args = ["eval", "--jsonl", str(good_jsonl), "--model", str(tiny_model), "--out", str(out), "--json"]
    result = CliRunner().invoke(app, [*args, "--mc-mode", "loglik", "--limit", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["overall"]["n"] == 2 and summary["overall"]["no_answer"] == 0
    assert summary["modes"] == {"loglik": 2}
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [len(r["scores"]) for r in sorted(records, key=lambda r: r["id"])] == [3, 2]


# ---- the real entry point: one line, exit code 2 --------------------------------------------------------------


def test_unknown_task_suggests_a_close_name(data_dir: Path, tmp_path: Path) -> None:
    result = redpen("eval", "--task", "bbh/date_understandin", "--out", tmp_path / "run", data_dir=data_dir)
    assert_one_line_error(result, "unknown task 'bbh/date_understandin'", "did you mean bbh/date_understanding")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_data_dir(tmp_path: Path) -> None:
    result = redpen("eval", "--task", "bbq", "--data-dir", "/nonexistent", "--out", tmp_path / "run")
    assert_one_line_error(result, "/nonexistent", "--data-dir", "REDPEN_DATA_DIR")
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + '\n{"input": "Q", "target": \n' + json.dumps(ROWS[1]) + "\n")
    result = redpen("eval", "--jsonl", bad, "--out", tmp_path / "run")
    assert_one_line_error(result, f"{bad}:2", "not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1


def test_error_text_is_printed_verbatim(tmp_path: Path) -> None:
    """A path with square brackets must not be read as console markup (and dropped, or crash the printer)."""
    folder = tmp_path / "run[v2]" / "data[/x]"
    folder.mkdir(parents=True)
    bad = folder / "bad.jsonl"
    bad.write_text('{"input": "Q"\n')
    result = redpen("eval", "--jsonl", bad, "--out", tmp_path / "run")
    assert_one_line_error(result, f"{bad}:1")


def test_unknown_backend(tmp_path: Path, good_jsonl: Path) -> None:
    result = redpen("eval", "--jsonl", good_jsonl, "--backend", "foo", "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown backend 'foo'", "--backend local")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unreachable_server_fails_fast(tmp_path: Path, good_jsonl: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    openai_args = ["--backend", "openai", "--model", "x", "--base-url", url]
    result = redpen("eval", "--jsonl", good_jsonl, *openai_args, "--out", tmp_path / "run", timeout=60)
    elapsed = time.perf_counter() - started
    assert_one_line_error(result, f"cannot reach the OpenAI-compatible server at {url}", "fix --base-url")
    assert elapsed < 20, f"took {elapsed:.1f}s to report an unreachable server"


def test_train_assistant_on_a_folder_that_is_no_run(tmp_path: Path) -> None:
    result = redpen("train-assistant", "--runs", tmp_path, "--out", tmp_path / "adapter")
    assert_one_line_error(result, "is not a redpen run directory")


def test_train_assistant_with_no_rewarded_steps(tmp_path: Path) -> None:
    from tests.helpers import make_episode, make_run_dir

    run = make_run_dir(tmp_path / "run", "student-model", [make_episode("e1", [(0, False), (0, False)])])
    result = redpen("train-assistant", "--runs", run, "--out", tmp_path / "adapter", "--no-compare")
    assert_one_line_error(result, "no rewarded steps")
    assert not (tmp_path / "adapter").exists()


def test_ablation_without_kept_corrections(tmp_path: Path) -> None:
    data = tmp_path / "correct"
    identity = CorrectIdentity(task="gsm8k", limit=None, samples=4, student="s", corrector="c")
    RunDir.create(data, RunConfig(identity=identity))
    row = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    (data / "cot.jsonl").write_text(row)
    (data / "corrections.jsonl").write_text("")
    result = redpen("ablate-corrections", "--data", data)
    assert_one_line_error(result, "no kept corrections")

"""Issue 25, item 6: every numeric setting has a bound, declared where the setting is, and a value outside it is one
line naming the setting (exit 2, no traceback), before anything runs or is written. Each case below ran on the code
before the fix: a mistake that never happened written with exit 0, a hang, junk replies, or a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from agents.team import RolesConfig
from runtime.cli import app
from runtime.errors import ConfigError
from runtime.models.config import BackendConfig, backend_config
from training.instruct.settings import InstructSettings


def redpen(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point (``main()``) in a fresh process; COLUMNS=80, so the error must stay one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("REDPEN_LOG", None)
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 2, no traceback, and the whole of stderr one ``error:`` line holding every expected fragment."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    for fragment in expected:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def quiz(tmp_path: Path) -> Path:
    path = tmp_path / "quiz.jsonl"
    row = {"input": "Which is a fruit?\nOptions:\n(A) apple\n(B) brick", "target": "(A)"}
    path.write_text(json.dumps(row) + "\n")
    return path


CASES = [
    # (command and options, fragments of the one error line)
    (["run", "--rounds", "-1"], ["--rounds", "greater than or equal to 1"]),  # wrote an episode that never happened
    (["run", "--rounds", "1000"], ["--rounds", "less than or equal to 20"]),
    (["run", "--concurrency", "-1"], ["--concurrency", "greater than or equal to 1"]),  # a 56-line traceback
    (["gather", "--concurrency", "1000000000"], ["--concurrency", "less than or equal to 4096"]),
    (["exam", "--k", "0"], ["--k", "greater than or equal to 1"]),
    (["exam", "--threshold", "1.5"], ["--threshold", "less than or equal to 1"]),
    (["run", "--threshold", "-0.1"], ["--threshold", "greater than or equal to 0"]),
    (["eval", "--samples", "1000000000"], ["--samples", "less than or equal to 200"]),  # hung
    (["eval", "--max-new-tokens", "0"], ["--max-new-tokens", "greater than or equal to 1"]),  # junk, exit 0
    (["eval", "--max-new-tokens", "-1"], ["--max-new-tokens", "greater than or equal to 1"]),
    (["gather", "--max-new-tokens", "0"], ["--max-new-tokens", "greater than or equal to 1"]),
    (["eval", "--temperature", "-1"], ["--temperature", "greater than or equal to 0"]),
    (["eval", "--limit", "0"], ["--limit", "greater than or equal to 1"]),
    (["run", "--gather-limit", "-3"], ["--gather-limit", "greater than or equal to 1"]),
    (["correct", "--samples", "0"], ["--samples", "greater than or equal to 1"]),
    (["train-student", "--data", "d", "--out", "o", "--max-steps", "-5"], ["--max-steps", "greater than or equal"]),
    (["memory", "list", "--memory", "m", "--limit", "-1"], ["--limit", "greater than or equal to 1"]),
    (["bench", "generate", "--repeats", "0"], ["--repeats", "greater than or equal to 1"]),
    (["serve", "--port", "70000"], ["--port", "less than or equal to 65535"]),
    (["instruct", "--target", "bbq", "--select", "0"], ["--select must be in the range 1<=x<=100000, got 0"]),
    (["instruct", "--target", "bbq", "--budget", "1000000000"], ["--budget", "1<=x<=100000"]),
    (["instruct", "--target", "bbq", "--eval-limit", "-1"], ["--eval-limit", "1<=x<=100000"]),
    (["instruct", "--target", "bbq", "--k", "1000"], ["--k", "1<=x<=50"]),
    (["instruct", "--target", "bbq", "--learning-rate", "0"], ["--learning-rate", "0<x<=1"]),
    (["instruct", "--target", "bbq", "--concurrency", "-1"], ["--concurrency", "1<=x<=4096"]),
    (["instruct", "--target", "bbq", "--seed", "-1"], ["--seed", "0<=x<=4294967295"]),
]


def main_in_process(
    args: list[str | Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """``main()`` as ``redpen`` runs it, in this process (a fresh one per case would take seconds each)."""
    import runtime.cli as cli

    monkeypatch.setattr(cli, "configure_logging", lambda: None)
    monkeypatch.setattr(sys, "argv", ["redpen", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, captured.out, captured.err)


@pytest.mark.parametrize(("args", "fragments"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_an_option_outside_its_bound_is_one_line_and_writes_nothing(
    args: list[str],
    fragments: list[str],
    tmp_path: Path,
    quiz: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    data: list[str | Path] = ["--jsonl", quiz] if args[0] in ("eval", "gather", "exam") else []
    data += ["--gather-jsonl", quiz, "--examine-jsonl", quiz] if args[0] == "run" else []
    out = ["--out", tmp_path / "run"] if args[0] in ("eval", "gather", "exam", "run", "instruct") else []
    one_line_error(main_in_process([*args, *data, *out], monkeypatch, capsys), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiz.jsonl"]  # no run folder, no runs/, no memory/


def test_the_real_entry_point_prints_a_bound_as_one_line(tmp_path: Path, quiz: Path) -> None:
    result = redpen("run", "--gather-jsonl", quiz, "--examine-jsonl", quiz, "--rounds", "-1", cwd=tmp_path)
    one_line_error(result, "--rounds", "greater than or equal to 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiz.jsonl"]


def test_a_config_file_s_concurrency_is_bounded(tmp_path: Path, quiz: Path) -> None:
    # max_concurrency = 10**9 built a billion clients one by one and hung without a word
    config = tmp_path / "roles.toml"
    config.write_text('[student]\nkind = "openai"\nmodel = "m"\nmax_concurrency = 1000000000\n')
    result = redpen("gather", "--jsonl", quiz, "--config", config, "--out", tmp_path / "run", cwd=tmp_path)
    one_line_error(result, f"{config}: [student] max_concurrency", "less than or equal to 4096")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"max_batch_size": 10**6}, "max_batch_size"),
        ({"batch_wait_ms": 10**9}, "batch_wait_ms"),
        ({"prefix_cache_mb": 2**40}, "prefix_cache_mb"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_backend_settings_are_bounded(setting: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        backend_config(kind="local", **setting)


def test_the_student_s_reply_length_is_bounded_as_one_line_from_python_too() -> None:
    # was a pydantic ValidationError (a traceback) from RolesConfig.load, the route every SALAM command takes
    with pytest.raises(ConfigError, match="student_max_new_tokens"):
        RolesConfig.load(student=BackendConfig(kind="local"), student_max_new_tokens=0)
    with pytest.raises(ConfigError, match="student_max_new_tokens"):
        RolesConfig.load(student=BackendConfig(kind="local"), student_max_new_tokens=10**9)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"select": 10**9}, "--select must be in the range 1<=x<=100000"),
        ({"max_cases": 10**9}, "--max-cases must be in the range"),
        ({"epochs": 1e6}, "--epochs must be in the range 0<x<=100"),
        ({"lr_decay": 0.0}, "--lr-decay must be in the range 0<x<=1"),
        ({"contamination": 2.0}, "--contamination must be in the range 0<=x<=1"),
        ({"near_duplicate": -1.0}, "--near-duplicate must be in the range 0<=x<=1"),
        ({"dev_fraction": 1.0}, "--dev-fraction must be in the range 0<x<1"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be in the range 1<=x<=32768"),
        ({"instructor_tokens": 10**9}, "--instructor-tokens must be in the range"),
        ({"learning_rate": float("nan")}, "--learning-rate must be in the range 0<x<=1, got nan"),
    ],
)
def test_instruct_settings_are_bounded_where_they_are_declared(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        InstructSettings(targets=["bbq"], **setting)


def test_a_bound_reads_as_its_range() -> None:
    from runtime.bounds import Bound

    assert str(Bound(1, 20)) == "1<=x<=20" and str(Bound(0, 1, open_low=True, open_high=True)) == "0<x<1"
    assert Bound(0, 1).holds(1) and not Bound(0, 1, open_high=True).holds(1) and not Bound(0, 1).holds(float("nan"))


# Numeric options bounded by the settings object they fill (checked there, the tests above): instruct's by
# InstructSettings; serve's request limits by ServeLimits (runtime.server.limits).
SETTINGS_CHECKED = {"instruct", "serve"}
SERVE_LIMITS = {
    "--max-body-bytes",
    "--max-tokens",
    "--default-max-tokens",
    "--in-flight-per-key",
    "--request-timeout-s",
    "--shutdown-grace-s",
    "--guidance-tokens",
}
# Options with a floor and no ceiling: the data caps them (a limit past the data's size takes all of it).
UNCAPPED = {"--limit", "--gather-limit", "--rows"}


def numeric_options() -> list[tuple[str, Any]]:
    found = []

    def walk(command: Any, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in command.params:
            if param.type_descriptor.annotation in (int, float):
                found.append((path, param))

    walk(typer.main.get_command(app), "")
    return found


def test_every_numeric_option_has_a_bound() -> None:
    options = numeric_options()
    assert len(options) > 40  # the walk found the commands' options
    unbounded = []
    for path, param in options:
        option = param.opts[0]
        if path == "instruct" or (path == "serve" and option in SERVE_LIMITS):
            continue
        if param.min is None or (param.max is None and option not in UNCAPPED):
            unbounded.append(f"{path} {option}")
    assert not unbounded, unbounded


def test_every_numeric_instruct_option_is_a_bounded_setting() -> None:
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(InstructSettings)}
    for path, param in numeric_options():
        if path == "instruct":
            assert "bound" in fields[param.name].metadata, param.name


def test_every_serve_limit_option_is_a_bounded_limit() -> None:
    import dataclasses

    from runtime.server import ServeLimits

    fields = {f.name: f for f in dataclasses.fields(ServeLimits)}
    limits = [param for path, param in numeric_options() if path == "serve" and param.opts[0] in SERVE_LIMITS]
    assert {param.opts[0] for param in limits} == SERVE_LIMITS == {"--" + n.replace("_", "-") for n in fields}
    assert all("bound" in fields[param.name].metadata for param in limits)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_tokens": 0}, "--max-tokens must be in the range 1<=x, got 0"),
        ({"request_timeout_s": 0.0}, "--request-timeout-s must be in the range 0<x, got 0.0"),
        ({"guidance_tokens": -1}, "--guidance-tokens must be in the range 0<=x, got -1"),
        ({"default_max_tokens": 2048}, "--default-max-tokens 2048 is over --max-tokens 1024"),
    ],
)
def test_serve_limits_are_bounded_where_they_are_declared(setting: dict[str, Any], message: str) -> None:
    from runtime.server import ServeLimits

    with pytest.raises(ConfigError, match=message):
        ServeLimits(**setting)

"""Issue 12, defects 7-13: one clear line instead of a traceback, and training that resumes, stays inside the
folder it is given and reads its datasets strictly. Each test fails on the code before the fix.

Unwritable paths: we may run as root, for whom permission bits do not apply; then the unwritable place is under
``/sys`` (sysfs creates nothing, whoever asks), else a folder without write permission. Neither case is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import BackendError, ConfigError, DataError
from tests.helpers import build_tiny_model, make_episode, make_run_dir

INTERRUPTED = "interrupted; finished items are saved, re-run the same command to resume"


def quiz_row(i: int) -> dict[str, str]:
    return {"input": f"Which word names a thing {i}?\nOptions:\n(A) apple\n(B) stone\n(C) cloud", "target": "(A)"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def quiz(tmp_path: Path) -> Path:
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(quiz_row(i)) + "\n" for i in range(3)))
    return path


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot create anything in."""
    if os.geteuid() == 0:
        yield Path("/sys/kernel")
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


def redpen(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real entry point (``main()``) in a fresh process; COLUMNS=80, so a long error must stay one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("REDPEN_LOG", None)
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one ``error:`` line holding every expected fragment."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---- 7. a backend error inside an AutoGen team is one line and exit 2, as outside one -------------------------


def failing_roles() -> object:
    from agents.team import Roles
    from tests.helpers import ScriptedBackend

    def unreachable(messages: object, settings: object) -> str:
        raise BackendError("cannot reach the OpenAI-compatible server at http://nowhere: start it")

    backend = ScriptedBackend(unreachable)
    return Roles(backend, backend)


def test_a_backend_error_inside_a_team_is_raised_as_itself() -> None:
    """AutoGen re-raises what an agent raises as a RuntimeError of its traceback text; redpen raises the original."""
    from agents.examination import exam_item
    from agents.gathering import gather_episode
    from runtime.data.tasks import Example

    example = Example(id="q/1", source="q", input=quiz_row(1)["input"], target="(A)", answer_kind="choice")
    roles = failing_roles()
    with pytest.raises(BackendError, match="cannot reach"):
        asyncio.run(gather_episode(example, roles, "q"))  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="cannot reach"):
        asyncio.run(exam_item(example, roles, "baseline"))  # type: ignore[arg-type]


def test_gather_against_an_unreachable_server_is_one_line(tmp_path: Path, quiz: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    result = redpen("gather", "--jsonl", quiz, "--backend", "openai", "--model", "m", "--base-url", url,
                    "--out", tmp_path / "run", "--memory", tmp_path / "memory")  # fmt: skip
    one_line_error(result, "cannot reach the OpenAI-compatible server", url)


# ---- 8. config errors name the table and key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"student = 3\n", "[student] must be a table"),
        (b'[student]\nmodel = "\xff"\n', "not UTF-8 text"),
        (b'[student]\nmodle = "x"\n', "[student] modle: unknown setting"),
        (b'[assistant]\nmax_batch_size = "many"\n', "[assistant] max_batch_size:"),
        (b"[assistant]\nmodel = 5\n", "[assistant] model:"),
    ],
)
def test_a_bad_config_names_the_table_and_key(tmp_path: Path, text: bytes, expected: str) -> None:
    from agents.team import RolesConfig
    from runtime.models.config import BackendConfig

    config = tmp_path / "roles.toml"
    config.write_bytes(text)
    with pytest.raises(ConfigError) as error:
        RolesConfig.load(config, student=BackendConfig(kind="local"))
    assert str(config) in str(error.value) and expected in str(error.value)


def test_a_config_that_is_not_a_table_is_one_line_on_the_command_line(tmp_path: Path, quiz: Path) -> None:
    (tmp_path / "roles.toml").write_text("student = 3\n")
    result = redpen("gather", "--jsonl", quiz, "--config", tmp_path / "roles.toml", "--out", tmp_path / "run")
    one_line_error(result, "[student] must be a table")


# ---- 9. paths that cannot be written, results that are not redpen's: one line each -----------------------------


def test_out_paths_that_cannot_be_written_are_one_line(
    tmp_path: Path, tiny_model: Path, quiz: Path, unwritable: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    eval_args: list[str | Path] = ["eval", "--jsonl", quiz, "--model", tiny_model, "--max-new-tokens", "2", "--out"]
    one_line_error(redpen(*eval_args, notes), f"cannot use {notes}", "a file is in the way")
    one_line_error(redpen(*eval_args, notes / "run"), f"cannot use {notes / 'run'}", "part of the path is a file")
    out = unwritable / "redpen-run"
    one_line_error(redpen(*eval_args, out), f"cannot use {out}", "permission denied")
    assert notes.read_text() == "mine\n"


def test_memory_export_to_a_path_that_cannot_be_written_is_one_line(tmp_path: Path, unwritable: Path) -> None:
    from memory.store import MistakeMemory

    with MistakeMemory(path=tmp_path / "memory"):
        pass  # an empty memory, made
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    target = unwritable / "mistakes.jsonl"
    export = ("memory", "export", "--memory", tmp_path / "memory")
    one_line_error(redpen(*export[:2], target, *export[2:]), f"cannot use {target}", "permission denied")
    under_file = notes / "mistakes.jsonl"
    one_line_error(redpen(*export[:2], under_file, *export[2:]), f"cannot use {under_file}", "is a file")
    one_line_error(redpen(*export[:2], tmp_path, *export[2:]), f"cannot use {tmp_path}", "it is a folder")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_results_file_whose_lines_lack_ids_is_one_line(tmp_path: Path, tiny_model: Path, quiz: Path) -> None:
    out = tmp_path / "run"
    command = ("eval", "--jsonl", quiz, "--model", tiny_model, "--max-new-tokens", "2", "--out", out)
    assert redpen(*command).returncode == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({"verdict": r["verdict"]}) + "\n" for r in rows))
    one_line_error(redpen(*command), f"{out / 'results.jsonl'}:1: the line is no ItemResult (id: Field required)")


# ---- 10. Ctrl-C: one line, exit 130, and the run resumes ------------------------------------------------------


def test_ctrl_c_during_gather_is_one_line_and_the_run_resumes(tmp_path: Path, tiny_model: Path) -> None:
    rows = tmp_path / "many.jsonl"
    rows.write_text("".join(json.dumps(quiz_row(i)) + "\n" for i in range(24)))
    config = tmp_path / "roles.toml"
    config.write_text(f'[student]\nmodel = {json.dumps(str(tiny_model))}\ndtype = "float32"\n')
    out = tmp_path / "run"
    args: list[str | Path] = ["gather", "--jsonl", rows, "--config", config, "--max-new-tokens", "8",
                              "--concurrency", "2", "--no-cache", "--out", out,
                              "--memory", tmp_path / "memory"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("REDPEN_LOG", None)
    command = [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]
    log = tmp_path / "gather.log"
    with log.open("w") as stderr_file:  # a file, not a pipe nobody reads while it runs
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=env,
            # A shell may start background jobs with SIGINT ignored; the user's Ctrl-C reaches a foreground process.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    episodes = out / "episodes.jsonl"
    deadline = time.monotonic() + 600
    while not episodes.exists() or episodes.read_text().count("\n") < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "gathering never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count(INTERRUPTED) == 1, stderr[-3000:]
    assert len(stderr.splitlines()) <= 6, stderr  # the log lines before it, the progress bar and the one line
    done = [json.loads(line) for line in episodes.read_text().splitlines()]
    assert 2 <= len(done) < 24

    again = redpen(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in episodes.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24  # resumed: nothing lost, nothing twice
    after = {e["id"]: e for e in map(json.loads, episodes.read_text().splitlines())}
    assert {e["id"]: e for e in done}.items() <= after.items()  # what was finished is kept, not redone


# ---- 11. train-assistant: everything under --out, resume from a checkpoint, no scratch left on failure -------


def rewarded_runs(tmp_path: Path, tiny_model: Path) -> Path:
    from runtime.data.records import BackendInfo

    assistant = BackendInfo(kind="local", model_id="tiny-llama", path=str(tiny_model))
    episodes = [make_episode(f"quiz/{i}", [(1, False)]) for i in range(3)]
    return make_run_dir(tmp_path / "runs" / "gather", "student-model", episodes, assistant=assistant)


def test_train_assistant_writes_only_under_out(tmp_path: Path, tiny_model: Path) -> None:
    from training.assistant import train_assistant

    runs = rewarded_runs(tmp_path, tiny_model)
    out = tmp_path / "adapters" / "assistant"
    result = train_assistant([runs], out, max_steps=2, compare=False)
    assert result.trained.adapter_dir == out / "adapter" and result.replay_dir == out / "replay"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "replay"]
    assert [p.name for p in out.parent.iterdir()] == ["assistant"]  # nothing beside --out: no -replay, no scratch

    # A failure after the replay was exported (here: a base model folder that is none) leaves nothing behind.
    failed = tmp_path / "adapters" / "failed"
    with pytest.raises(ConfigError, match="has no config.json"):
        train_assistant([runs], failed, max_steps=2, base_model=str(tmp_path), compare=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["assistant"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match="holds files this command did not write"):
        train_assistant([runs], notes, max_steps=2, compare=False)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


def chat_dataset(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    from training.sft_config import LoraSFTConfig
    from training.sft_trainer import scratch_folder, train_lora

    dataset = chat_dataset(tmp_path / "rows.jsonl")
    settings: dict[str, Any] = {"base_model": str(tiny_model), "max_steps": 12, "save_steps": 3, "logging_steps": 1,
                "per_device_train_batch_size": 2}  # fmt: skip
    config = LoraSFTConfig(output_dir=str(tmp_path / "out" / "adapter"), **settings)

    def stop_at_step_7(event: dict[str, object]) -> None:
        if event["step"] == 7:
            raise KeyboardInterrupt  # as Ctrl-C; a SIGKILL leaves the same checkpoints (tests/test_resume_kill.py)

    with pytest.raises(KeyboardInterrupt):
        train_lora(dataset, config, on_log=stop_at_step_7)
    scratch = scratch_folder(Path(config.output_dir))
    assert scratch.parent == tmp_path / "out" and (scratch / "trainer" / "checkpoint-6").is_dir()

    resumed = train_lora(dataset, config)
    assert (resumed.resumed_from_step, resumed.steps) == (6, 12)
    assert not scratch.exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter"]
    whole = train_lora(dataset, LoraSFTConfig(output_dir=str(tmp_path / "whole" / "adapter"), **settings))
    assert whole.resumed_from_step is None
    assert resumed.losses == pytest.approx(whole.losses)  # the same training as one that was never stopped


def test_a_failed_training_removes_its_scratch_folder(tmp_path: Path, tiny_model: Path) -> None:
    from training.sft_config import LoraSFTConfig
    from training.sft_trainer import train_lora

    dataset = chat_dataset(tmp_path / "rows.jsonl")
    config = LoraSFTConfig(output_dir=str(tmp_path / "out" / "adapter"), base_model=str(tiny_model), max_steps=8,
                           save_steps=2, per_device_train_batch_size=2)  # fmt: skip

    def fail_at_step_5(event: dict[str, object]) -> None:
        if event["step"] == 5:
            raise RuntimeError("the disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        train_lora(dataset, config, on_log=fail_at_step_5)
    assert list((tmp_path / "out").iterdir()) == []  # checkpoints 2 and 4 were written, and removed


# ---- 12. train-student: --rows sizes both modes -----------------------------------------------------------------


def correct_run(tmp_path: Path, cot: int, corrections: int) -> Path:
    from runtime.data.records import CorrectIdentity, RunConfig
    from runtime.data.rundir import RunDir

    data = tmp_path / "correct"
    identity = CorrectIdentity(task="gsm8k", limit=None, samples=4, student="s", corrector="c")
    RunDir.create(data, RunConfig(identity=identity))
    chat_dataset(data / "cot.jsonl", cot)
    fix = [[{"role": "user", "content": f"fix {i}"}, {"role": "assistant", "content": f"Incorrect Step: {i}"}]
           for i in range(corrections)]  # fmt: skip
    rows = [{"messages": messages} for messages in fix]
    (data / "corrections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("corrections", [3, 0])
def test_train_student_cuts_either_mode_to_rows(tmp_path: Path, tiny_model: Path, corrections: int) -> None:
    from training.lema.ablation import training_set_texts
    from training.lema.commands import train_student

    data = correct_run(tmp_path, cot=8, corrections=corrections)
    modes = ["cot", "cot+corrections"] if corrections else ["cot"]
    for mode in modes:
        out = tmp_path / mode
        result = train_student(data, out, mode=mode, rows=3, max_steps=1, base_model=str(tiny_model))  # type: ignore[arg-type]
        metadata = json.loads((result.adapter_dir / "redpen_adapter.json").read_text())
        assert metadata["dataset"]["rows"] == 3, mode
        assert result.adapter_dir == out / "adapter" and sorted(p.name for p in out.iterdir()) == ["adapter", "data"]
    if corrections:  # the very rows of the ablation's CoT-only set
        ablation = training_set_texts(data, 3)["cot_only"]
        assert (tmp_path / "cot" / "data" / "cot_only.jsonl").read_text() == ablation


# ---- 13. a malformed dataset row is an error with file:line, the last line too ----------------------------------


def test_a_torn_last_dataset_row_is_an_error_not_dropped(tmp_path: Path) -> None:
    from training.lema.ablation import read_rows
    from training.sft_trainer import read_messages

    dataset = chat_dataset(tmp_path / "rows.jsonl", 3)
    with dataset.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "cut he')  # a row cut off mid-write
    with pytest.raises(DataError, match=f"{dataset}:4: not valid JSON"):
        read_messages(dataset)
    with pytest.raises(DataError, match=f"{dataset}:4: not valid JSON"):
        read_rows(dataset)
    dataset.write_bytes(dataset.read_bytes().rsplit(b"\n", 1)[0] + b'\n{"messages": "caf\xc3')  # a cut UTF-8 char
    with pytest.raises(DataError, match=f"{dataset}:4: not valid JSON"):
        read_messages(dataset)
    dataset.write_text(dataset.read_text(errors="replace").rsplit("\n", 1)[0] + "\n[1, 2]\n")
    with pytest.raises(DataError, match=f"{dataset}:4: expected a JSON object"):
        read_messages(dataset)

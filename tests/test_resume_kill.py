"""``redpen run`` killed with SIGKILL mid-gathering resumes to exactly what an uninterrupted run produces.

The real command line in a subprocess, on a tiny random model and bring-your-own JSONL data. The mistake memory
is the embedded Qdrant Edge folder with the packaged MiniLM embedder, as a user gets it.

Determinism: greedy decoding, in float32 (set through ``--config``). In bf16, which the local backend picks on CPUs
with native bf16, a row decoded in a batch can round differently from the same row alone, and real (``--no-cache``)
runs with ``--concurrency`` 1, 2 and 4 differed in 6-8 of 12 episodes; in float32 they were identical. So the
resumed run, whose batches are composed differently, must reproduce the uninterrupted one episode for episode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memory.store import MistakeMemory
from tests.helpers import build_tiny_model

pytestmark = pytest.mark.slow

SUBJECTS = ["apple", "river", "castle", "violin", "rocket", "garden", "pencil", "island", "candle", "bridge", "mirror"]
GATHER_ROWS = [
    {"input": f"Which word names a {s}?\nOptions:\n(A) {s}\n(B) stone\n(C) cloud", "target": "(A)"}
    for s in [*SUBJECTS, "falcon"]
]
EXAMINE_ROWS = [
    {"input": f"Which word names a {s}?\nOptions:\n(A) leaf\n(B) {s}\n(C) sand", "target": "B"}
    for s in ("tiger", "ocean", "lamp")
]
RUN_TIMEOUT_S = 600  # a whole run takes ~30 s on 2 busy cores; this only stops a hung process


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    files = {"gather": folder / "quiz.jsonl", "examine": folder / "quiz_exam.jsonl", "config": folder / "roles.toml"}
    for name, rows in (("gather", GATHER_ROWS), ("examine", EXAMINE_ROWS)):
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    # float32: see the module docstring. The assistant shares the student's backend.
    files["config"].write_text(f'[student]\nmodel = {json.dumps(str(tiny_model))}\ndtype = "float32"\n')
    return files


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]


def env(cwd: Path) -> dict[str, str]:
    # --no-cache below makes every run generate for real; REDPEN_CACHE keeps anything else out of the user's cache.
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100", "REDPEN_CACHE": str(cwd / "cache")}
    values.pop("REDPEN_LOG", None)
    return values


def run_command(data: dict[str, Path], folder: Path) -> list[str]:
    return cli(
        "run",
        "--config", data["config"],
        "--max-new-tokens", "8",
        "--gather-jsonl", data["gather"],
        "--examine-jsonl", data["examine"],
        "--answer-kind", "choice",
        "--concurrency", "2",
        "--no-cache",  # a resumed run must redo the lost work, not replay the first run's replies
        "--out", folder / "run",
        "--memory", folder / "memory",
    )  # fmt: skip


def finish(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env(cwd), cwd=cwd, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def complete_lines(path: Path) -> list[dict]:
    """The whole records of a JSONL file (a torn last line, if any, is not one)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1] if line.strip()]


def memory_count(folder: Path) -> int:
    with MistakeMemory(path=folder) as memory:  # the process has exited, so its folder lock is free
        return memory.count()


def memory_records(folder: Path) -> dict[str, tuple[str, str, str]]:
    with MistakeMemory(path=folder) as memory:
        return {r.id: (r.query, r.wrong_answer, r.guideline) for r in memory.list()}


def without_timing(episode: dict) -> dict:
    return {k: v for k, v in episode.items() if k != "time_s"}


def test_a_killed_run_resumes_to_what_an_uninterrupted_run_produces(tmp_path: Path, data: dict[str, Path]) -> None:
    # A: uninterrupted.
    a = tmp_path / "a"
    finish(run_command(data, a), tmp_path)
    episodes_a = complete_lines(a / "run" / "episodes.jsonl")

    # B: killed once gathering is under way, then the same command again.
    b = tmp_path / "b"
    command = run_command(data, b)
    with (tmp_path / "b.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(tmp_path), cwd=tmp_path)
    episodes_file = b / "run" / "episodes.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while len(complete_lines(episodes_file)) < 3:
            assert process.poll() is None, f"run B ended before it could be killed:\n{(tmp_path / 'b.log').read_text()}"
            assert time.monotonic() < deadline, "gathering never started"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    at_kill = complete_lines(episodes_file)
    assert 3 <= len(at_kill) < len(GATHER_ROWS), "the kill came too late to interrupt gathering"
    assert not (b / "run" / "figures.json").exists()

    finish(command, tmp_path)
    episodes_b = complete_lines(episodes_file)

    ids_b = [e["id"] for e in episodes_b]
    assert len(ids_b) == len(set(ids_b)) == len(GATHER_ROWS), "an episode was lost or written twice"
    assert sorted(ids_b) == sorted(e["id"] for e in episodes_a)
    assert {e["id"]: e for e in at_kill}.items() <= {e["id"]: e for e in episodes_b}.items()  # kept, not redone
    # Greedy and batch-invariant (see the module docstring): the same conversations, whatever was killed.
    by_id_a = {e["id"]: without_timing(e) for e in episodes_a}
    assert {e["id"]: without_timing(e) for e in episodes_b} == by_id_a
    assert memory_records(b / "memory") == memory_records(a / "memory")
    stored_a, stored_b = memory_count(a / "memory"), memory_count(b / "memory")
    wrong_first = sum(e["first_verdict"] != "correct" for e in episodes_a)
    assert stored_b == stored_a == wrong_first
    figures_a = json.loads((a / "run" / "figures.json").read_text())
    figures_b = json.loads((b / "run" / "figures.json").read_text())
    assert figures_b["gathering"]["episodes"] == figures_a["gathering"]["episodes"] == len(GATHER_ROWS)
    assert figures_b["mistakes_stored"] == figures_a["mistakes_stored"] == stored_a
    for name in ("exam_baseline.jsonl", "exam_assisted.jsonl", "exam_retrieval_only.jsonl"):
        assert len(complete_lines(b / "run" / name)) == len(EXAMINE_ROWS), name


def test_gathering_the_same_split_twice_keeps_one_record_per_mistake(tmp_path: Path, data: dict[str, Path]) -> None:
    def gather(out: str) -> list[dict]:
        # fmt: off
        command = cli(
            "gather",
            "--config", data["config"],
            "--max-new-tokens", "8",
            "--jsonl", data["gather"],
            "--limit", "4",
            "--concurrency", "2",
            "--no-cache",
            "--out", tmp_path / out,
            "--memory", tmp_path / "memory",
        )
        # fmt: on
        finish(command, tmp_path)
        return complete_lines(tmp_path / out / "episodes.jsonl")

    first = gather("first")
    stored = memory_count(tmp_path / "memory")
    assert len(first) == 4 and stored == sum(e["first_verdict"] != "correct" for e in first) > 0

    # The same command again: the run is done, nothing is gathered or stored twice.
    assert gather("first") == first
    assert memory_count(tmp_path / "memory") == stored

    # Another run directory over the same memory gathers the split again; record ids are deterministic.
    again = gather("second")
    assert sorted(e["id"] for e in again) == sorted(e["id"] for e in first)
    assert memory_count(tmp_path / "memory") == stored

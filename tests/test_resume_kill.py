"""``redpen run`` killed with SIGKILL mid-gathering resumes to exactly what an uninterrupted run produces.

The real command line in a subprocess, on a tiny random model and bring-your-own JSONL data. The mistake memory
is the embedded Qdrant Edge folder with the packaged MiniLM embedder, as a user gets it.

Counts, not texts, are compared between runs: the tiny model answers every question wrong whatever its batch
looked like, so one mistake per gathered question is the right count even though the local backend runs in
bf16 on this CPU, where a reply can change with the batch it was decoded in (see test_replies_are_batch_invariant).
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
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    files = {"gather": folder / "quiz.jsonl", "examine": folder / "quiz_exam.jsonl"}
    for name, rows in (("gather", GATHER_ROWS), ("examine", EXAMINE_ROWS)):
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-c", "from runtime.cli import main; main()", *map(str, args)]


def env() -> dict[str, str]:
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    values.pop("REDPEN_LOG", None)
    return values


def run_command(tiny_model: Path, data: dict[str, Path], folder: Path) -> list[str]:
    return cli(
        "run",
        "--model", tiny_model,
        "--max-new-tokens", "8",
        "--gather-jsonl", data["gather"],
        "--examine-jsonl", data["examine"],
        "--answer-kind", "choice",
        "--concurrency", "2",
        "--out", folder / "run",
        "--memory", folder / "memory",
    )  # fmt: skip


def finish(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=cwd, timeout=RUN_TIMEOUT_S)
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


def test_a_killed_run_resumes_to_the_counts_of_an_uninterrupted_one(
    tmp_path: Path, tiny_model: Path, data: dict[str, Path]
) -> None:
    # A: uninterrupted.
    a = tmp_path / "a"
    finish(run_command(tiny_model, data, a), tmp_path)
    episodes_a = complete_lines(a / "run" / "episodes.jsonl")

    # B: killed once gathering is under way, then the same command again.
    b = tmp_path / "b"
    command = run_command(tiny_model, data, b)
    with (tmp_path / "b.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
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
    stored_a, stored_b = memory_count(a / "memory"), memory_count(b / "memory")
    wrong_first = sum(e["first_verdict"] != "correct" for e in episodes_a)
    assert stored_b == stored_a == wrong_first
    figures_a = json.loads((a / "run" / "figures.json").read_text())
    figures_b = json.loads((b / "run" / "figures.json").read_text())
    assert figures_b["gathering"]["episodes"] == figures_a["gathering"]["episodes"] == len(GATHER_ROWS)
    assert figures_b["mistakes_stored"] == figures_a["mistakes_stored"] == stored_a
    for name in ("exam_baseline.jsonl", "exam_assisted.jsonl", "exam_retrieval_only.jsonl"):
        assert len(complete_lines(b / "run" / name)) == len(EXAMINE_ROWS), name


def test_gathering_the_same_split_twice_keeps_one_record_per_mistake(
    tmp_path: Path, tiny_model: Path, data: dict[str, Path]
) -> None:
    def gather(out: str) -> list[dict]:
        finish(
            cli(
                "gather",
                "--model", tiny_model,
                "--max-new-tokens", "8",
                "--jsonl", data["gather"],
                "--limit", "4",
                "--concurrency", "2",
                "--out", tmp_path / out,
                "--memory", tmp_path / "memory",
            ),  # fmt: skip
            tmp_path,
        )
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

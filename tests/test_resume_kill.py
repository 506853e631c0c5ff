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
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def complete_lines(path: Path) -> list[dict[str, Any]]:
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


def without_timing(episode: dict[str, Any]) -> dict[str, Any]:
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
    def gather(out: str) -> list[dict[str, Any]]:
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


# ---- 20 random SIGKILLs across `redpen run` (every phase) and `train-assistant`, each followed by a re-run ---------

KILL_TASK, KILL_GATHER, KILL_EXAMINE = "bbq/Age", 12, 4
TRAIN_STEPS = 40  # LoraSFTConfig.save_steps (5) apart: 8 checkpoints to be killed between
SAVE_STEPS = 5
RUN_KILLS, TRAIN_KILLS = 12, 8
POLL_S, JITTER_S = 0.01, 0.05
CHECKPOINT_EVENTS = range(2, 1 + TRAIN_STEPS // SAVE_STEPS)  # train_progress: replay written (1), checkpoint k at 1 + k
RESUMED = re.compile(r"resuming from checkpoint step (\d+)")
TRAINING = re.compile(r"training\.sft_trainer: train  \d+ rows")  # the log line a training starts with


def training_start(log: str) -> int | None:
    """The step a process's training started from: its checkpoint's, 0 from scratch, None if it trained nothing."""
    resumed = RESUMED.search(log)
    return int(resumed.group(1)) if resumed else 0 if TRAINING.search(log) else None


def line_count(path: Path) -> int:
    return len(complete_lines(path))


def run_progress(run: Path) -> int:
    """Events of `redpen run` so far: each baseline, episode and assisted line, then the retrieval-only file."""
    lines = sum(line_count(run / name) for name in ("exam_baseline.jsonl", "episodes.jsonl", "exam_assisted.jsonl"))
    return lines + (run / "exam_retrieval_only.jsonl").exists()


def train_progress(out: Path) -> int:
    """Events of `train-assistant` so far: the replay, each checkpoint, the adapter, each comparison line."""
    steps = [
        int(p.name.split("-")[-1]) for p in (out / "adapter.training" / "trainer").glob("checkpoint-*") if p.is_dir()
    ]
    adapter_done = (out / "adapter" / "redpen_adapter.json").exists()
    checkpoints = TRAIN_STEPS // SAVE_STEPS if adapter_done else max(steps, default=0) // SAVE_STEPS
    compared = sum(line_count(out / "compare" / f"exam_{name}.jsonl") for name in ("general", "trained"))
    return (out / "replay" / "sft.jsonl").exists() + checkpoints + adapter_done + compared


def kill_plan(rng: random.Random) -> dict[str, list[int]]:
    """Progress targets to SIGKILL at, sorted; 0 means during start-up (imports, model and memory loading).

    `redpen run`: start-up, the baseline exam, gathering, the assisted exam, and the report (after the
    retrieval-only control is written). `train-assistant`: start-up, between checkpoints, and the comparison.
    """
    e, g = KILL_EXAMINE, KILL_GATHER
    baseline, gathering, assisted = range(1, e), range(e + 1, e + g), range(e + g + 1, 2 * e + g)
    run = [0, *rng.sample(baseline, 2), *rng.sample(gathering, 5), *rng.sample(assisted, 2), 2 * e + g + 1]
    run.append(rng.choice([*baseline, *gathering, *assisted]))
    compare = range(TRAIN_STEPS // SAVE_STEPS + 3, TRAIN_STEPS // SAVE_STEPS + 2 + 2 * e)
    train = [0, *rng.sample(CHECKPOINT_EVENTS, 5), *rng.sample(compare, 2)]
    assert (len(run), len(train)) == (RUN_KILLS, TRAIN_KILLS)
    return {"run": sorted(run), "train": sorted(train)}


def kill_at(
    command: list[str], progress: Callable[[], int], target: int, rng: random.Random, cwd: Path, log: Path
) -> int | None:
    """Start ``command`` and SIGKILL it once progress reaches ``target`` (and moved since it started), after a
    jitter of up to ``jitter_s``, so some kills land mid-write; for target 0, 0.5-3 s after the start.

    Returns the progress at the kill, or None when the command finished first (the report phase can be that short).
    """
    at_start = progress()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(cwd), cwd=cwd)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        if target == 0:
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            while progress() < max(target, at_start + 1) and process.poll() is None:
                assert time.monotonic() < deadline, f"no progress to {target}"
                time.sleep(POLL_S)
            time.sleep(rng.uniform(0, JITTER_S))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    if process.returncode == 0:
        return None
    assert process.returncode == -signal.SIGKILL, f"failed before the kill at {target}:\n{log.read_text()[-3000:]}"
    return progress()


def lost_and_duplicated(ids: list[str], expected: set[str]) -> tuple[int, int]:
    return len(expected - set(ids)), len(ids) - len(set(ids))


def test_twenty_random_kills_lose_and_duplicate_nothing(
    tmp_path: Path, data: dict[str, Path], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.data.records import RunConfig
    from runtime.data.tasks import load_task
    from tests.helpers import make_episode, make_run_dir

    data_dir = data_dir.resolve()  # the commands run in tmp_path
    seed = int(os.environ.get("REDPEN_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    plan = kill_plan(rng)
    # Not "memory": the commands run as `python -c` in tmp_path, where a folder of that name would shadow the package.
    run, memory, trained = tmp_path / "run", tmp_path / "mistakes", tmp_path / "assistant"
    run_cmd = cli(
        "run",
        "--task", KILL_TASK,
        "--limit", str(KILL_EXAMINE),
        "--gather-limit", str(KILL_GATHER),
        "--k", "1",  # one retrieved BBQ mistake keeps the assisted prompt inside the tiny model's 2,048 tokens
        "--data-dir", data_dir,
        "--config", data["config"],
        "--max-new-tokens", "8",
        "--concurrency", "2",
        "--no-cache",  # a resumed run must redo the lost work, not replay the killed run's replies
        "--out", run,
        "--memory", memory,
    )  # fmt: skip
    reached: dict[str, list[int]] = {"run": [], "train": []}
    for i, target in enumerate(plan["run"]):
        at = kill_at(run_cmd, lambda: run_progress(run), target, rng, tmp_path, tmp_path / f"r{i}.log")
        if at is None:  # the run finished before the kill (its report phase is short): kill training once more
            missed = len(plan["run"]) - i
            plan["train"] = sorted([*plan["train"], *(rng.choice(CHECKPOINT_EVENTS) for _ in range(missed))])
            break
        reached["run"].append(at)
    finish(run_cmd, tmp_path)

    # A random model is never helped by feedback: a second gathering directory of the same student holds rewarded
    # episodes, so the replay has rows to train on; the comparison uses the run (its examine items and memory).
    student = RunConfig.read(run).identity.student  # type: ignore[union-attr]
    rewarded = make_run_dir(tmp_path / "rewarded", student, [make_episode(f"quiz/{i}", [(1, False)]) for i in range(6)])
    train_cmd = cli(
        "train-assistant",
        "--runs", run,
        "--runs", rewarded,
        "--out", trained,
        "--max-steps", str(TRAIN_STEPS),
        "--concurrency", "2",
        "--no-cache",
        "--data-dir", data_dir,
    )  # fmt: skip
    logs = []
    for i, target in enumerate(plan["train"]):
        logs.append(tmp_path / f"t{i}.log")
        at = kill_at(train_cmd, lambda: train_progress(trained), target, rng, tmp_path, logs[-1])
        assert at is not None, f"train-assistant finished before the kill at {target}"
        reached["train"].append(at)
    final = finish(train_cmd, tmp_path)
    starts = [training_start(text) for text in [*(log.read_text() for log in logs), final.stdout + final.stderr]]
    resumed = [step for step in starts if step is not None]

    # Count what was lost or written twice, against the items each file must hold exactly once.
    gather_ids = {e.id for e in load_task(KILL_TASK, "gather", data_dir, KILL_GATHER)}
    examine_ids = {e.id for e in load_task(KILL_TASK, "examine", data_dir, KILL_EXAMINE)}
    episodes = complete_lines(run / "episodes.jsonl")
    counts = {"episodes": lost_and_duplicated([e["id"] for e in episodes], gather_ids)}
    with MistakeMemory(path=memory) as store:
        records = store.list(limit=10_000)
    wanted = {(e["query"], e["gold"]) for e in episodes if e["first_verdict"] != "correct"}
    keys = [(r.query, r.gold) for r in records]
    counts["memory records"] = (len(wanted - set(keys)), len(keys) - len(set(keys)) + len(set(keys) - wanted))
    results = {f"run/{name}": run / name for name in ("exam_baseline.jsonl", "exam_assisted.jsonl")}
    results.update({f"compare/exam_{n}.jsonl": trained / "compare" / f"exam_{n}.jsonl" for n in ("general", "trained")})
    lines = [lost_and_duplicated([r["id"] for r in complete_lines(path)], examine_ids) for path in results.values()]
    retrieval = complete_lines(run / "exam_retrieval_only.jsonl")
    lines.append(lost_and_duplicated([r["id"] for r in retrieval], examine_ids))
    counts["result lines"] = (sum(lost for lost, _ in lines), sum(dup for _, dup in lines))
    kills = len(reached["run"]) + len(reached["train"])
    summary = (
        f"kill/resume seed {seed}: {kills} SIGKILLs, {len(reached['run'])} of `redpen run` at progress "
        f"{reached['run']} (of {2 * KILL_EXAMINE + KILL_GATHER + 1}), {len(reached['train'])} of `train-assistant` "
        f"at {reached['train']} (of {TRAIN_STEPS // SAVE_STEPS + 2 + 2 * KILL_EXAMINE}); "
        + "; ".join(f"{name} lost {lost} duplicated {dup}" for name, (lost, dup) in counts.items())
        + f"; each training (re)started at step {resumed} (0: from scratch, a killed checkpoint being incomplete)"
    )
    with capsys.disabled():
        print("\n" + summary)
    assert kills == RUN_KILLS + TRAIN_KILLS and all(c == (0, 0) for c in counts.values()), summary
    assert json.loads((run / "figures.json").read_text())["gathering"]["episodes"] == KILL_GATHER
    metadata = json.loads((trained / "adapter" / "redpen_adapter.json").read_text())
    # Losses at step 1 and every 5th (logging_steps), each once: a resumed run restores the log from its checkpoint.
    assert metadata["steps"] == TRAIN_STEPS and len(metadata["losses"]) == 1 + TRAIN_STEPS // 5
    assert resumed[0] == 0 and any(resumed[1:]), summary  # the first from scratch; killed ones resumed
    assert all(step % SAVE_STEPS == 0 and 0 <= step <= TRAIN_STEPS for step in resumed), summary
    # Everything under the folders given: no scratch left, nothing beside them.
    assert sorted(p.name for p in trained.iterdir()) == ["adapter", "compare", "replay"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

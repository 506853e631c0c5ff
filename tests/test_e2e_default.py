"""End to end on the real embedded default model (SmolLM2-135M-Instruct): ``redpen eval`` on six BBQ items.

The first use converts the packaged GGUF into the cache (~30 s, once per machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

N = 6
MAX_NEW_TOKENS = 48


def redpen_eval(out: Path, data_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``redpen eval --task bbq`` in a fresh process; return it and its ``--json`` summary."""
    args = ["eval", "--task", "bbq", "--split", "examine", "--limit", str(N), "--json", "--out", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-c", "from runtime.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def results_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("e2e") / "generate"
    _, summary = redpen_eval(out, data_dir, "--max-new-tokens", str(MAX_NEW_TOKENS))
    return out, summary


def test_eval_generate_on_the_default_model(generated: tuple[Path, dict[str, Any]]) -> None:
    out, summary = generated
    overall = summary["overall"]
    assert overall["n"] == N
    assert overall["correct"] + overall["wrong"] + overall["no_answer"] == N
    assert sum(f["n"] for f in summary["by_source"].values()) == N
    assert all(source.startswith("bbq/") for source in summary["by_source"])
    assert summary["modes"] == {"generate": N}
    assert 0 < overall["completion_tokens"] <= N * MAX_NEW_TOKENS

    records = results_of(out)
    assert len(records) == N and len({r["id"] for r in records}) == N
    for r in records:
        assert r["verdict"] in ("correct", "wrong", "no_answer")
        assert r["mode"] == "generate" and r["n_options"] == 3
        assert 0 < r["completion_tokens"] <= MAX_NEW_TOKENS
        assert r["finish_reason"] in ("stop", "length")
        if r["finish_reason"] == "length":
            assert r["completion_tokens"] == MAX_NEW_TOKENS
        assert (r["verdict"] == "correct") == (r["predicted"] == r["target"])

    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["model_id"] == "SmolLM2-135M-Instruct"
    assert json.loads((out / "metrics.json").read_text())["overall"] == overall
    report = (out / "report.md").read_text()
    assert report.startswith("# redpen eval: bbq (examine)")
    assert f"| **all** | {N} |" in report


def test_the_same_command_resumes(generated: tuple[Path, dict[str, Any]], data_dir: Path) -> None:
    out, first = generated
    before = (out / "results.jsonl").read_bytes()
    _, again = redpen_eval(out, data_dir, "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert (out / "results.jsonl").read_bytes() == before  # nothing answered twice
    assert again["overall"] == first["overall"]
    assert again["elapsed_s"] < 2  # nothing left to generate


def test_eval_loglik_on_the_default_model(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "loglik"
    _, summary = redpen_eval(out, data_dir, "--mc-mode", "loglik")
    assert summary["overall"]["n"] == N
    assert summary["overall"]["no_answer"] == 0
    assert summary["modes"] == {"loglik": N}
    for r in results_of(out):
        assert r["mode"] == "loglik"
        assert len(r["scores"]) == r["n_options"] == 3
        best = max(range(3), key=r["scores"].__getitem__)
        assert r["predicted"] == f"({'ABC'[best]})"


def test_run_the_whole_experiment_on_the_default_model(tmp_path: Path, data_dir: Path) -> None:
    """`redpen run` with the real model and the real MiniLM + embedded Qdrant: every phase, report and plot."""
    out = tmp_path / "run"
    args = [
        "run",
        "--task",
        "bbq",
        "--limit",
        "2",
        "--gather-limit",
        "3",
        "--max-new-tokens",
        "32",
        "--rounds",
        "1",
        "--no-cache",
        "--json",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-c", "from runtime.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["n_gather"], summary["n_examine"]) == (3, 2)
    assert set(summary["accuracy"]) == {"baseline", "assisted", "retrieval_only"}
    assert summary["gathering"]["episodes"] == 3
    assert summary["mistakes_stored"] == summary["gathering"]["first_answer_wrong"]
    for name in ("report.md", "accuracy.png", "episodes.jsonl", "exam_baseline.jsonl", "exam_assisted.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "retrieval-only" in (out / "report.md").read_text()

"""End to end with the real embedded teacher in its roles, at toy size: a few real calls through its llama.cpp
server in SALAM gathering (study assistant), LEMA correction (corrector) and ``lec`` (instructor); the student is
the 135M default. Each command starts and stops its own server: none may be left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime.models.teacher import TEACHER_NAME
from tests.test_teacher import require_teacher

pytestmark = pytest.mark.slow


def servers() -> int:
    found = subprocess.run(["pgrep", "-f", "llama-server"], capture_output=True, text=True)
    return len(found.stdout.split())


def redpen(data_dir: Path, *args: str, json_out: bool = True) -> dict[str, Any]:
    """Run a command in a fresh process with the teacher on; its ``--json`` figures."""
    require_teacher()
    before = servers()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_DATA_DIR": str(data_dir), "REDPEN_TEACHER": "on"}
    result = subprocess.run(
        [sys.executable, "-c", "from runtime.cli import main; main()", *args, *(["--json"] if json_out else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert servers() == before  # the command's teacher server is gone
    return json.loads(result.stdout.strip().splitlines()[-1]) if json_out else {}


def test_teacher_assists_gathering(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "gather"
    args = ["gather", "--task", "bbq", "--limit", "3", "--rounds", "1", "--out", str(out), "--memory", str(tmp_path)]
    redpen(data_dir, *args, json_out=False)  # gather prints no figures: read what it wrote
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 and {e["assistant_id"] for e in episodes} == {TEACHER_NAME}
    turns = [t for e in episodes for t in e["turns"]]
    assert all(t["action"]["guideline"] for t in turns)
    config = json.loads((out / "config.json").read_text())
    assert TEACHER_NAME in json.dumps(config)  # the run names its assistant's model


def test_teacher_corrects(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "correct"
    summary = redpen(data_dir, "correct", "--task", "gsm8k", "--limit", "2", "--samples", "2", "--out", str(out))
    assert TEACHER_NAME in json.dumps(json.loads((out / "config.json").read_text()))
    assert summary  # the figures of the correction run


def test_teacher_instructs_lec(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "instruct"
    args = ["instruct", "--target", "bbq/Age", "--strategy", "lec", "--select", "8", "--budget", "4"]
    summary = redpen(data_dir, *args, "--max-cases", "2", "--eval-limit", "4", "--ood", "", "--out", str(out))
    assert set(summary["accuracy"]["bbq/Age"]) == {"base", "iter1"}
    supply = json.loads((out / "iter1" / "supply.json").read_text())
    assert supply["cases"] >= 1 and supply["asked"] >= 1
    assert {"parsed", "answer_check_failed", "kept"} <= set(supply)
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["instructor"]["kind"] == "teacher"

"""End to end on the real embedded default model: ``redpen instruct`` at toy size, then the same command resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["instruct", "--target", "bbq/Age", "--strategy", "replay", "--baselines", "plain", "--select", "12"]
ARGS += ["--eval-limit", "6", "--ood", "bbq/SES", "--json"]


def redpen(out: Path, data_dir: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-c", "from runtime.cli import main; main()", *ARGS, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_instruct_on_the_default_model_reports_and_resumes(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "instruct"
    first, summary = redpen(out, data_dir)
    assert set(summary["accuracy"]) == {"bbq/Age", "bbq/SES"}
    assert set(summary["accuracy"]["bbq/Age"]) == {"base", "iter1", "plain1"}
    assert "Warning" not in first.stderr  # library warnings go to the log, not the terminal
    report = (out / "report.md").read_text()
    assert "iter1 vs base" in report and "plain1 vs iter1" in report and "McNemar p" in report
    assert "data:image/png;base64" in (out / "report.html").read_text()
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 12 and all({"base", "iter1", "plain1"} <= set(row) for row in ledger)
    supply = json.loads((out / "iter1" / "supply.json").read_text())
    assert supply["rows"] == json.loads((out / "plain1" / "supply.json").read_text())["rows"] > 0
    adapter = out / "iter1" / "adapter" / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    _, again = redpen(out, data_dir)  # everything is on disk: nothing is retrained, the figures are the same
    assert again["accuracy"] == summary["accuracy"]
    assert adapter.stat().st_mtime_ns == trained_at

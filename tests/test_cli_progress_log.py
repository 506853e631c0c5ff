"""Long phases leave progress lines in the log, not only on a drawn bar."""

from __future__ import annotations

import logging

import pytest
from rich.progress import Progress

from runtime.cli.common import phase_bar


def test_a_phase_logs_each_tenth_once_and_its_end(caplog: pytest.LogCaptureFixture) -> None:
    update = phase_bar(Progress(disable=True))
    with caplog.at_level(logging.INFO, logger="runtime.cli.common"):
        for done in range(0, 33):
            update("gathering", done, 32)
        update("gathering", 32, 32)  # a repeated report of the end is not logged again
        update("baseline", 1, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "gathering 4/32" and lines[-2:] == ["gathering 32/32", "baseline 1/1"]
    assert len([line for line in lines if line.startswith("gathering")]) == 10

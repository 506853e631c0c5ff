"""`redpen bench pipeline` against its own simulated server; `bench serve` and `bench starvation` against their own
`redpen serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_pipeline_against_a_simulated_server_keeps_every_item_in_flight(data_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-c", "from runtime.cli import main; main()"]
    args = ["bench", "pipeline", "--simulate-latency", "0.05", "--n", "6", "--json"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["simulated"]["items"] == 12
    assert figures["server"]["peak_in_flight"] == 6  # all six of a phase at once
    assert figures["server"]["requests"] >= figures["dependency_chain_calls"]
    # No client finishes before its longest chain of dependent calls: the share of that bound is at most 1.
    assert 0 < figures["share_of_bound"] <= 1.0
    printed = " ".join(result.stderr.split())  # the console wraps lines at its width
    assert "of the dependency bound" in printed
    # the client's own CPU per request, the floor no server latency hides
    client = figures["client"]
    assert client["requests"] == figures["server"]["requests"] and client["cpu_s"] >= client["loop_cpu_s"] > 0
    assert client["cpu_ms_per_request"] == pytest.approx(1000 * client["cpu_s"] / client["requests"], rel=0.01)
    assert "on the event loop" in printed


def test_bench_serve_times_the_first_streamed_token_and_a_load_of_users(tmp_path: Path) -> None:
    from tests.helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    command = [sys.executable, "-c", "from runtime.cli import main; main()", "bench", "serve", "--model", str(model)]
    args = ["--streams", "2", "--stream-tokens", "8", "--users", "2", "--seconds", "1", "--chat-tokens", "4", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert 0 < figures["first_token_s"] <= figures["whole_s"] and 0 < figures["first_token_ratio"] <= 1
    load = figures["load"]
    assert load["users"] == 2 and load["answered"] >= 2 and load["errors"] == {}
    assert 0 < load["p50_s"] <= load["p95_s"]
    printed = " ".join(result.stderr.split())  # the console wraps lines at its width
    assert "first token" in printed and "p95" in printed


def test_bench_starvation_times_a_small_request_beside_hogs_and_reads_the_server_s_memory(tmp_path: Path) -> None:
    from tests.helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    command = [sys.executable, "-c", "from runtime.cli import main; main()", "bench", "starvation"]
    args = ["--model", str(model), "--hogs", "1", "--hog-words", "50", "--hog-max-tokens", "4"]
    args += ["--small-max-tokens", "4", "--samples", "1", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    (phase,) = figures["phases"]
    assert phase["hogs"] == 1 and phase["p50_s"] > 0 and figures["alone_p50_s"] > 0
    assert phase["server_peak_rss_mb"] > 0  # read from the server's process, by its id
    printed = " ".join(result.stderr.split())  # the console wraps lines at its width
    assert "small request (4 tokens) alone" in printed and "beside 1 hogs" in printed


def test_prefill_rate_is_prompt_tokens_over_time_and_never_repeats_a_prompt() -> None:
    import asyncio

    from runtime.bench.speed import prefill_rate
    from runtime.models.backend import Generation, Usage

    class PromptBound:
        """A backend whose reply takes 1 ms per prompt word (a word is a token here)."""

        def __init__(self) -> None:
            self.prompts: list[str] = []

        async def generate(self, messages: list[dict[str, str]], settings: object) -> Generation:
            text = messages[0]["content"]
            self.prompts.append(text)
            await asyncio.sleep(len(text.split()) / 1000)
            return Generation("x", Usage(prompt_tokens=len(text.split()), completion_tokens=1))

    backend = PromptBound()
    result = asyncio.run(prefill_rate(backend, prompt_words=200, repeats=3))  # type: ignore[arg-type]
    assert 500 < result["prompt_tokens_per_s"] <= 1000  # ~1000 words/s, less the loop's overhead
    assert len(backend.prompts) == 4 and len(set(backend.prompts)) == 4  # a warm-up, then 3 distinct prompts
    assert len({p.split(".", 1)[1] for p in backend.prompts}) == 1  # the same length and words after the prefix

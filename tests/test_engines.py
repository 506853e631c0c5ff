"""Model folders on a served engine (``--engine vllm``), tested without vLLM: the same managed-server mechanism
pointed at redpen's own OpenAI-compatible server (``redpen serve``), started on each folder."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memory.embed import HashingEmbedder
from runtime.cli import app
from runtime.data.rundir import RunDir
from runtime.errors import ConfigError
from runtime.models import engines
from runtime.models.backend import GenerationSettings
from runtime.models.local import LocalBackend
from runtime.models.managed import ManagedServer, ServerCommand
from tests.helpers import build_tiny_model
from tests.test_instruct import item
from training.instruct.benchmarks import Target
from training.instruct.loop import InstructLoop, Plan
from training.instruct.run import ModelPool
from training.instruct.settings import InstructSettings

# `redpen serve` behind the key ManagedServer made for it: the key's hash goes into a fresh keys.json, then the
# server starts. (Written without braces: ManagedServer fills {port} and {api_key} into every argument.)
SERVE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from runtime.server.keys import key_hash
    state = Path(sys.argv[1])
    state.mkdir(parents=True, exist_ok=True)
    entry = dict(name="engine", tenant="engine", created="2026-01-01T00:00:00+00:00")
    (state / "keys.json").write_text(json.dumps(dict([(key_hash(os.environ["ENGINE_KEY"]), entry)])))
    sys.argv = ["redpen", "serve", "--state", str(state), *sys.argv[2:]]
    from runtime.cli import main
    main()
    """
)
GREEDY = GenerationSettings(max_new_tokens=8)
NO_VLLM = importlib.util.find_spec("vllm") is None


@dataclass
class Started:
    folders: list[Path] = field(default_factory=list)  # what each server was started on, in order
    pids: list[int] = field(default_factory=list)


@pytest.fixture
def redpen_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Started:
    """``--engine vllm`` served by `redpen serve` instead, with a record of the servers started."""
    started = Started()

    def command(folder: Path, name: str) -> ServerCommand:
        started.folders.append(folder)
        argv = [sys.executable, "-c", SERVE, str(tmp_path / f"state-{len(started.folders)}"), "--model", str(folder)]
        env = {"ENGINE_KEY": "{api_key}", "OMP_NUM_THREADS": "1", "REDPEN_CACHE": str(tmp_path / "cache")}
        return ServerCommand(f"redpen serve on {name}", [*argv, "--port", "{port}"], env, startup_timeout_s=240)

    class Recorded(ManagedServer):
        def start(self, on_wait: Any = None) -> ManagedServer:
            super().start(on_wait)
            assert self._process is not None
            started.pids.append(self._process.pid)
            return self

    monkeypatch.setattr(engines, "vllm_command", command)
    monkeypatch.setattr(engines, "ManagedServer", Recorded)
    return started


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]  # a zombie is gone, not yet reaped


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.mark.skipif(not NO_VLLM, reason="checks the message shown where vLLM is not installed")
def test_without_vllm_one_line_names_the_extra(tiny: Path) -> None:
    line = r"^--engine vllm needs vLLM, which is not installed: pip install 'redpen\[gpu\]'$"
    with pytest.raises(ConfigError, match=line):
        engines.served_model(tiny)
    commands = [["eval", "--task", "bbq", "--limit", "2"], ["instruct", "--target", "bbq"], ["run", "--task", "bbq"]]
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--engine", "vllm"])
        assert result.exit_code == 1 and "pip install 'redpen[gpu]'" in str(result.exception), command


def test_engine_goes_with_a_local_model_folder() -> None:
    from runtime.cli.common import student_kind

    assert student_kind("local", "openai") == "openai"
    with pytest.raises(ConfigError, match="unknown engine 'tgi': choose local or vllm"):
        student_kind("tgi", "local")


@pytest.mark.slow
async def test_a_served_folder_answers_as_the_local_backend_and_stops(tiny: Path, redpen_engine: Started) -> None:
    prompts = [[{"role": "user", "content": f"Who was late to meeting {i}? (A) or (B)"}] for i in range(6)]
    local = LocalBackend(tiny)
    expected = [(await local.generate(p, GREEDY)).text for p in prompts]
    await local.aclose()
    served = engines.served_model(tiny)
    server = served.server
    try:
        assert server.base_url.startswith("http://127.0.0.1:") and served.model_id == "tiny-llama"
        answers = [(await served.generate(p, GREEDY)).text for p in prompts]
    finally:
        await served.aclose()
    assert answers == expected  # greedy: the same replies as in this process
    assert redpen_engine.folders == [tiny]
    assert not alive(redpen_engine.pids[0])  # stopped with the backend: no process left behind


@pytest.mark.slow
async def test_the_instructor_loop_on_served_folders_agrees_with_the_local_backend(
    tiny: Path, tmp_path: Path, redpen_engine: Started
) -> None:
    def loop(name: str, engine: str) -> InstructLoop:
        pool = [item(i, "toy/a", f"({'ABC'[i % 3]})") for i in range(40)]
        plan = Plan([Target("toy", pool, [])], {"toy": [item(100 + i, "toy/a", "(B)") for i in range(6)]}, ["toy"])
        settings = InstructSettings(
            targets=["toy"], strategies=["replay"], baselines=["plain"], select=8, budget=6, eval_limit=6,
            max_new_tokens=8, concurrency=4,
        )  # fmt: skip
        run = RunDir(tmp_path / name, {"command": "instruct-test"})
        return InstructLoop(settings, plan, run, ModelPool(tiny, None, engine), None, HashingEmbedder(), tiny)

    local = await loop("local", "local").run_all()
    served_loop = loop("served", "vllm")
    try:
        served = await served_loop.run_all()
    finally:
        await served_loop.backends.aclose()  # type: ignore[attr-defined]
    # Each condition's folder got a server of its own: the base, iteration 1's merged model, the plain baseline's.
    assert [p.name.split("-")[0] for p in redpen_engine.folders] == ["tiny", "iter1", "plain1"]
    pairs = [
        (a.reply, b.reply)
        for condition in ("base", "iter1", "plain1")
        for a, b in zip(local.results[condition]["toy"], served.results[condition]["toy"], strict=True)
    ]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    print(f"greedy agreement, served vs local: {agreement:.3f} of {len(pairs)} answers")
    assert agreement == 1.0
    assert len(redpen_engine.pids) == 3 and not any(alive(pid) for pid in redpen_engine.pids)

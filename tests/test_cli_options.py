"""Issue 24: each setting is declared once, on its dataclass field, and the command line's options are generated from
it; a role's three options become one typed ``BackendConfig``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from runtime.cli import app
from runtime.cli.options import ASSISTANT, STUDENT, Settings, expand
from runtime.errors import ConfigError
from runtime.models.config import BackendConfig
from training.instruct.settings import InstructSettings
from training.sft_config import LoraSFTConfig


def commands() -> list[tuple[list[str], Any]]:
    found = []

    def walk(command: Any, path: list[str]) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_every_option_of_every_command_shows_its_help() -> None:
    walked = commands()
    assert len(walked) > 20  # the walk reached the subcommands
    for path, command in walked:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (path, result.output)
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"redpen {' '.join(path)} {param.opts[0]} has no help"
                assert param.opts[0] in result.stdout, (path, param.opts[0])


def option_defaults(path: list[str]) -> dict[str, Any]:
    command = dict((" ".join(p), c) for p, c in commands())[" ".join(path)]
    return {param.name: param.default for param in command.params if param.name is not None}


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return ",".join(value) if isinstance(value, list) else value
    return None if f.default is dataclasses.MISSING else f.default


def test_instruct_has_an_option_per_setting_with_the_setting_s_default() -> None:
    defaults = option_defaults(["instruct"])
    for f in dataclasses.fields(InstructSettings):
        assert defaults[f.name] == field_default(f), f.name
    assert defaults["base_model"] == LoraSFTConfig.base_model


@pytest.mark.parametrize("command", ["train-assistant", "train-student", "ablate-corrections"])
def test_lora_options_default_to_the_lora_config(command: str) -> None:
    assert option_defaults([command])["max_steps"] == LoraSFTConfig.max_steps


def test_settings_come_back_built_from_the_options() -> None:
    got: list[InstructSettings] = []

    @expand(settings=Settings(InstructSettings))
    def command(*, settings: InstructSettings) -> None:
        got.append(settings)

    probe = typer.Typer()
    probe.command()(command)
    result = CliRunner().invoke(probe, ["--target", "bbq, gsm8k", "--no-balance", "--select", "7"])
    assert result.exit_code == 0, result.output
    assert got == [InstructSettings(targets=["bbq", "gsm8k"], balance=False, select=7)]


def test_a_role_s_options_become_one_backend_config() -> None:
    got: list[tuple[BackendConfig, BackendConfig | None]] = []

    @expand(student=STUDENT, assistant=ASSISTANT)
    def command(*, student: BackendConfig, assistant: BackendConfig | None) -> None:
        got.append((student, assistant))

    probe = typer.Typer()
    probe.command()(command)
    assert CliRunner().invoke(probe, []).exit_code == 0
    assert got[-1] == (BackendConfig(), None)  # no assistant option: the command's default assistant
    args = ["--backend", "openai", "--model", "m", "--base-url", "http://x/v1", "--assistant-model", "teacher"]
    assert CliRunner().invoke(probe, args).exit_code == 0
    assert got[-1] == (BackendConfig(kind="openai", model="m", base_url="http://x/v1"), BackendConfig(kind="teacher"))
    result = CliRunner().invoke(probe, ["--assistant-backend", "llama"])
    assert isinstance(result.exception, ConfigError)
    assert (
        str(result.exception) == "unknown backend 'llama': choose --assistant-backend local | openai | teacher | vllm"
    )


def test_serve_has_an_option_per_limit_with_the_limit_s_default() -> None:
    from runtime.server import ServeLimits

    defaults = option_defaults(["serve"])
    for f in dataclasses.fields(ServeLimits):
        assert defaults[f.name] == f.default, f.name


@pytest.mark.parametrize(
    ("command", "settings"),
    [("run", ["rounds", "k", "threshold", "concurrency"]), ("gather", ["rounds", "concurrency"])],
)
def test_experiment_options_default_to_the_experiment_settings(command: str, settings: list[str]) -> None:
    from runtime.workflows.experiment_settings import ExperimentSettings

    defaults = option_defaults([command])
    fields = {f.name: f for f in dataclasses.fields(ExperimentSettings)}
    for name in settings:
        assert defaults[name] == fields[name].default, name


def test_the_command_line_starts_without_the_server_or_the_agents() -> None:
    """Options read from ServeLimits and ExperimentSettings, yet neither fastapi nor autogen is imported at start."""
    import subprocess
    import sys

    heavy = ["fastapi", "uvicorn", "autogen_agentchat", "autogen_core", "agents.team", "torch"]
    code = f"import sys, runtime.cli; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

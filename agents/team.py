"""Who plays each role: a backend (and adapter, and sampling settings) for the student and for the assistant.

``RolesConfig`` says it (from command-line values and an optional TOML file with ``[student]`` and ``[assistant]``
tables); ``build_roles`` loads the backends, one shared instance when both roles use the same settings.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autogen_agentchat.messages import BaseChatMessage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.defaults import ASSISTANT_MAX_NEW_TOKENS, MOST_NEW_TOKENS, STUDENT_MAX_NEW_TOKENS
from runtime.errors import ConfigError
from runtime.models.autogen_client import BackendChatCompletionClient
from runtime.models.backend import Backend, GenerationSettings
from runtime.models.config import BackendConfig
from runtime.models.factory import make_backend

STUDENT_SETTINGS = GenerationSettings(max_new_tokens=STUDENT_MAX_NEW_TOKENS)
ASSISTANT_SETTINGS = GenerationSettings(max_new_tokens=ASSISTANT_MAX_NEW_TOKENS)
ADAPTER_NAME = "assistant"  # the name a local assistant adapter is loaded under


@dataclass
class Roles:
    student: Backend
    assistant: Backend
    student_adapter: str | None = None
    assistant_adapter: str | None = None
    student_settings: GenerationSettings = field(default_factory=lambda: STUDENT_SETTINGS)
    assistant_settings: GenerationSettings = field(default_factory=lambda: ASSISTANT_SETTINGS)

    @property
    def student_id(self) -> str:
        """What mistakes are attributed to: the model, and its adapter if one is used."""
        return self.student.model_id + (f"+{self.student_adapter}" if self.student_adapter else "")

    @property
    def assistant_id(self) -> str:
        return self.assistant.model_id + (f"+{self.assistant_adapter}" if self.assistant_adapter else "")

    def student_client(self) -> BackendChatCompletionClient:
        return BackendChatCompletionClient(self.student, self.student_adapter, self.student_settings)

    def assistant_client(self) -> BackendChatCompletionClient:
        return BackendChatCompletionClient(self.assistant, self.assistant_adapter, self.assistant_settings)


class RolesConfig(BaseModel):
    """The backends of the two roles, the assistant's adapter, and the student's reply length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: BackendConfig = Field(default_factory=BackendConfig)
    assistant: BackendConfig | None = Field(None, description="None: the student's backend is the assistant too")
    assistant_adapter: str | None = Field(
        None, description="trained assistant: a LoRA folder (local backend) or the adapter name a server serves"
    )
    student_max_new_tokens: int = Field(
        STUDENT_MAX_NEW_TOKENS, ge=1, le=MOST_NEW_TOKENS, description="student reply length"
    )
    response_cache: bool = Field(True, description="replay greedy calls from the on-disk response cache")

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        *,
        student: BackendConfig | None = None,
        assistant: BackendConfig | None = None,
        default_assistant: Callable[[], BackendConfig | None] | None = None,
        **settings: Any,
    ) -> RolesConfig:
        """From command-line values (``None`` = not given), under a TOML file's ``[student]``/``[assistant]`` tables:
        a table's setting wins over the same setting given to a role's ``BackendConfig``.

        The assistant is the student's backend unless an assistant or an ``[assistant]`` table is given, or
        ``default_assistant`` (asked only then) returns the backend a teacher role defaults to.

        >>> RolesConfig.load(student=BackendConfig(kind="openai"), student_max_new_tokens=None).assistant is None
        True
        """
        tables = _read_tables(config_file) if config_file is not None else {}
        if assistant is None and "assistant" not in tables and default_assistant is not None:
            assistant = default_assistant()
        student_cfg = _role_config("student", student, tables.get("student", {}), config_file)
        assistant_cfg = None
        if assistant is not None or "assistant" in tables:
            assistant_cfg = _role_config("assistant", assistant, tables.get("assistant", {}), config_file)
        try:
            return cls(
                student=student_cfg, assistant=assistant_cfg, **{k: v for k, v in settings.items() if v is not None}
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"bad setting {'.'.join(map(str, first['loc']))!r}: {first['msg']}") from None


def build_roles(config: RolesConfig) -> Roles:
    """Load the backends; a local assistant adapter is loaded into the assistant's model under ``ADAPTER_NAME``."""
    student_cfg = config.student
    assistant_cfg = config.assistant or config.student
    adapter_name = None
    if config.assistant_adapter is not None:
        if assistant_cfg.kind == "local":
            folder = Path(config.assistant_adapter)
            if not (folder / "adapter_config.json").exists():
                raise ConfigError(f"--assistant-adapter: no LoRA adapter folder at {folder}")
            shared = assistant_cfg == student_cfg
            assistant_cfg = assistant_cfg.model_copy(
                update={"adapters": {**assistant_cfg.adapters, ADAPTER_NAME: str(folder)}}
            )
            student_cfg = assistant_cfg if shared else student_cfg  # one model, the adapter chosen per request
            adapter_name = ADAPTER_NAME
        else:
            adapter_name = config.assistant_adapter  # served by name, e.g. vLLM --lora-modules NAME=PATH
    student = make_backend(student_cfg, response_cache=config.response_cache)
    assistant = (
        student if assistant_cfg == student_cfg else make_backend(assistant_cfg, response_cache=config.response_cache)
    )
    settings = replace(STUDENT_SETTINGS, max_new_tokens=config.student_max_new_tokens)
    return Roles(student, assistant, assistant_adapter=adapter_name, student_settings=settings)


def _role_config(
    role: str, given: BackendConfig | None, table: dict[str, Any], config_file: Path | None
) -> BackendConfig:
    """A role's backend: the settings given to it under its config table; a bad value names the table and key."""
    try:
        return BackendConfig(**{**(given.model_dump(exclude_unset=True) if given else {}), **table})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = f"unknown setting; the settings are {', '.join(BackendConfig.model_fields)}"
        if first["loc"] and first["loc"][0] in table:
            raise ConfigError(f"{config_file}: [{role}] {key}: {reason}") from None
        raise ConfigError(f"bad {role} backend setting {key!r}: {reason}") from None


def _read_tables(config_file: Path) -> dict[str, dict[str, Any]]:
    """The ``[student]`` and ``[assistant]`` tables of a TOML config; anything else in it is an error."""
    try:
        tables = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_file}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config_file}: cannot read the config ({exc})") from None
    unknown = set(tables) - {"student", "assistant"}
    if unknown:
        raise ConfigError(f"{config_file}: unknown table(s) {sorted(unknown)}; expected [student] and [assistant]")
    for role, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{config_file}: [{role}] must be a table of backend settings (a [{role}] header with lines like "
                f'model = "..."), not {role} = {table!r}'
            )
    return tables


def usage_of(messages: list[BaseChatMessage]) -> dict[str, int]:
    """Tokens the models spent on a conversation."""
    prompt = sum(m.models_usage.prompt_tokens for m in messages if m.models_usage)
    completion = sum(m.models_usage.completion_tokens for m in messages if m.models_usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion}

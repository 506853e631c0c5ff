"""Backend settings: which model endpoint serves a role.

Pydantic models, so a wrong value fails at load with the setting's name. Settings serialise with ``to_dict``
into each run's config.json; API keys are read from the environment and never written.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.defaults import LOCAL_MAX_BATCH, MOST_IN_FLIGHT, SERVER_MAX_CONCURRENCY
from runtime.errors import ConfigError

# The one list of backend kinds: local (transformers in-process), openai (any OpenAI-compatible server), teacher
# (the embedded 1.5B teacher, served by a llama.cpp server redpen starts: runtime/models/teacher.py), vllm (a local
# model folder served by a vLLM server redpen starts: runtime/models/engines.py).
BackendKind = Literal["local", "openai", "teacher", "vllm"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)
TEACHER = "teacher"  # also a model name: `--assistant-model teacher` picks the teacher whatever the backend
McMode = Literal["generate", "loglik"]


class BackendConfig(BaseModel):
    """One model endpoint. Roles (student, assistant, corrector) may each have their own."""

    model_config = ConfigDict(extra="forbid")

    kind: BackendKind = Field(
        "local",
        description="local: transformers in-process; openai: any OpenAI-compatible server; teacher: the embedded "
        "1.5B teacher on a llama.cpp server redpen runs; vllm: the local model folder on a vLLM server redpen runs",
    )
    model: str | None = Field(
        None, description="local model folder, served model name, or `teacher` (the embedded teacher's backend)"
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server URL (else $OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable that holds the API key")
    tokenizer: str | None = Field(None, description="openai: local tokenizer folder, enables option scoring")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters by name -> folder (local)")
    device: str = "auto"
    dtype: str = Field("auto", description="auto: bf16 on a GPU that has it, else fp32 (faster on CPU, batch-exact)")
    # The upper bounds stop a slip, not real use: 1024 rows is vLLM's largest default batch; waiting 10 s for company
    # already costs more than any batch gains; 1 TiB of prefixes is past any machine's memory.
    max_batch_size: int = Field(LOCAL_MAX_BATCH, ge=1, le=1024, description="local: most rows decoded together")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="local: how long an idle backend waits for more requests"
    )
    prefix_cache_mb: int = Field(
        1024, ge=0, le=2**20, description="local: memory for reusable prompt prefixes; 0 = off"
    )
    max_concurrency: int = Field(
        SERVER_MAX_CONCURRENCY,
        ge=1,
        le=MOST_IN_FLIGHT,
        description="openai: most HTTP requests in flight (vLLM's default batch)",
    )

    @model_validator(mode="before")
    @classmethod
    def _teacher_word(cls, values: Any) -> Any:
        """``model = "teacher"`` means the teacher's backend, so one word selects it wherever a model is named."""
        if isinstance(values, dict) and values.get("model") == TEACHER:
            return {**values, "kind": TEACHER, "model": None}
        return values

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def updated(self, **changes: Any) -> BackendConfig:
        """This config with ``changes`` (None: unchanged), validated as it was (pydantic's ``model_copy`` is not)."""
        return backend_config(**{**self.model_dump(exclude_unset=True), **changes})


def backend_config(**values: Any) -> BackendConfig:
    """Build a BackendConfig from CLI values, turning validation errors into one readable line."""
    try:
        return BackendConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"bad backend setting {name!r}: {first['msg']}") from None

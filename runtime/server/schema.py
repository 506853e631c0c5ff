"""The typed requests of OpenAI's chat and completions APIs, as ``redpen serve`` takes them.

Every field of OpenAI's API is declared, so that none is silently dropped: a field redpen honours is used, one it
cannot honour is refused with a 400 naming it (``unsupported``) unless it holds the value that means "nothing
asked" (``n: 1``, ``presence_penalty: 0``, ``store: false``), and a field OpenAI does not have is refused by
``extra="forbid"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.models.backend import GenerationSettings
from runtime.server.errors import APIError
from runtime.server.limits import ServeLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # a participant's name: told apart when a role has several (see chat.render)
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers
    refusal: str | None = None  # assistant: a refusal it gave, as text
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None  # deprecated by OpenAI in favour of tool_calls


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # arguments are always held to the schema when a call is forced (tool_choice)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; no secrets to pad here


# Fields every request has, and the values of each that ask nothing redpen cannot give (besides null).
_COMMON_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "service_tier": ("auto", "default"),
}


class ChatRequest(_Strict):
    model: str
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None  # the end user, for the server's log
    safety_identifier: str | None = None  # OpenAI's newer name for ``user``
    # Declared so that they are refused by name rather than as unknown (see ``unsupported``).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(_Strict):
    model: str
    # A text, several texts, a token-id list, or several (lm-eval-harness sends token ids).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI allows 5, vLLM 20
    user: str | None = None
    best_of: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    service_tier: str | None = None


_CHAT_NEUTRAL = _COMMON_NEUTRAL | {
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "prompt_cache_key": (),
    "prompt_cache_retention": (),
    "functions": (),
    "function_call": (),
}
_COMPLETION_NEUTRAL = _COMMON_NEUTRAL | {"best_of": (1,), "suffix": ("",)}
_MESSAGE_FIELDS = ("audio", "function_call")

_WHY: dict[str, str] = {
    "functions": "use tools",
    "function_call": "use tools and tool_choice",
    "best_of": "use n",
}


def unsupported(request: ChatRequest | CompletionRequest) -> list[str]:
    """The fields a request sets to something redpen's server cannot do, each with what to do instead.

    >>> unsupported(CompletionRequest(model="m", prompt="x", presence_penalty=0.0, best_of=2))
    ['best_of (only 1; use n)']
    """
    neutral = _CHAT_NEUTRAL if isinstance(request, ChatRequest) else _COMPLETION_NEUTRAL
    problems = []
    for name, allowed in neutral.items():
        value = getattr(request, name)
        if value is not None and value not in allowed:
            wanted = f"only {' or '.join(repr(a) for a in allowed)}" if allowed else "not supported"
            hint = f"; {_WHY[name]}" if name in _WHY else ""
            problems.append(f"{name} ({wanted}{hint})")
    if isinstance(request, ChatRequest):
        for i, message in enumerate(request.messages):
            problems += [
                f"messages[{i}].{name} (not supported)"
                for name in _MESSAGE_FIELDS
                if getattr(message, name) is not None
            ]
    return problems


def choice_count(n: int | None) -> int:
    """Choices asked for (``n``): 1 to 16, a bound that keeps one request from filling the batch."""
    if n is not None and not 1 <= n <= 16:
        raise APIError(400, f"n must be between 1 and 16, got {n}")
    return n or 1


def nth(settings: GenerationSettings, i: int) -> GenerationSettings:
    """The settings of choice ``i`` of n: a seeded request's choices differ from one another, and repeat."""
    return settings if i == 0 or settings.seed is None else dataclasses.replace(settings, seed=settings.seed + i)


def sampling(
    request: ChatRequest | CompletionRequest, limits: ServeLimits, max_tokens: int | None
) -> GenerationSettings:
    """A request's sampling settings, checked against OpenAI's ranges and the server's reply cap."""
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {limits.max_tokens} (--max-tokens)")
    temperature, top_p, seed = request.temperature, request.top_p, request.seed
    if temperature is not None and not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {seed}")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > 4:
        raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}")
    return GenerationSettings(
        max_new_tokens=max_tokens or limits.default_max_tokens,
        temperature=1.0 if temperature is None else temperature,  # OpenAI's default
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        stop=tuple(stops),
    )

"""The one narrow model interface every role talks through.

Chat messages and generation settings go in; text and token usage come out. Implementations accept many calls at
once (``asyncio.gather``) and decide themselves how to serve them: the local backend decodes them together in one
continuous batch (rows join and leave between decode steps), the OpenAI backend keeps a bounded number of HTTP
requests in flight.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from runtime.defaults import CONCURRENCY
from runtime.errors import BackendError


class Message(TypedDict):
    """One chat message, as OpenAI-compatible servers and chat templates take it."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample. Greedy by default so that runs repeat exactly."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks only: always generate max_new_tokens, so rates compare like for like

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-prob under the model (None for a prompt's first) and the most likely alternatives."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Decoding:
    """What a served request may ask of a reply besides sampling (``Backend.complete``)."""

    logprobs: int | None = None  # None: no log-probs; k: each token's and its k most likely alternatives'
    json_schema: dict[str, Any] | None = None  # the reply is JSON that this schema accepts (constrained decoding)


@dataclass(frozen=True)
class Generation:
    """One reply: its text, what it cost, and why it ended."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"  # "stop" | "length"
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked (Decoding.logprobs)


# A raw prompt as token ids, or chat messages that the backend renders with the model's chat template.
Prompt = Sequence[Message] | Sequence[int]


class Backend(ABC):
    """A chat model that answers many requests at once.

    ``adapter`` names a LoRA adapter known to the backend (local: loaded through peft; OpenAI-compatible:
    sent as the ``model`` name, as vLLM's ``--lora-modules name=path`` expects). ``None`` is the base model.
    """

    kind: str  # "local" | "openai"
    model_id: str  # what results and mistake records are attributed to

    @abstractmethod
    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation: ...

    async def generate_many(
        self,
        conversations: Sequence[Sequence[Message]],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> list[Generation]:
        return list(await asyncio.gather(*(self.generate(m, settings, adapter) for m in conversations)))

    # What ``complete`` honours besides plain chat: "logprobs", "json_schema", "token_prompt" (a raw prompt, and
    # ``prompt_token_logprobs``), "stream" (text piece by piece). The server refuses, by name, what its backend lacks.
    features: frozenset[str] = frozenset()

    async def complete(
        self,
        prompt: Prompt,
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """A reply with what ``decoding`` asks; ``on_text`` is given the reply's text so far as it grows.

        The base class generates from chat messages and gives the whole text once: a backend that streams,
        constrains or keeps log-probs overrides it and lists what it can in ``features``.
        """
        if decoding != Decoding() or not prompt or isinstance(prompt[0], int):
            raise BackendError(f"the {self.kind} backend generates plain chat replies only")
        generation = await self.generate(prompt, settings, adapter)  # type: ignore[arg-type]
        if on_text is not None:
            on_text(generation.text)
        return generation

    @property
    def supports_option_scoring(self) -> bool:
        """Whether :meth:`score_options` works: it needs token log-probs of a given continuation."""
        return False

    @property
    def context_length(self) -> int | None:
        """Tokens the model attends to, prompt and reply together; None where the backend cannot tell."""
        return None

    @property
    def capacity(self) -> int:
        """Requests this backend serves at once: callers keep as many in flight (fewer leave it idle, more queue)."""
        return CONCURRENCY

    def prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """The prompt ``messages`` make, in the model's tokens (chat template included); None without a tokenizer."""
        return None

    async def score_options(
        self, messages: Sequence[Message], options: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        """Log-likelihood of each option as the assistant's reply, summed over its tokens.

        Multiple choice answered by the most likely option, as lm-eval-harness does, so a small model's
        format failures do not hide what it knows.
        """
        raise BackendError(f"the {self.kind} backend cannot score options; use --mc-mode generate")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release model memory, HTTP pools, worker tasks."""

    def cache_identity(self, adapter: str | None) -> dict[str, Any]:
        """Everything besides the request that can change a greedy reply: the response cache keys on it."""
        return {"kind": self.kind, "model_id": self.model_id, "adapter": adapter}

    def describe(self) -> dict[str, Any]:
        """What a run's config records about the backend (never an API key)."""
        return {"kind": self.kind, "model_id": self.model_id}


def overflow(backend: Backend, messages: Sequence[Message], reply_tokens: int) -> str | None:
    """Why ``messages`` and a reply of ``reply_tokens`` do not fit the model's context; None when they do.

    A backend that cannot count tokens (a server without a tokenizer here) is trusted to refuse such prompts itself.
    """
    context = backend.context_length
    if context is None:
        return None
    n = backend.prompt_tokens(messages)
    return None if n is None else too_long(n, reply_tokens, context, backend.model_id)


def too_long(prompt_tokens: int, reply_tokens: int, context: int, model_id: str) -> str | None:
    """The reason a prompt and its reply overflow a context, or None.

    >>> too_long(12062, 256, 8192, "m")
    "the prompt is 12,062 tokens, over the 7,936 that m's 8,192-token context leaves beside a 256-token reply"
    >>> too_long(100, 256, 8192, "m") is None
    True
    """
    if prompt_tokens + reply_tokens <= context:
        return None
    return (
        f"the prompt is {prompt_tokens:,} tokens, over the {max(context - reply_tokens, 0):,} that {model_id}'s "
        f"{context:,}-token context leaves beside a {reply_tokens}-token reply"
    )

"""A backend that talks to any OpenAI-compatible server: vLLM, OpenAI, or redpen's own ``redpen serve``.

LoRA adapters are chosen by model name (``model=adapter``), as ``vllm serve --lora-modules name=path`` expects.
Retries are done here rather than by the client, so that every retry is logged and the final error is one line
that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx2
import openai
from openai import AsyncOpenAI

from runtime.defaults import SERVER_MAX_CONCURRENCY
from runtime.errors import BackendError, ConfigError, RequestRefused
from runtime.models.backend import (
    Backend,
    Decoding,
    Generation,
    GenerationSettings,
    Message,
    Prompt,
    TokenLogprob,
    Usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai client's own default
DEFAULT_SETTINGS = GenerationSettings()  # frozen, so one shared default is safe
POOL_CONNECTIONS = 32  # connections per HTTP pool (see OpenAIBackend.__init__)
RETRY_STATUSES = frozenset({408, 409, 429})  # plus every 5xx: the server is busy or restarting, not refusing


class OpenAIBackend(Backend):
    """Chat completions over HTTP, at most ``max_concurrency`` requests in flight (default: as many as a vLLM
    replica schedules, ``runtime.defaults.SERVER_MAX_CONCURRENCY``), each over a kept connection.

    ``tokenizer`` is a local Hugging Face tokenizer folder of the served model. It is needed only to score
    options: the legacy completions endpoint takes a prompt string, so the chat must be rendered with the
    model's own chat template here.
    """

    kind = "openai"
    # Passed on to the upstream server, which honours them or answers why not (see ``complete``).
    features = frozenset({"logprobs", "json_schema", "stream"})
    # ``ignore_eos`` is no OpenAI field: vLLM and llama-server take it, another server may refuse the request.
    takes_ignore_eos = False

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = SERVER_MAX_CONCURRENCY,
        timeout_s: float = 120.0,  # a long chain of thought at a few tokens/s on a loaded server
        max_retries: int = 4,  # 0.5+1+2+4 s of backoff rides out a server restart
        tokenizer: str | None = None,
        backoff_s: float = 0.5,
    ) -> None:
        if not model:
            raise ConfigError("the openai backend needs a model name (--model)")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ConfigError("max_concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        self.model = model
        self.model_id = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.tokenizer_path = tokenizer
        # Local servers (vLLM, redpen serve) accept any key; "EMPTY" is vLLM's documented placeholder.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        # A kept connection per request in flight (the openai client's own pool keeps 100 alive, so past 100 in
        # flight the others would open a new connection for every request), split over pools of POOL_CONNECTIONS:
        # httpcore scans every connection of a pool on each request (probing the idle ones' sockets), so one pool
        # of 256 cost 2.7 ms of client CPU a request at 256 in flight and eight pools of 32 cost 1.8 ms.
        sizes = [POOL_CONNECTIONS] * (max_concurrency // POOL_CONNECTIONS)
        sizes += [max_concurrency % POOL_CONNECTIONS] if max_concurrency % POOL_CONNECTIONS else []
        self._clients = [
            AsyncOpenAI(
                base_url=self.base_url,
                api_key=key,
                timeout=timeout_s,
                max_retries=0,
                http_client=openai.DefaultAsyncHttpx2Client(
                    limits=httpx2.Limits(max_connections=size, max_keepalive_connections=size)
                ),
            )
            for size in sizes
        ]
        self._pool_sizes, self._pool_in_flight = sizes, [0] * len(sizes)
        self._limit, self._in_flight = max_concurrency, 0  # the limit drops if the server refuses (_lower_limit)
        self._free = asyncio.Condition()
        self._tokenizer: Any = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except OSError as error:
                reason = str(error).splitlines()[0]
                raise ConfigError(
                    f"cannot load a tokenizer from {tokenizer} ({reason}); "
                    "--tokenizer takes the served model's local Hugging Face folder"
                ) from error

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = DEFAULT_SETTINGS,
        adapter: str | None = None,
    ) -> Generation:
        return await self.complete(messages, settings, adapter)

    async def complete(
        self,
        prompt: Prompt,
        settings: GenerationSettings = DEFAULT_SETTINGS,
        adapter: str | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """A chat reply shaped by the upstream server: ``decoding.json_schema`` goes as its ``response_format``,
        ``decoding.logprobs`` as ``logprobs`` and ``top_logprobs``; with ``on_text`` the reply is streamed from
        the server and handed on, whole so far, each time it grows."""
        if not prompt or isinstance(prompt[0], int):
            raise BackendError("the openai backend takes chat messages, not token ids")
        messages: Sequence[Message] = prompt  # type: ignore[assignment]  # not ids, checked above
        model = adapter or self.model
        optional: dict[str, Any] = {}
        if settings.seed is not None:
            optional["seed"] = settings.seed
        if settings.stop:
            optional["stop"] = list(settings.stop)
        if settings.ignore_eos and self.takes_ignore_eos:  # benchmarks: always max_new_tokens
            optional["extra_body"] = {"ignore_eos": True}
        if decoding.json_schema is not None:
            # Not strict: OpenAI's strict mode refuses schemas outside its subset (a forced tool call's anyOf at the
            # root); vLLM, llama-server and redpen serve hold a reply to the schema either way.
            schema = {"name": "reply", "schema": decoding.json_schema, "strict": False}
            optional["response_format"] = {"type": "json_schema", "json_schema": schema}
        if decoding.logprobs is not None:
            optional["logprobs"] = True
            optional["top_logprobs"] = decoding.logprobs
        request: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            **optional,
        }
        if on_text is not None:
            return await self._call(lambda client: _streamed(client, request, on_text), model)
        response = await self._call(lambda client: client.chat.completions.create(**request), model)
        choice = response.choices[0]
        usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens) if response.usage else Usage()
        tokens = None
        if decoding.logprobs is not None:
            tokens = tuple(
                TokenLogprob(t.token, t.logprob, tuple((top.token, top.logprob) for top in t.top_logprobs))
                for t in (choice.logprobs.content if choice.logprobs and choice.logprobs.content else [])
            )
        return Generation(
            text=choice.message.content or "",
            usage=usage,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            logprobs=tokens,
        )

    @property
    def supports_option_scoring(self) -> bool:
        return self._tokenizer is not None

    @property
    def capacity(self) -> int:
        return self.max_concurrency

    async def score_options(
        self, messages: Sequence[Message], options: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        if self._tokenizer is None:
            raise BackendError(
                "the openai backend scores options only with the served model's tokenizer; "
                "pass --tokenizer PATH or use --mc-mode generate"
            )
        prompt: str = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        # The server tokenizes the prompt and adds BOS itself; a BOS rendered by the template would come twice.
        bos = self._tokenizer.bos_token
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        scored = await asyncio.gather(*(self.prompt_logprobs(prompt + option, adapter) for option in options))
        start = len(prompt)
        totals = []
        for option, tokens in zip(options, scored, strict=True):
            end = start + len(option)
            # A token counts when its span [offset, next offset) overlaps the option's characters, so a token
            # that merges the template's last character with the option's first still counts.
            next_offsets = [offset for _, _, offset in tokens[1:]] + [end]
            totals.append(
                sum(
                    logprob
                    for (_, logprob, offset), next_offset in zip(tokens, next_offsets, strict=True)
                    if logprob is not None and offset < end and next_offset > start
                )
            )
        return totals

    async def prompt_logprobs(self, prompt: str, adapter: str | None = None) -> list[tuple[str, float | None, int]]:
        """Each prompt token as (text, log-prob given the tokens before it, character offset in ``prompt``).

        The first token has no log-prob (``None``). The server's one generated token is dropped.
        """
        model = adapter or self.model
        response = await self._call(
            lambda client: client.completions.create(
                model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0.0
            ),
            model,
        )
        lp = response.choices[0].logprobs
        if lp is None or lp.tokens is None or lp.token_logprobs is None or lp.text_offset is None:
            raise BackendError(
                f"the server at {self.base_url} returned no prompt log-probs (echo + logprobs); "
                "it cannot score options, use --mc-mode generate"
            )
        return [
            (token, logprob, offset)
            for token, logprob, offset in zip(lp.tokens, lp.token_logprobs, lp.text_offset, strict=True)
            if offset < len(prompt)
        ]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()

    def cache_identity(self, adapter: str | None) -> dict[str, Any]:
        return {"kind": self.kind, "base_url": self.base_url, "model": adapter or self.model_id}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base_url": self.base_url,
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "tokenizer": self.tokenizer_path,
        }

    async def _call(self, request: Callable[[AsyncOpenAI], Awaitable[T]], model: str) -> T:
        """Run one request in a concurrency slot, retrying transient failures with jittered exponential backoff; a
        429 that says the server takes fewer at once lowers the limit instead (``_lower_limit``)."""
        attempt = 0
        while True:
            async with self._slot() as client:
                try:
                    return await request(client)
                except (openai.APIConnectionError, openai.APIStatusError) as error:
                    if isinstance(error, openai.RateLimitError) and self._in_flight > 1:
                        self._lower_limit(self._in_flight - 1)
                        continue  # wait for a slot again, under the new limit, without spending a retry
                    if not _transient(error) or attempt == self.max_retries:
                        raise await self._explain(error, model) from error
                    attempt += 1
                    # Jitter: callers that failed together must not all come back at the same moment.
                    delay = random.uniform(0.5, 1.0) * self.backoff_s * 2 ** (attempt - 1)
                    # INFO (the log file): a retry that works is no news, and one that fails ends in one error line.
                    log.info(
                        "%s from %s; retry %d/%d in %.2fs",
                        _short(error),
                        self.base_url,
                        attempt,
                        self.max_retries,
                        delay,
                    )
                    await asyncio.sleep(delay)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[AsyncOpenAI]:
        """One of the ``_limit`` places for a request in flight, on the pool with the most free connections (never
        a full one: the pools' connections add up to ``max_concurrency``, which ``_limit`` never exceeds)."""
        async with self._free:
            await self._free.wait_for(lambda: self._in_flight < self._limit)
            self._in_flight += 1
        pool = max(range(len(self._clients)), key=lambda i: self._pool_sizes[i] - self._pool_in_flight[i])
        self._pool_in_flight[pool] += 1
        try:
            yield self._clients[pool]
        finally:
            self._pool_in_flight[pool] -= 1
            async with self._free:
                self._in_flight -= 1
                self._free.notify()

    def _lower_limit(self, limit: int) -> None:
        """A 429 while others of our requests are in flight: the server takes fewer at once than we send (``redpen
        serve`` takes 32 per key). Keep to what it was holding; the limit never rises again in this backend."""
        if limit < self._limit:
            log.info("%s refused request %d in flight (429): at most %d from now on", self.base_url, limit + 1, limit)
            self._limit = limit

    async def _explain(self, error: openai.APIConnectionError | openai.APIStatusError, model: str) -> BackendError:
        """Turn a final client error into one line that says what to do next."""
        if isinstance(error, openai.APITimeoutError):
            return BackendError(
                f"the OpenAI-compatible server at {self.base_url} did not answer within {self.timeout_s:g}s "
                f"({self.max_retries} retries); it may be overloaded: lower --max-concurrency or raise the timeout"
            )
        if isinstance(error, openai.APIConnectionError):
            return BackendError(
                f"cannot reach the OpenAI-compatible server at {self.base_url}: {_short(error)}; "
                "start it or fix --base-url / OPENAI_BASE_URL"
            )
        if error.status_code == 401:
            return BackendError(f"the server at {self.base_url} rejected the API key (401); set OPENAI_API_KEY")
        if error.status_code == 404:
            served = await self._served_models()
            if served is None:
                return BackendError(
                    f"model '{model}' is not served at {self.base_url} ({_short(error)}); "
                    "check the model name and that the URL ends in /v1"
                )
            if model not in served:
                return BackendError(f"model '{model}' is not served at {self.base_url}; served: {', '.join(served)}")
        if error.status_code in (400, 422):
            return RequestRefused(f"the server at {self.base_url} answered {error.status_code}: {_short(error)}")
        return BackendError(f"the server at {self.base_url} answered {error.status_code}: {_short(error)}")

    async def _served_models(self) -> list[str] | None:
        try:
            page = await self._clients[0].models.list()
        except openai.OpenAIError:
            return None
        return [m.id for m in page.data]


async def _streamed(client: AsyncOpenAI, request: dict[str, Any], on_text: Callable[[str], None]) -> Generation:
    """A chat reply streamed from the server, ``on_text`` given the text so far as each piece arrives."""
    text, finish, usage = "", "stop", Usage()
    stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                on_text(text)
            if choice.finish_reason is not None:
                finish = "length" if choice.finish_reason == "length" else "stop"
    return Generation(text=text, usage=usage, finish_reason=finish)


def _transient(error: openai.APIConnectionError | openai.APIStatusError) -> bool:
    """Whether trying again may help: connection problems, timeouts, rate limits and server errors."""
    if isinstance(error, openai.APIConnectionError):
        return True
    return error.status_code in RETRY_STATUSES or error.status_code >= 500


def _short(error: openai.APIError) -> str:
    """The server's own error message (or the network cause), on one line."""
    if isinstance(error.body, dict) and error.body.get("message"):
        text = str(error.body["message"])
    elif isinstance(error, openai.APIConnectionError) and error.__cause__ is not None:
        text = f"{type(error.__cause__).__name__}: {error.__cause__}"
    else:
        text = error.message
    return " ".join(text.split())

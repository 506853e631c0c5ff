"""``POST /v1/completions``: raw-text continuation and prompt scoring (``echo=true`` with ``logprobs``, what
lm-eval-harness sends) over a backend that takes raw prompts; over one that can only score prompts (an upstream
server reached through the openai backend, :class:`PromptScorer`), prompt scoring alone."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from runtime.errors import RedpenError
from runtime.models.backend import Decoding, Generation, GenerationSettings, TokenLogprob
from runtime.server import responses
from runtime.server.errors import APIError
from runtime.server.keys import Authorized, Caller
from runtime.server.responses import TextChoice, TextCompletion
from runtime.server.schema import CompletionRequest, choice_count, nth, sampling
from runtime.server.state import PromptScorer, Served, Server

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(
    http: Request, request: CompletionRequest, server: Server, caller: Authorized
) -> TextCompletion | StreamingResponse:
    backend = server.backend
    adapter = server.adapter_for(request.model)
    if "token_prompt" not in backend.features and isinstance(backend, PromptScorer):
        return await _score_prompt(http, server, request, caller, adapter)
    asked = {"prompt": "token_prompt", "logprobs": "logprobs" if request.logprobs is not None else None}
    server.needs(request, {name: feature for name, feature in asked.items() if feature is not None})
    prompts = _prompts(request.prompt)
    if not prompts or not all(prompts):
        raise APIError(400, "prompt is empty")
    n = choice_count(request.n)
    if request.stream and (request.echo or request.logprobs is not None or n > 1 or len(prompts) > 1):
        raise APIError(400, "stream with echo, logprobs, n > 1 or several prompts is unsupported")
    # OpenAI's default of 16 tokens; 0 with echo scores the prompt alone.
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    if max_tokens == 0 and not request.echo:
        raise APIError(400, "max_tokens 0 asks for nothing: it is for echo=true (scoring the prompt)")
    settings = sampling(request, server.limits, max_tokens or 1)
    local: Any = backend  # the features checked above are the local backend's methods
    ids = [p if isinstance(p, list) else local.encode(p) for p in prompts]
    for p in ids:
        too_long = server.too_long_prompt(len(p), max_tokens)
        if too_long is not None:
            raise APIError(400, f"{too_long}; shorten the prompt", code="context_length_exceeded")
    decoding = Decoding(logprobs=request.logprobs)
    id = f"cmpl-{uuid.uuid4().hex}"
    if request.stream:
        return _stream(http, server, caller, id, request.model, ids[0], settings, adapter)

    async def one(prompt: list[int], i: int) -> tuple[TextChoice, int]:
        prompt_text = "".join(local.token_text(t) for t in prompt) if request.echo else ""
        tokens, generation = [], Generation("", finish_reason="length")
        if request.echo and request.logprobs is not None:
            tokens, greedy_next = await local.prompt_token_logprobs(prompt, request.logprobs, adapter)
            if max_tokens == 1 and settings.greedy and not settings.stop:
                generation = greedy_next  # the scoring forward gave it: no second pass over the prompt
        if max_tokens and not generation.logprobs:
            generation = await backend.complete(prompt, nth(settings, i), adapter, decoding)
        tokens += generation.logprobs or []
        logprobs = None
        if request.logprobs is not None:
            logprobs = responses.legacy_logprobs(tokens, 0 if request.echo else len(prompt_text))
        choice = TextChoice(
            text=prompt_text + generation.text, logprobs=logprobs, finish_reason=generation.finish_reason
        )
        return choice, generation.usage.completion_tokens

    with server.slot(caller):
        answered = await server.guarded(http, lambda _: asyncio.gather(*(one(p, j) for p in ids for j in range(n))))
    choices = [choice.model_copy(update={"index": i}) for i, (choice, _) in enumerate(answered)]
    usage = responses.usage(sum(len(p) for p in ids), sum(spent for _, spent in answered))
    return TextCompletion(id=id, model=request.model, choices=choices, usage=usage)


def _stream(
    http: Request,
    server: Served,
    caller: Caller,
    id: str,
    model: str,
    prompt: list[int],
    settings: GenerationSettings,
    adapter: str | None,
) -> StreamingResponse:
    server.take(caller)  # now: a 429 must come before the 200 of a stream; released once the stream is done
    created = int(time.time())

    def chunk(text: str, finish: str | None = None) -> str:
        choice = TextChoice(text=text, finish_reason=finish)
        return responses.event(TextCompletion(id=id, created=created, model=model, choices=[choice]))

    async def events() -> AsyncIterator[str]:
        with server.on_behalf_of(caller):  # entered and left in this generator's own context
            pieces: asyncio.Queue[str] = asyncio.Queue()
            sent = ""
            work = asyncio.ensure_future(
                server.guarded(
                    http,
                    lambda _: server.backend.complete(prompt, settings, adapter, Decoding(), pieces.put_nowait),
                )
            )
            async for piece in responses.grown_text(work, pieces):
                yield chunk(piece)
                sent += piece
            try:
                generation = work.result()
            except (APIError, RedpenError) as error:
                yield responses.event(responses.error_body(str(error), "server_error", None))
                return
            rest = generation.text[len(sent) :] if generation.text.startswith(sent) else ""
            yield chunk(rest, generation.finish_reason)
            yield responses.DONE

    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(server.release, caller)
    )


async def _score_prompt(
    http: Request, server: Served, request: CompletionRequest, caller: Caller, adapter: str | None
) -> TextCompletion:
    """Prompt scoring over a backend that scores prompts but cannot continue raw text (an upstream server
    reached through the openai backend): only the echoed prompt's tokens, with their log-probs."""
    backend = server.backend
    if not (request.echo and request.logprobs is not None) or not isinstance(request.prompt, str):
        raise APIError(
            400,
            f"the {backend.kind} backend answers /v1/completions only to score one text prompt (echo=true, "
            "logprobs=N); use /v1/chat/completions to generate",
        )
    server.needs(request, {})
    if not request.prompt:
        raise APIError(400, "the prompt is empty")
    scorer: Any = backend
    prompt = request.prompt
    with server.slot(caller):
        tokens = await server.guarded(http, lambda _: scorer.prompt_logprobs(prompt, adapter))
    logprobs = responses.legacy_logprobs([TokenLogprob(t, lp) for t, lp, _ in tokens], 0)
    logprobs.text_offset = [offset for _, _, offset in tokens]
    choice = TextChoice(text=prompt, logprobs=logprobs, finish_reason="length")
    return TextCompletion(
        id=f"cmpl-{uuid.uuid4().hex}", model=request.model, choices=[choice], usage=responses.usage(len(tokens), 0)
    )


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Each prompt of a completions request: a text, or a list of token ids."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [prompt]  # type: ignore[list-item]  # one text, or one list of ids
    return list(prompt)  # type: ignore[arg-type]  # several texts or several lists of ids

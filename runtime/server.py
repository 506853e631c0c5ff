"""redpen's own OpenAI-compatible server over any backend (``redpen serve``).

It lets other tools (an AutoGen app, lm-eval-harness, another redpen run through ``--backend openai``) use a local
model and its LoRA adapters the way they would use vLLM: an adapter is chosen by ``model=name``. Requests go
straight to ``backend.generate`` and run concurrently; the local backend batches them itself.

``/v1/completions`` serves only prompt scoring (``echo=true`` with ``logprobs``), the one use redpen has for it,
and only over a backend that can score prompts (:class:`PromptScorer`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from runtime.errors import RedpenError
from runtime.models.backend import Backend, Generation, GenerationSettings, Message

log = logging.getLogger(__name__)


@runtime_checkable
class PromptScorer(Protocol):
    """A backend that can give the log-prob of every token of a prompt (what option scoring needs)."""

    async def prompt_logprobs(self, prompt: str, adapter: str | None = None) -> list[tuple[str, float | None, int]]:
        """Each token as (text, log-prob given the tokens before it or None for the first, character offset)."""
        ...


class ChatMessageIn(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = None


class APIError(Exception):
    """An error answered with OpenAI's body shape, so OpenAI clients raise their usual exception types."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


def build_app(backend: Backend, adapters: Sequence[str] = ()) -> FastAPI:
    """An app serving ``backend.model_id`` (the base model) and each adapter name as a model."""
    app = FastAPI(title="redpen", summary=f"OpenAI-compatible server for {backend.model_id}")
    served = [backend.model_id, *adapters]
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error.status, error.message, error.type, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error_response(400, problems, "invalid_request_error", None)

    @app.exception_handler(RedpenError)
    async def backend_failed(_: Request, error: RedpenError) -> JSONResponse:
        log.error("request failed: %s", error)
        return _error_response(500, str(error), "server_error", None)

    def adapter_for(model: str) -> str | None:
        if model == backend.model_id:
            return None
        if model in adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist; served: {', '.join(served)}", code="model_not_found")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "redpen"} for name in served],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> dict[str, Any]:
        adapter = adapter_for(request.model)
        if request.stream or request.n != 1:
            raise APIError(400, "redpen's server answers with one non-streamed choice (stream=false, n=1)")
        messages = [Message(role=m.role, content=_text(m.content)) for m in request.messages]
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        defaults = GenerationSettings()
        settings = GenerationSettings(
            max_new_tokens=request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=tuple(stop),
        )
        generation = await backend.generate(messages, settings, adapter)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": generation.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(generation),
        }

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> dict[str, Any]:
        adapter = adapter_for(request.model)
        if not (request.echo and request.logprobs is not None):
            raise APIError(
                400,
                "redpen's server answers /v1/completions only to score a prompt (echo=true, logprobs=N); "
                "use /v1/chat/completions to generate",
            )
        if not isinstance(backend, PromptScorer):
            raise APIError(400, f"the {backend.kind} backend cannot score prompts; use /v1/chat/completions")
        tokens = await backend.prompt_logprobs(request.prompt, adapter)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    # Only the echoed prompt: the backend interface cannot continue raw text, and scoring
                    # clients read the prompt's tokens only.
                    "text": request.prompt,
                    "logprobs": {
                        "tokens": [token for token, _, _ in tokens],
                        "token_logprobs": [logprob for _, logprob, _ in tokens],
                        "text_offset": [offset for _, _, offset in tokens],
                        "top_logprobs": None,
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
        }

    return app


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 8000, adapters: Sequence[str] = ()) -> None:
    """Serve until interrupted (Ctrl-C), then release the backend."""
    # No access log: a gathering run sends thousands of requests and the log would drown everything else.
    server = uvicorn.Server(uvicorn.Config(build_app(backend, adapters), host=host, port=port, access_log=False))

    async def run() -> None:
        log.info("serving %s at http://%s:%d/v1", ", ".join([backend.model_id, *adapters]), host, port)
        try:
            await server.serve()
        finally:
            await backend.aclose()

    asyncio.run(run())


def _text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text; OpenAI clients may send it as a list of typed parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" for part in content):
        raise APIError(400, "redpen's server takes text message parts only")
    return "".join(str(part.get("text", "")) for part in content)


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.usage.prompt_tokens, generation.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_response(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "code": code}})

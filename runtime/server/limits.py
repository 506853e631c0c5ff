"""What one request may ask of a server, and how long the server waits for it: every limit with why it is so."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from runtime.errors import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """The limits of ``redpen serve``; each has a command-line option of the same name."""

    # 256 KiB: ~60k tokens of English, several times the default model's 8,192-token context, so every prompt that
    # could fit is accepted, and a 1 MB body is refused before it is parsed, tokenised or held.
    max_body_bytes: int = 256 * 2**10
    # 1024 tokens: a long answer; the default model decodes ~29 tokens/s alone on 2 CPU cores, so one reply holds a
    # batch slot for at most ~35 s there.
    max_tokens: int = 1024
    # 256: a request that gives no max_tokens gets GenerationSettings' default reply length.
    default_max_tokens: int = 256
    # 8: a quarter of the local backend's 32 rows (LOCAL_MAX_BATCH), so one key never fills the batch and four keys
    # at their limit still fill it; redpen's own OpenAI backend lowers its concurrency when a 429 says so.
    in_flight_per_key: int = 8
    # 120 s: what redpen's own OpenAI client waits (OpenAIBackend's timeout) before it gives up on a request.
    request_timeout_s: float = 120.0
    # 3 s: on SIGTERM, requests in flight get this long to finish before they are cancelled, so a process manager's
    # stop (10 s in Docker and systemd's default is 90 s) never has to kill the server.
    shutdown_grace_s: int = 3
    # 1024 tokens: room kept in the student's context, in memory mode, for what the assistant adds before the
    # question (3 retrieved mistakes, their questions clipped to 400 characters, reasons and guidelines, and the
    # new guideline: ~600-900 tokens on the default model's tokenizer).
    guidance_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "default_max_tokens", "in_flight_per_key"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"--default-max-tokens {self.default_max_tokens} is over --max-tokens {self.max_tokens}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.guidance_tokens < 0:
            raise ConfigError(f"--guidance-tokens must be >= 0, got {self.guidance_tokens}")


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413, by its Content-Length when it has one
    and by counting as it arrives when it has not (chunked uploads), before any of it is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _send_413(send, self.max_bytes)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body through as it is.
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)


def _too_large(max_bytes: int) -> str:
    return f"the request body is over {max_bytes:,} bytes (--max-body-bytes); send a shorter prompt"


async def _send_413(send: Any, max_bytes: int) -> None:
    body = json.dumps(
        {"error": {"message": _too_large(max_bytes), "type": "invalid_request_error", "code": "request_too_large"}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})

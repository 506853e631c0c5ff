"""The request body limit of ``redpen serve`` (``ServeLimits.max_body_bytes``), enforced before a body is parsed."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException


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

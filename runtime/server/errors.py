"""The server's one error type: answered in OpenAI's body shape, so OpenAI clients raise their usual exceptions."""

from __future__ import annotations


class APIError(Exception):
    """An error answered with OpenAI's body shape, so OpenAI clients raise their usual exception types."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code

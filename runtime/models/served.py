"""A backend whose server redpen runs itself: the OpenAI backend pointed at a ``ManagedServer``.

The server lives as long as the backend: started when the backend is made, stopped by ``aclose`` (or at exit).
A request that fails because the server died says so in one line, with the server's last log line.
"""

from __future__ import annotations

from typing import Any

import openai

from runtime.errors import BackendError
from runtime.models.managed import ManagedServer
from runtime.models.openai_backend import OpenAIBackend


class ServedBackend(OpenAIBackend):
    """Chat completions from a server this backend started; ``identity`` is what its replies depend on (the
    model file's checksum, not the random port), so the response cache survives a restart."""

    takes_ignore_eos = True  # llama-server and vLLM, the servers redpen runs, both take it

    def __init__(self, kind: str, server: ManagedServer, model: str, identity: dict[str, Any], capacity: int) -> None:
        # 600 s: a laptop server is slow but alone; a retry would only queue the same work again behind itself.
        super().__init__(
            model, base_url=server.base_url, api_key=server.api_key, max_concurrency=capacity, timeout_s=600.0
        )
        self.kind = kind
        self.server = server
        self.identity = identity

    async def aclose(self) -> None:
        await super().aclose()
        self.server.stop()

    def cache_identity(self, adapter: str | None) -> dict[str, Any]:
        return {"kind": self.kind, **self.identity, "adapter": adapter}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": "(managed, loopback)", **self.identity}

    async def _explain(self, error: openai.APIConnectionError | openai.APIStatusError, model: str) -> BackendError:
        try:
            self.server.check()
        except BackendError as dead:
            return dead
        return await super()._explain(error, model)

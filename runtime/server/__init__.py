"""redpen's OpenAI-compatible server (``redpen serve``): plain over any backend, or memory-guided (SALAM).

- :mod:`runtime.server.app`: the app (its routers wired to the shared state and error handlers) and ``serve``.
- :mod:`runtime.server.routes`: one router per API: chat, completions, feedback, models.
- :mod:`runtime.server.state`: what the routes share (the backend, limits, in-flight places) as a dependency.
- :mod:`runtime.server.schema`: the typed requests of OpenAI's chat and completions APIs.
- :mod:`runtime.server.chat`: chat messages and tools in, tool calls out.
- :mod:`runtime.server.responses`: OpenAI's response bodies and stream chunks, typed.
- :mod:`runtime.server.keys`: API keys (hashes only), the tenant each belongs to, and the caller of a request.
- :mod:`runtime.server.transcripts`: served completions and their feedback, durable (SQLite).
- :mod:`runtime.server.limits`: what one request may ask for, and for how long.
- :mod:`runtime.server.body_limit`: the request body limit, enforced before a body is parsed.

Heavy libraries (fastapi, uvicorn, the models) are imported only when a name that needs them is first used: the
command line reads ``ServeLimits``' fields for ``redpen serve``'s options at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.server.limits import ServeLimits

if TYPE_CHECKING:
    from runtime.server.app import Guided, PromptScorer, build_app, serve
    from runtime.server.errors import APIError
    from runtime.server.keys import KeyRing
    from runtime.server.transcripts import Ledger

# The module each lazily imported name lives in.
_HOMES = {
    **{name: "runtime.server.app" for name in ("Guided", "PromptScorer", "build_app", "serve")},
    "APIError": "runtime.server.errors",
    "KeyRing": "runtime.server.keys",
    "Ledger": "runtime.server.transcripts",
}

__all__ = ["APIError", "Guided", "KeyRing", "Ledger", "PromptScorer", "ServeLimits", "build_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'runtime.server' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)

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
"""

from runtime.server.app import Guided, PromptScorer, build_app, serve
from runtime.server.errors import APIError
from runtime.server.keys import KeyRing
from runtime.server.limits import ServeLimits
from runtime.server.transcripts import Ledger

__all__ = ["APIError", "Guided", "KeyRing", "Ledger", "PromptScorer", "ServeLimits", "build_app", "serve"]

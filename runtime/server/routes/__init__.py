"""The server's routes, one router per API: chat, completions, feedback, models (``build_app`` includes them)."""

from runtime.server.routes import chat, completions, feedback, models

__all__ = ["chat", "completions", "feedback", "models"]

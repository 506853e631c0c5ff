"""One exception family for redpen; every message says what to do next.

The CLI prints a ``RedpenError`` as one line and exits 2, as it does a file-system error on a path (an ``--out``
that is a file or cannot be written); anything else is a bug and keeps its traceback.
"""


class RedpenError(Exception):
    """Base of every error redpen raises on purpose."""


class ConfigError(RedpenError):
    """A setting is missing or wrong; the message names the setting."""


class DataError(RedpenError):
    """An input file is missing or malformed; the message names the file (and line)."""


class BackendError(RedpenError):
    """A model backend failed: unreachable server, unknown model, bad adapter."""


class MemoryStoreError(RedpenError):
    """The mistake memory cannot be opened or written (locked, wrong dimension, server down)."""


class ContextLengthError(BackendError):
    """A prompt and its reply do not fit the model's context; the message gives both lengths."""


class Overloaded(BackendError):
    """A request the backend cannot answer by its deadline, refused before any work; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRefused(BackendError):
    """An upstream server refused a request as it was asked (400 or 422): what was asked, not the server, is at
    fault; the message is the server's own."""

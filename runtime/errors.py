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

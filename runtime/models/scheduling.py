"""Whom a model request is for and by when it is due: the server sets both, the local backend's scheduler reads them.

Context variables rather than arguments: they travel through every layer between the server and the backend
(AutoGen teams, the memory-guided examination) without each passing them on, and a backend that does not schedule
ignores them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# The caller a request is counted against (a key's hash in ``redpen serve``); "" for redpen's own runs.
owner: ContextVar[str] = ContextVar("redpen_owner", default="")
# The ``time.monotonic()`` by which the answer is due; None: no deadline.
deadline: ContextVar[float | None] = ContextVar("redpen_deadline", default=None)


@contextlib.contextmanager
def on_behalf_of(owner_id: str, due: float | None) -> Iterator[None]:
    """Model requests made in the block (and in the tasks it starts) are ``owner_id``'s, due by ``due``."""
    owner_token, deadline_token = owner.set(owner_id), deadline.set(due)
    try:
        yield
    finally:
        owner.reset(owner_token)
        deadline.reset(deadline_token)

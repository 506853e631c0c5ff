"""What one request may ask of a server, and how long the server waits for it: every limit with why it is so.

Light on purpose (no web framework): the command line reads ``ServeLimits``' fields for ``redpen serve``'s options
at every start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from runtime.bounds import check_bounds, within
from runtime.errors import ConfigError

# Limits with a floor and no ceiling: how large a server's limits may be is its operator's choice.
AT_LEAST_1 = within(1, math.inf)


@dataclass(frozen=True)
class ServeLimits:
    """The limits of ``redpen serve``; each field is its command-line option of the same name."""

    # 256 KiB: ~60k tokens of English, several times the default model's 8,192-token context, so every prompt that
    # could fit is accepted, and a 1 MB body is refused before it is parsed, tokenised or held.
    max_body_bytes: int = field(default=256 * 2**10, metadata={"help": "largest request body", **AT_LEAST_1})
    # 1024 tokens: a long answer; the default model decodes ~29 tokens/s alone on 2 CPU cores, so one reply holds a
    # batch slot for at most ~35 s there.
    max_tokens: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for", **AT_LEAST_1})
    # 256: a request that gives no max_tokens gets GenerationSettings' default reply length.
    default_max_tokens: int = field(
        default=256, metadata={"help": "reply budget of a request without max_tokens", **AT_LEAST_1}
    )
    # 8: a quarter of the local backend's 32 rows (LOCAL_MAX_BATCH), so one key never fills the batch and four keys
    # at their limit still fill it; redpen's own OpenAI backend lowers its concurrency when a 429 says so.
    in_flight_per_key: int = field(
        default=8, metadata={"help": "requests one key may have in flight (more: 429)", **AT_LEAST_1}
    )
    # 120 s: what redpen's own OpenAI client waits (OpenAIBackend's timeout) before it gives up on a request.
    request_timeout_s: float = field(
        default=120.0,
        metadata={
            "help": "seconds a request may take: one that cannot finish in time is refused (429)",
            **within(0, math.inf, open_low=True),
        },
    )
    # 3 s: on SIGTERM, requests in flight get this long to finish before they are cancelled, so a process manager's
    # stop (10 s in Docker and systemd's default is 90 s) never has to kill the server.
    shutdown_grace_s: int = field(
        default=3, metadata={"help": "seconds requests in flight get on SIGTERM", **within(0, math.inf, open_low=True)}
    )
    # 1024 tokens: room kept in the student's context, in memory mode, for what the assistant adds before the
    # question (3 retrieved mistakes, their questions clipped to 400 characters, reasons and guidelines, and the
    # new guideline: ~600-900 tokens on the default model's tokenizer).
    guidance_tokens: int = field(
        default=1024,
        metadata={"help": "--memory: context tokens kept for the guidance before the question", **within(0, math.inf)},
    )

    def __post_init__(self) -> None:
        check_bounds(self, options=True)
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"--default-max-tokens {self.default_max_tokens} is over --max-tokens {self.max_tokens}")

"""Fair shares of the local model across its callers: how much of which prompt each forward computes.

Work is counted in *units*: one unit is the weights' share of one prompt token. A token ``depth`` tokens into its
sequence also attends to those, ``depth / attention_tokens`` units more, so that a 7,000-word prompt costs what it
really does (its attention alone is as much again as its weights on the default model). Every caller (an API key)
is charged the units done for it: its prompts' tokens, its rows' decode steps and a share of each forward's fixed
cost (reading the weights). A caller may run at most ``QUANTUM`` units ahead of the least-served other caller, so
while one key's rows decode, another key's long prompt is computed a slice a forward and each forward stays short:
start-time fair queuing, with the forward as the quantum of time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# A forward's fixed cost in units: on 2 CPU cores the default model decodes one row in ~35 ms and prefills ~900
# tokens/s (~1.1 ms a token), so reading the weights once costs about 32 prompt tokens.
BASE_UNITS = 32.0
# Units a caller may be ahead of the least-served other: a short prompt (a question in a chat template, ~60-120
# tokens) is computed whole the forward after it arrives.
QUANTUM = 128.0
# Smaller slices of a long prompt are not worth a forward's fixed cost.
MIN_CHUNK = 16
# How fast the seconds-per-unit estimate follows the latest forwards.
SPEED_WEIGHT = 0.2


def attention_tokens(model: Any) -> float:
    """The depth at which a token's attention costs as much as its weights: weights' multiply-adds per token over
    attention's per earlier token (a query and a value product per head and dimension)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embeddings = sum(p.numel() for p in model.get_input_embeddings().parameters())
    weights = sum(p.numel() for p in model.parameters()) - embeddings
    return float(weights / (2 * config.num_hidden_layers * config.num_attention_heads * head_dim))


def cost(start: int, tokens: int, attention: float) -> float:
    """Units of computing ``tokens`` prompt tokens after ``start`` computed ones.

    >>> cost(0, 100, 1000.0)
    105.0
    """
    return tokens * (1 + (start + tokens / 2) / attention)


def tokens_for(start: int, units: float, attention: float) -> int:
    """The most prompt tokens after ``start`` that ``units`` pay for (``cost``'s inverse, rounded down).

    >>> tokens_for(0, 105.0, 1000.0)
    100
    """
    if units <= 0:
        return 0
    b = 1 + start / attention
    return int(attention * (math.sqrt(b * b + 2 * units / attention) - b) + 1e-9)


class FairShare:
    """The units each active caller has been served, and the model's measured seconds per unit."""

    def __init__(self, attention: float) -> None:
        self.attention = attention
        self.served: dict[str, float] = {}
        self.unit_s: float | None = None  # measured; None until the first forward

    def sync(self, owners: Iterable[str]) -> None:
        """Keep the callers with work; a caller that arrives starts level with the least-served one, so neither
        its idle past nor the others' long work gives it a claim on the model."""
        active = set(owners)
        self.served = {o: s for o, s in self.served.items() if o in active}
        start = min(self.served.values(), default=0.0)
        for owner in active - self.served.keys():
            self.served[owner] = start

    def order(self, items: Sequence[T], owner_of: Callable[[T], str]) -> list[T]:
        """``items`` least-served caller first, in their own order within a caller."""
        return sorted(items, key=lambda item: self.served.get(owner_of(item), 0.0))

    def allowance(self, owner: str) -> float:
        """Units ``owner`` may use now: up to ``QUANTUM`` past the least-served other caller; unbounded alone."""
        others = [s for o, s in self.served.items() if o != owner]
        if not others:
            return math.inf
        return max(0.0, min(others) + QUANTUM - self.served.get(owner, 0.0))

    def charge(self, owner: str, units: float) -> None:
        self.served[owner] = self.served.get(owner, 0.0) + units

    def observe(self, seconds: float, units: float) -> None:
        rate = seconds / max(units, 1.0)
        self.unit_s = rate if self.unit_s is None else (1 - SPEED_WEIGHT) * self.unit_s + SPEED_WEIGHT * rate

    def projected_s(self, prompt_tokens: int, new_tokens: int, contenders: int, ahead: float = 0.0) -> float | None:
        """Seconds a request would take behind ``ahead`` units of its caller's prompts and beside ``contenders``
        other callers with work, each taking its equal share (of every prefill slice, and of the fixed cost of
        every decode step); None before the first forward."""
        if self.unit_s is None:
            return None
        units = (
            ahead
            + cost(0, prompt_tokens, self.attention)
            + new_tokens * (BASE_UNITS + 1 + prompt_tokens / self.attention)
        )
        return units * self.unit_s * (1 + contenders)


def interleave(items: Sequence[T], owner_of: Callable[[T], str]) -> list[T]:
    """Round robin across callers: each one's first item, then each one's second, ... (admission to a full batch).

    >>> interleave(["a1", "a2", "a3", "b1"], lambda s: s[0])
    ['a1', 'b1', 'a2', 'a3']
    """
    queues: dict[str, list[T]] = {}
    for item in items:
        queues.setdefault(owner_of(item), []).append(item)
    rounds = max((len(q) for q in queues.values()), default=0)
    return [q[i] for i in range(rounds) for q in queues.values() if i < len(q)]

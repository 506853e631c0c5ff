"""Fair shares of the local model across its callers: how much of which prompt each forward computes.

Work is counted in *units*: one unit is the weights' share of one prompt token. A token ``depth`` tokens into its
sequence also attends to those, ``depth / attention_tokens`` units more, so that a 7,000-word prompt costs what it
really does (its attention alone is as much again as its weights on the default model). Every caller (an API key)
is charged the seconds of each forward spent for it: the decoding callers share its fixed cost (a decode-only
forward's measured time), and the rest goes by units to the prompts and rows it computed. A caller may run at most
a forward's fixed cost ahead of the least-served other caller, so
while one key's rows decode, another key's long prompt is computed a slice a forward and each forward stays short:
start-time fair queuing, with the forward as the quantum of time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# A forward's fixed cost in units until it is measured: on 2 idle CPU cores the default model decodes one row in
# ~35 ms and prefills ~1.1 ms a token, so reading the weights once costs about 32 prompt tokens. On busy cores
# matrix products slow down far more than reading the weights (measured at load 20: a decode step 0.8 s, a token
# 0.15 s, ~5 units), so both are measured as the model runs.
BASE_UNITS = 32.0
# Units: smaller slices of a long prompt are not worth a forward.
MIN_CHUNK = 8
# Seconds a prompt unit takes until it is measured (2 idle CPU cores, the default model).
UNIT_S = 1.1e-3
# 0.5 s: the longest a forward's prompt work should take (unless the fixed cost alone is longer), so a request
# arriving mid-forward waits at most that long and a cancelled one stops within it.
FORWARD_TARGET_S = 0.5
# How fast the measured costs follow the latest forwards.
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
    """The model's seconds each active caller has been served, and its measured costs: a decode-only forward's
    seconds (its fixed cost) and a prompt unit's seconds."""

    def __init__(self, attention: float) -> None:
        self.attention = attention
        self.served: dict[str, float] = {}
        self.base_s: float | None = None  # measured; None until the first decode-only forward
        self.unit_s: float | None = None  # measured; None until the first forward

    @property
    def base_units(self) -> float:
        """A forward's fixed cost in units."""
        if self.base_s is None or self.unit_s is None:
            return BASE_UNITS
        return min(max(self.base_s / self.unit_s, 1.0), 1024.0)

    @property
    def lead_s(self) -> float:
        """Seconds a caller may run ahead of the least-served other: one forward's fixed cost (or the smallest
        slice), so that while another caller decodes, prompt work takes about half of the model's time."""
        unit_s = self.unit_s or UNIT_S
        return max(self.base_s or BASE_UNITS * unit_s, MIN_CHUNK * unit_s)

    def forward_units(self, most: float) -> float:
        """Prompt units one forward may do: ``FORWARD_TARGET_S`` of work (or the fixed cost, if longer), at most
        ``most``."""
        if self.unit_s is None:
            return most
        seconds = max(FORWARD_TARGET_S, self.base_s or 0.0)
        return min(most, max(float(MIN_CHUNK), seconds / self.unit_s))

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

    def least_served(self, owner: str) -> bool:
        return all(self.served.get(owner, 0.0) <= s for s in self.served.values())

    def allowance(self, owner: str) -> float:
        """Units ``owner`` may use now: ``lead_s`` past the least-served other caller's seconds; unbounded alone."""
        others = [s for o, s in self.served.items() if o != owner]
        if not others:
            return math.inf
        return max(0.0, min(others) + self.lead_s - self.served.get(owner, 0.0)) / (self.unit_s or UNIT_S)

    def charge(self, owner: str, seconds: float) -> None:
        self.served[owner] = self.served.get(owner, 0.0) + seconds

    def observe(self, seconds: float, prompt_units: float, decode_units: float) -> None:
        """Learn the costs from a forward that took ``seconds`` for ``prompt_units`` of prompts and
        ``decode_units`` of decoding rows (besides its fixed cost)."""

        def follow(old: float | None, new: float) -> float:
            return new if old is None else (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * new

        if 0 < prompt_units < 1:
            return  # the last token of a cached prompt: too little to time
        if not prompt_units:
            self.base_s = follow(self.base_s, max(seconds - decode_units * (self.unit_s or 0.0), 0.5 * seconds))
        elif self.base_s is None:
            self.unit_s = follow(self.unit_s, seconds / (BASE_UNITS + prompt_units + decode_units))
        else:
            work = max(seconds - self.base_s, 0.1 * seconds)
            self.unit_s = follow(self.unit_s, work / (prompt_units + decode_units))

    def projected_s(self, prompt_tokens: int, new_tokens: int, contenders: int, ahead: float = 0.0) -> float | None:
        """Seconds a request would take behind ``ahead`` units of its caller's prompts and beside ``contenders``
        other callers with work, each taking its equal share (of every prefill slice, and of the fixed cost of
        every decode step); None before the first forward."""
        if self.unit_s is None:
            return None
        step = self.base_units + 1 + prompt_tokens / self.attention  # a decode step: its fixed cost and its row
        units = ahead + cost(0, prompt_tokens, self.attention) + new_tokens * step
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

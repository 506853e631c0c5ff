"""Continuous batching for a Hugging Face causal LM: rows join and leave one KV cache between decode steps.

A static ``generate`` runs every row until the longest reply ends and admits nobody midway, so when episodes
issue dependent calls most decode slots idle. Here each step decodes one token for every active row; finished
rows leave at once, and waiting requests are prefilled and join the running cache. Rows are left-padded
to a common cache length; the attention mask hides the padding and explicit position ids give each row its own
positions, so a row's tokens do not depend on its neighbours (up to kernel rounding in low precision).

transformers' own continuous batching (``generate_batch``) targets GPUs: on CPU its paged attention ran at less
than half the speed of a static ``generate`` on the same prompts, so this keeps the plain ``DynamicCache``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from runtime.errors import ConfigError


@dataclass(eq=False)
class Row:
    """One request's decoding state. ``tag`` is the caller's handle, carried untouched."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tag: Any = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None

    @property
    def next_position(self) -> int:
        """Position id of the last token, the one fed to the next decode step."""
        return len(self.prompt_ids) + len(self.tokens) - 1


# Shorter shared prefixes are not worth a cache copy.
MIN_REUSED_PREFIX = 8


def new_stats() -> dict[str, float]:
    """Counters of the model work: forward passes (a prefill per row, then one per decode step), admissions (new
    rows merged into the running batch), rows decoded (slot_tokens), prompt tokens computed and reused, times."""
    return {
        "forwards": 0,
        "admissions": 0,
        "decode_steps": 0,
        "slot_tokens": 0,
        "prefill_rows": 0,
        "prefill_tokens": 0,
        "reused_tokens": 0,
        "prefill_s": 0.0,
        "merge_s": 0.0,
        "decode_s": 0.0,
    }


def check_supported(model: Any) -> None:
    """Refuse models whose cache is not a plain full-attention ``DynamicCache``: rows could not be merged."""
    from transformers import DynamicCache

    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise ConfigError(
            f"the local backend batches with a full-attention KV cache; this model uses {', '.join(sorted(odd))}. "
            "Serve it with vLLM instead (--backend openai)"
        )


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token occupies in the cache, over all layers."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return int(2 * config.num_hidden_layers * heads * head_dim * element)


class PrefixStore:
    """KV states of recent sequences (prompts, and prompts + replies) by token ids, least recently used first out.

    A new prompt starts from the longest common token prefix with any stored sequence, so a role's system prompt,
    or an earlier turn of the same conversation, is computed once. Positions are absolute from the first token, so
    a stored prefix is valid for every sequence that begins with it.
    """

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self._entries: OrderedDict[int, tuple[np.ndarray, list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self._next = 0
        self.tokens = 0

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def longest(self, ids: Sequence[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """Length of the longest stored prefix of ``ids`` and that entry's keys and values per layer."""
        query = np.asarray(ids)
        best, best_key = 0, None
        for key, (stored, _, _) in self._entries.items():
            n = min(len(stored), len(query))
            differs = np.flatnonzero(stored[:n] != query[:n])
            common = int(differs[0]) if differs.size else n
            if common > best:
                best, best_key = common, key
        if best_key is None:
            return 0, [], []
        self._entries.move_to_end(best_key)
        _, keys, values = self._entries[best_key]
        return best, keys, values

    def put(self, ids: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store one sequence's per-layer keys and values (``[heads, tokens, dim]``, owned by the store)."""
        if len(ids) > self.budget_tokens:
            return
        stored = np.asarray(ids)
        for key, (other, _, _) in list(self._entries.items()):  # a stored prefix of this sequence is redundant
            if len(other) <= len(stored) and np.array_equal(other, stored[: len(other)]):
                self.tokens -= len(other)
                del self._entries[key]
        self._entries[self._next] = (stored, keys, values)
        self._next += 1
        self.tokens += len(stored)
        while self.tokens > self.budget_tokens:
            _, (evicted, _, _) = self._entries.popitem(last=False)
            self.tokens -= len(evicted)


class ContinuousBatch:
    """The active rows of one model (and adapter) and their shared KV cache. Not thread-safe: one caller."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_ids: set[int],
        stats: dict[str, float] | None = None,
        prefix_tokens: int = 0,
        slots: int = 32,
    ) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, sorted(eos_ids)
        self.prefixes = PrefixStore(prefix_tokens) if prefix_tokens > 0 else None
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # row i lives in slot i of the cache
        self.slots = SlotCache(model, max_slots=slots)
        self.stats = new_stats() if stats is None else stats  # may be shared by the batches of one backend

    def __len__(self) -> int:
        return len(self.rows)

    def advance(self, new_rows: Sequence[Row]) -> list[Row]:
        """Admit ``new_rows`` (their first token comes from the prefill), decode one step, return finished rows."""
        if new_rows:
            self._admit(new_rows)
        finished = self._drop_finished()
        if self.rows:
            self._step()
            finished += self._drop_finished()
        return finished

    def cancel(self, is_cancelled: Callable[[Row], bool]) -> None:
        for row in self.rows:
            if is_cancelled(row):
                row.finish = "cancelled"

    # ---- model work -----------------------------------------------------------------------------------------

    def _admit(self, rows: Sequence[Row]) -> None:
        # One forward per row: on CPU prefill is compute-bound (300-token prompts: 898 tok/s alone, 1030 four at a
        # time), and alone each row starts from its own cached prefix. Each new row is copied into a free slot.
        started = time.perf_counter()
        logits = []
        for row in rows:
            cache, row_logits = self._prefill(row)
            logits.append(row_logits)
            if row.seed is not None and row.temperature > 0:
                row.generator = torch.Generator(self.device).manual_seed(row.seed)
            placing = time.perf_counter()
            self.slots.place([ly.keys[0] for ly in cache.layers], [ly.values[0] for ly in cache.layers])
            self.rows.append(row)
            self.stats["merge_s"] += time.perf_counter() - placing
        self._append(rows, self._pick(torch.cat(logits), rows))
        self.stats["admissions"] += 1
        self.stats["prefill_rows"] += len(rows)
        self.stats["prefill_s"] += time.perf_counter() - started

    def _prefill(self, row: Row) -> tuple[Any, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        reused = 0
        if self.prefixes is not None:
            reused, keys, values = self.prefixes.longest(row.prompt_ids)
            reused = min(reused, len(row.prompt_ids) - 1)  # the last prompt token must run: its logits are needed
            if reused < MIN_REUSED_PREFIX:
                reused = 0
            else:
                for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                    cache.update(k[None, :, :reused], v[None, :, :reused], layer)
        suffix = row.prompt_ids[reused:]
        ids = torch.tensor([suffix], device=self.device)
        positions = torch.arange(reused, len(row.prompt_ids), device=self.device)[None]
        mask = torch.ones((1, len(row.prompt_ids)), dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if self.prefixes is not None:
            layers: list[Any] = cache.layers  # full-attention layers only (checked when the model loaded)
            self.prefixes.put(row.prompt_ids, [ly.keys[0] for ly in layers], [ly.values[0] for ly in layers])
        self.stats["forwards"] += 1
        self.stats["prefill_tokens"] += len(suffix)
        self.stats["reused_tokens"] += reused
        return out.past_key_values, out.logits[:, -1]

    def _step(self) -> None:
        started = time.perf_counter()
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.next_position] for r in self.rows], device=self.device)
        cache, mask = self.slots.open_column()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        self.slots.end += 1
        self._append(self.rows, self._pick(out.logits[:, -1], self.rows))
        self.stats["forwards"] += 1
        self.stats["decode_steps"] += 1
        self.stats["slot_tokens"] += len(self.rows)
        self.stats["decode_s"] += time.perf_counter() - started

    def _pick(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        logits = logits.float()
        for i, row in enumerate(rows):
            if row.ignore_eos and self.eos_ids:
                logits[i, self.eos_ids] = float("-inf")
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.temperature > 0:
                chosen[i] = _sample(logits[i], row.temperature, row.top_p, row.generator)
        return chosen

    def _append(self, rows: Sequence[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
            if not row.ignore_eos and token in self.eos_ids:
                row.finish = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish = "length"
            elif row.stop:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                if any(s in text for s in row.stop):
                    row.finish = "stop"

    # ---- cache bookkeeping ----------------------------------------------------------------------------------

    def _drop_finished(self) -> list[Row]:
        finished = [r for r in self.rows if r.finish is not None]
        if not finished:
            return []
        for i in reversed(range(len(self.rows))):  # from the end: a moved row has already been looked at
            row = self.rows[i]
            if row.finish is None:
                continue
            if self.prefixes is not None and row.finish != "cancelled":
                # Prompt + reply: the conversation's next turn usually starts with them. The last token was
                # sampled, never fed, so it has no keys and values.
                n = len(row.prompt_ids) + len(row.tokens) - 1
                keys, values = self.slots.row(i, n)
                self.prefixes.put([*row.prompt_ids, *row.tokens][:n], keys, values)
            last = len(self.rows) - 1
            self.slots.remove(i)
            self.rows[i] = self.rows[last]
            self.rows.pop()
        self.slots.trim()
        return finished


class SlotCache:
    """The batch's keys and values in buffers of ``[slots, heads, columns, dim]`` per layer, filled in place.

    Rows ``[0, n)`` are the batch's rows, each right-aligned at column ``end``: its cached tokens fill ``[end -
    length, end)`` and its mask is 1 there only. A decode step writes column ``end`` of every row; a new row is
    copied into slot ``n``; a finished row is overwritten by the last one. Rebuilding the whole cache on every
    admission and every finished row was 12% of the model time of a concurrent SALAM pass; here the buffers are
    reallocated (``_repack``, with room to spare on both sides) only when slots or columns run out.
    """

    ROOM = 128  # spare columns on each side per (re)allocation: one copy per 128 decode steps at most

    def __init__(self, model: Any, max_slots: int) -> None:
        from transformers import DynamicCache

        self.max_slots = max_slots
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache(config=model.config)
        self.layers = [SlotLayer(self, i) for i in range(len(self.cache.layers))]
        self.cache.layers = list(self.layers)
        self.keys: list[torch.Tensor] = []  # per layer; empty until the first row arrives
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.n = self.start = self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def place(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Copy one row's per-layer ``[heads, length, dim]`` keys and values into the next free slot, ``n``."""
        slot = self.n
        length = keys[0].shape[-2]
        if not self.keys or self.n == self.mask.shape[0] or length > self.end:
            self._repack(rows=self.n + 1, left=length, heads=keys[0].shape[0], dim=keys[0].shape[-1])
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slot, :, self.end - length : self.end] = k
            self.values[layer][slot, :, self.end - length : self.end] = v
        self.mask[slot] = 0  # whatever a former row left in this slot stays hidden
        self.mask[slot, self.end - length : self.end] = 1
        self.start = min(self.start, self.end - length) if self.n else self.end - length
        self.n += 1

    def open_column(self) -> tuple[Any, torch.Tensor]:
        """The cache and mask for one decode step, which writes column ``end`` (the caller then moves ``end``)."""
        if self.end == self.mask.shape[1]:
            self._repack(rows=self.n, left=0, heads=self.keys[0].shape[1], dim=self.keys[0].shape[-1])
        self.mask[: self.n, self.end] = 1
        for layer in self.layers:
            layer.show()
        return self.cache, self.mask[: self.n, self.start : self.end + 1]

    def row(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the last ``length`` cached columns of ``slot``, per layer ``[heads, length, dim]``."""
        columns = slice(self.end - length, self.end)
        return (
            [k[slot, :, columns].clone() for k in self.keys],
            [v[slot, :, columns].clone() for v in self.values],
        )

    def remove(self, slot: int) -> None:
        """Free ``slot``; the last row moves into it, so rows stay ``[0, n)``."""
        last = self.n - 1
        if slot != last:
            columns = slice(self.start, self.end)
            for k, v in zip(self.keys, self.values, strict=True):
                k[slot, :, columns] = k[last, :, columns]
                v[slot, :, columns] = v[last, :, columns]
            self.mask[slot] = self.mask[last]
        self.n = last

    def trim(self) -> None:
        """Stop attending to columns that hold no remaining row's tokens; release the buffers when none is left."""
        if self.n == 0:
            self.keys, self.values = [], []
            self.mask = self.mask.new_zeros((0, 0))
            self.start = self.end = 0
            return
        used = self.mask[: self.n, self.start : self.end].any(0).nonzero()
        self.start += int(used[0])

    def _repack(self, *, rows: int, left: int, heads: int, dim: int) -> None:
        """New buffers with at least ``rows`` slots and ``left`` columns before ``end``, and room on both sides."""
        # Slots double as rows arrive (up to the batch's most), so a batch that stays small stays small in memory.
        slots = max(rows, min(2 * self.mask.shape[0], self.max_slots))
        end = max(self.width, left) + self.ROOM
        shape = (slots, heads, end + self.ROOM, dim)
        # Zeros, not empty memory: a masked column still enters attention as 0 x value, and NaN x 0 is NaN.
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.cache.layers]
        new_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.cache.layers]
        mask = torch.zeros((slots, shape[2]), dtype=torch.long, device=self.device)
        if self.n:
            old, new = slice(self.start, self.end), slice(end - self.width, end)
            for layer in range(len(self.keys)):
                new_keys[layer][: self.n, :, new] = self.keys[layer][: self.n, :, old]
                new_values[layer][: self.n, :, new] = self.values[layer][: self.n, :, old]
            mask[: self.n, new] = self.mask[: self.n, old]
        self.start, self.end = end - self.width, end
        self.keys, self.values, self.mask = new_keys, new_values, mask


class SlotLayer(DynamicLayer):
    """One layer of a ``SlotCache`` as transformers sees it: the batch's rows over columns ``[start, end)``, and
    a decode step's keys and values written in place at ``end`` (``DynamicLayer.update`` would copy the layer)."""

    def __init__(self, slots: SlotCache, index: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slots, self.index = slots, index

    def show(self) -> None:
        s = self.slots
        self.device, self.is_initialized = s.device, True
        self.keys = s.keys[self.index][: s.n, :, s.start : s.end]
        self.values = s.values[self.index][: s.n, :, s.start : s.end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, new = self.slots, key_states.shape[-2]
        s.keys[self.index][: s.n, :, s.end : s.end + new] = key_states
        s.values[self.index][: s.n, :, s.end : s.end + new] = value_states
        self.keys = s.keys[self.index][: s.n, :, s.start : s.end + new]
        self.values = s.values[self.index][: s.n, :, s.start : s.end + new]
        return self.keys, self.values


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the first token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

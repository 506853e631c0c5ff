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
import torch.nn.functional as F
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
    ) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, sorted(eos_ids)
        self.prefixes = PrefixStore(prefix_tokens) if prefix_tokens > 0 else None
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]; 0 where a row is padded
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
        # time), and alone each row starts from its own cached prefix. The new rows join the cache in one merge.
        started = time.perf_counter()
        caches, logits = [], []
        for row in rows:
            cache, row_logits = self._prefill(row)
            caches.append(cache)
            logits.append(row_logits)
            if row.seed is not None and row.temperature > 0:
                row.generator = torch.Generator(self.device).manual_seed(row.seed)
        merging = time.perf_counter()
        self._merge(caches, [len(r.prompt_ids) for r in rows])
        self.stats["merge_s"] += time.perf_counter() - merging
        self.rows.extend(rows)
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
        assert self.mask is not None
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.next_position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        self.cache = out.past_key_values
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

    def _merge(self, caches: Sequence[Any], lengths: Sequence[int]) -> None:
        """Left-pad the running cache and the new rows' caches to one length and stack them."""
        parts = [] if self.cache is None else [self.cache]
        masks = [] if self.mask is None else [self.mask]
        masks += [torch.ones((1, n), dtype=torch.long, device=self.device) for n in lengths]
        width = max(m.shape[1] for m in masks)
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])
        parts += caches
        merged = parts[0]
        merged.layers = [
            GrowingLayer.holding(
                _stack_right([p.layers[i].keys for p in parts], width),
                _stack_right([p.layers[i].values for p in parts], width),
                width,
            )
            for i in range(len(merged.layers))
        ]
        self.cache = merged

    def _drop_finished(self) -> list[Row]:
        finished = [r for r in self.rows if r.finish is not None]
        if not finished:
            return []
        if self.prefixes is not None:
            self._remember(finished)
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return finished
        assert self.mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])  # columns that are padding for every remaining row go
        self.mask = mask[:, start:]
        width = self.mask.shape[1]
        self.cache.layers = [
            GrowingLayer.holding(
                _stack_right([layer.keys[index, :, start:]], width),
                _stack_right([layer.values[index, :, start:]], width),
                width,
            )
            for layer in self.cache.layers
        ]
        return finished

    def _remember(self, finished: Sequence[Row]) -> None:
        """Store prompt + reply of finished rows: the conversation's next turn usually starts with them."""
        assert self.prefixes is not None and self.mask is not None
        width = self.mask.shape[1]
        for row in finished:
            if row.finish == "cancelled":
                continue
            i = self.rows.index(row)
            n = len(row.prompt_ids) + len(row.tokens) - 1  # the last token was sampled, never fed
            self.prefixes.put(
                [*row.prompt_ids, *row.tokens][:n],
                [layer.keys[i, :, width - n :].clone() for layer in self.cache.layers],
                [layer.values[i, :, width - n :].clone() for layer in self.cache.layers],
            )


class GrowingLayer(DynamicLayer):
    """A cache layer with spare room at the end, so a decode step writes its column in place.

    ``DynamicLayer.update`` concatenates, copying the whole cache every step: at 32 rows and 600 tokens that was a
    third of the step (242 vs 160 ms). Merges and drops build their buffers with room already (``_stack_right``);
    when the room runs out, ``update`` makes more.
    """

    ROOM = 128  # spare columns per (re)allocation: one copy per 128 steps

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, used: int) -> GrowingLayer:
        """A layer over buffers whose first ``used`` columns are filled; the rest is room for decode steps."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._room = (keys, values)
        layer.keys, layer.values = keys[..., :used, :], values[..., :used, :]
        return layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None  # set by lazy_initialization in holding()
        used, n = self.keys.shape[-2], key_states.shape[-2]
        room: tuple[torch.Tensor, torch.Tensor] | None = getattr(self, "_room", None)
        if room is None or room[0].data_ptr() != self.keys.data_ptr() or used + n > room[0].shape[-2]:
            shape = (*self.keys.shape[:-2], used + n + self.ROOM, self.keys.shape[-1])
            room = (self.keys.new_empty(shape), self.values.new_empty(shape))
            room[0][..., :used, :] = self.keys
            room[1][..., :used, :] = self.values
            self._room = room
        room[0][..., used : used + n, :] = key_states
        room[1][..., used : used + n, :] = value_states
        self.keys, self.values = room[0][..., : used + n, :], room[1][..., : used + n, :]
        return self.keys, self.values


def _stack_right(parts: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[rows, heads, length, dim]`` tensors into one buffer of ``width + ROOM`` columns, each part
    right-aligned at ``width`` (left padding zero): one copy, with room for the next decode steps."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    buffer = first.new_zeros((rows, first.shape[1], width + GrowingLayer.ROOM, first.shape[3]))
    row = 0
    for part in parts:
        buffer[row : row + part.shape[0], :, width - part.shape[2] : width] = part
        row += part.shape[0]
    return buffer


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the first token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

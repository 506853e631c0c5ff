"""Continuous batching for a Hugging Face causal LM: rows join and leave one KV cache at every forward.

A static ``generate`` runs every row until the longest reply ends and admits nobody midway, so when episodes
issue dependent calls most decode slots idle. Here each forward decodes one token for every active row and, in
the same forward, prefills the rows that arrived (vLLM's chunked prefill, whole prompts): the weights are read once
for both, and the running rows do not wait a step for the newcomers. Finished rows leave at once. The forward is
one flat sequence of tokens through the model's own layers; only attention is redpen's (``slot_attention``): each
row attends to its own keys and values in a ``SlotCache``, so a row's tokens do not depend on its neighbours (up to
kernel rounding in low precision).

transformers' own continuous batching (``generate_batch``) targets GPUs: on CPU its paged attention ran at less
than half the speed of a static ``generate`` on the same prompts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from runtime.errors import ConfigError
from runtime.models.fair import MIN_CHUNK, FairShare, attention_tokens, cost, tokens_for


class TokenConstraint(Protocol):
    """What a row's tokens must follow (a grammar): the tokens allowed next, then the one chosen."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of the tokens not allowed next to -inf, in place (``logits`` is one row's)."""
        ...

    def accept(self, token: int) -> None:
        """Advance past the chosen token."""
        ...


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
    logprobs: int | None = None  # None: none kept; k: each token's log-prob and the k most likely tokens'
    constraint: TokenConstraint | None = None
    owner: str = ""  # the caller it is computed for (an API key's hash), for fair shares of the model
    tokens: list[int] = field(default_factory=list)
    # Per token when ``logprobs`` is set: its log-prob under the model, and the top k as (token, log-prob).
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None
    # A prompt computed a slice at a time (see ``ContinuousBatch._plan``): its first ``done`` tokens' keys and
    # values, per layer ``[heads, prompt length, dim]``, until it joins the slots.
    done: int = 0
    partial: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def next_position(self) -> int:
        """Position id of the last token, the one fed to the next decode step."""
        return len(self.prompt_ids) + len(self.tokens) - 1


# Shorter shared prefixes are not worth a cache copy.
MIN_REUSED_PREFIX = 8

# A cached prefix: its length in tokens and its per-layer keys and values.
Prefix = tuple[int, list[torch.Tensor], list[torch.Tensor]]


def new_stats() -> dict[str, float]:
    """Counters of the model work: forward passes, admissions (forwards that prefilled new rows), decode steps
    (forwards that decoded running rows; ``mixed_steps`` of them also prefilled), rows decoded (slot_tokens), prompt
    tokens computed and reused; times: a forward with new rows counts as prefill, one without as decode."""
    return {
        "forwards": 0,
        "admissions": 0,
        "decode_steps": 0,
        "mixed_steps": 0,
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


SLOT_ATTENTION = "redpen_slots"


def use_slot_attention(model: Any) -> None:
    """Route the model's attention through ``slot_attention``: a forward given a ``slot_step`` runs on the slot
    cache; any other (option scoring, prompt log-probs) is plain SDPA, as before."""
    model.set_attn_implementation(SLOT_ATTENTION)


def kv_shape(model: Any) -> tuple[int, int, int, int]:
    """Layers, key/value heads and head size of the model's cache, and query heads per key head."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_hidden_layers), int(heads), int(head_dim), int(config.num_attention_heads // heads)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token occupies in the cache, over all layers."""
    layers, heads, head_dim, _ = kv_shape(model)
    return 2 * layers * heads * head_dim * int(next(model.parameters()).element_size())


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading token ids two sequences share."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if differs.size else n


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
            common = common_prefix(stored, query)
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
        chunk_units: float | None = None,
        share: FairShare | None = None,
    ) -> None:
        """``chunk_units``: the most prompt work (in ``fair`` units) one forward does; None: every waiting prompt
        whole in the next forward. ``share``: the callers' shares, shared by the batches of one model."""
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, sorted(eos_ids)
        if model.config._attn_implementation != SLOT_ATTENTION:
            use_slot_attention(model)
        self.prefixes = PrefixStore(prefix_tokens) if prefix_tokens > 0 else None
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # row i lives in slot i of the cache
        self.deferred: list[Row] = []  # admitted, not yet in a slot: prefilled in a later forward (see ``_plan``)
        self.slots = SlotCache(model, max_slots=slots)
        self.chunk_units = chunk_units
        self.share = share if share is not None else FairShare(attention_tokens(model))
        self.stats = new_stats() if stats is None else stats  # may be shared by the batches of one backend

    def __len__(self) -> int:
        return len(self.rows) + len(self.deferred)

    def advance(self, new_rows: Sequence[Row]) -> list[Row]:
        """One forward: every running row decodes a token and ``new_rows`` are prefilled (their first token comes
        from it; see ``_plan`` for those that wait a forward). Returns the rows that finished."""
        cancelled = [r for r in self.deferred if r.finish is not None]
        for row in cancelled:
            row.partial = None  # its slices' memory goes now, not when the caller drops the row
        new, slices = self._plan([r for r in [*self.deferred, *new_rows] if r.finish is None])
        if self.rows or new or slices:
            self._forward(new, slices)
        return cancelled + self._drop_finished()

    def cancel(self, is_cancelled: Callable[[Row], bool]) -> None:
        for row in [*self.rows, *self.deferred]:
            if is_cancelled(row):
                row.finish = "cancelled"

    # ---- model work -----------------------------------------------------------------------------------------

    def _forward(self, new: Sequence[tuple[Row, Prefix]], slices: Sequence[tuple[Row, int]] = ()) -> None:
        started = time.perf_counter()
        running, new_rows = len(self.rows), [row for row, _ in new]
        step = self.slots.open_step([len(r.prompt_ids) for r in new_rows])
        ids = [r.tokens[-1] for r in self.rows]
        positions = [r.next_position for r in self.rows]
        for row, (reused, keys, values) in new:
            step.add_row(len(row.prompt_ids), reused, keys, values)
            ids += row.prompt_ids[reused:]
            positions += range(reused, len(row.prompt_ids))
            if row.seed is not None and row.temperature > 0 and row.generator is None:
                row.generator = torch.Generator(self.device).manual_seed(row.seed)
            self.stats["prefill_tokens"] += len(row.prompt_ids) - reused
            self.stats["reused_tokens"] += reused - row.done  # a row's own slices were counted as computed
            row.partial = None
        for row, tokens in slices:  # after the new rows: their offsets in the flat sequence come first
            assert row.partial is not None
            step.add_slice(*row.partial, row.done, tokens)
            ids += row.prompt_ids[row.done : row.done + tokens]
            positions += range(row.done, row.done + tokens)
            self.stats["prefill_tokens"] += tokens
        step.close()
        self.stats["merge_s"] += time.perf_counter() - started
        # Logits of each running row's token and of each new row's last prompt token only: the vocabulary
        # projection of a whole prompt would cost more than its attention.
        keep = list(range(running)) + [offset + length - 1 for _, offset, length, _ in step.new]
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            attention_mask=NO_MASK,  # 4-D, so transformers builds none: slot_attention masks each row itself
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            slot_step=step,
        )
        self.slots.end += 1
        for row, tokens in slices:
            row.done += tokens
        self.rows += new_rows
        self._append(self.rows, self._pick(out.logits[0], self.rows))
        if self.prefixes is not None:  # the prompts' keys and values, for the next prompt that starts with one
            placing = time.perf_counter()
            for slot, row in enumerate(new_rows, start=running):
                keys, values = self.slots.row(slot, len(row.prompt_ids))
                self.prefixes.put(row.prompt_ids, keys, values)
            self.stats["merge_s"] += time.perf_counter() - placing
        self.stats["forwards"] += 1
        self.stats["slot_tokens"] += running
        self.stats["decode_steps"] += running > 0
        self.stats["mixed_steps"] += running > 0 and bool(new_rows)
        self.stats["admissions"] += bool(new_rows)
        self.stats["prefill_rows"] += len(new_rows)
        elapsed = time.perf_counter() - started
        self.stats["prefill_s" if new_rows or slices else "decode_s"] += elapsed
        self._charge(running, elapsed, new, slices)

    def _charge(
        self, running: int, seconds: float, new: Sequence[tuple[Row, Prefix]], slices: Sequence[tuple[Row, int]]
    ) -> None:
        """Charge each caller its seconds of the forward just run; the model's costs are measured on all of them."""
        attention = self.share.attention
        decoding = self.rows[:running]
        work = [(row.owner, 1 + row.next_position / attention) for row in decoding]
        decode_units = sum(units for _, units in work)
        work += [(row.owner, cost(reused, len(row.prompt_ids) - reused, attention)) for row, (reused, _, _) in new]
        work += [(row.owner, cost(row.done - tokens, tokens, attention)) for row, tokens in slices]
        prompt_units = sum(units for _, units in work) - decode_units
        owners = {row.owner for row in decoding} or {owner for owner, _ in work}
        fixed = min(seconds, self.share.base_s or seconds / 2)
        for owner in owners:  # the fixed cost, split between the callers it ran for
            self.share.charge(owner, fixed / len(owners))
        total = sum(units for _, units in work)
        for owner, units in work:  # the rest by the work done for each
            self.share.charge(owner, (seconds - fixed) * units / total)
        self.share.observe(seconds, prompt_units, decode_units)

    def _plan(self, rows: Sequence[Row]) -> tuple[list[tuple[Row, Prefix]], list[tuple[Row, int]]]:
        """The rows to prefill now, each with its cached prefix, and the slices of long prompts to compute now.

        Least-served caller first (``FairShare``), each within its allowance and all within the forward's budget
        (``FairShare.forward_units``, at most ``chunk_units``). A prompt that fits in ``chunk_units`` is computed
        whole when its turn and room come, so its reply is what it would be alone; a longer one a slice a forward,
        one prompt of a caller at a time, and joins the slots with its last slice. A row that shares more of its
        prompt with a row prefilled now than with any cached prompt (a role's system prompt, when a burst of
        conversations starts) waits one forward in ``deferred`` and then starts from that row's prompt, as it
        would one at a time.
        """
        self.share.sync(row.owner for row in [*self.rows, *rows])
        budget = math.inf if self.chunk_units is None else self.share.forward_units(self.chunk_units)
        planned: dict[str, float] = {}  # units given to each caller in this plan
        slicing = {row.owner for row in rows if row.partial is not None}  # one partly computed prompt per caller
        now: list[tuple[Row, Prefix]] = []
        slices: list[tuple[Row, int]] = []
        self.deferred = []
        for row in self.share.order(rows, lambda r: r.owner):
            prefix = self._reusable(row)
            ids = np.asarray(row.prompt_ids)
            shared = max((common_prefix(ids, np.asarray(other.prompt_ids)) for other, _ in now), default=0)
            if self.prefixes is not None and min(shared, len(ids) - 1) >= prefix[0] + MIN_REUSED_PREFIX:
                self.deferred.append(row)
                continue
            start = prefix[0]
            allowed = min(budget, self.share.allowance(row.owner) - planned.get(row.owner, 0.0))
            units = cost(start, len(ids) - start, self.share.attention)
            # A least-served caller's first prompt goes whole if it fits a forward at all: a short question is
            # computed the forward after it arrives, however busy the model.
            first = row.owner not in planned and self.share.least_served(row.owner)
            if self.chunk_units is None or units <= allowed or (first and units <= self.chunk_units):
                now.append((row, prefix))
            else:
                self.deferred.append(row)
                if units <= self.chunk_units or (row.partial is None and row.owner in slicing):
                    continue  # fits a forward whole: waits for one, so its reply is what it would be alone
                if allowed < MIN_CHUNK:
                    continue
                tokens = max(1, min(tokens_for(start, allowed, self.share.attention), len(ids) - 1 - start))
                self._start_slices(row, prefix)
                slicing.add(row.owner)
                slices.append((row, tokens))
                units = cost(start, tokens, self.share.attention)
            budget -= units
            planned[row.owner] = planned.get(row.owner, 0.0) + units
        if not (now or slices or self.rows) and self.deferred:
            self._unblock(now, slices)
        return now, slices

    def _unblock(self, now: list[tuple[Row, Prefix]], slices: list[tuple[Row, int]]) -> None:
        """Nothing runs and every caller waits for another's allowance: the least-served one goes first."""
        row = self.deferred[0]
        prefix = self._reusable(row)
        start = prefix[0]
        units = cost(start, len(row.prompt_ids) - start, self.share.attention)
        if self.chunk_units is None or units <= self.chunk_units:
            self.deferred.pop(0)
            now.append((row, prefix))
        else:
            self._start_slices(row, prefix)
            tokens = tokens_for(start, self.share.forward_units(self.chunk_units), self.share.attention)
            slices.append((row, max(1, min(tokens, len(row.prompt_ids) - 1 - start))))

    def _start_slices(self, row: Row, prefix: Prefix) -> None:
        """Room for a prompt computed in slices, starting from its cached prefix."""
        if row.partial is not None:
            return
        reused, keys, values = prefix
        row.partial = own_keys, own_values = self.slots.scratch(len(row.prompt_ids))
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            own_keys[layer][:, :reused] = k[:, :reused]
            own_values[layer][:, :reused] = v[:, :reused]
        row.done = reused
        self.stats["reused_tokens"] += reused

    def _reusable(self, row: Row) -> Prefix:
        """The longest computed prefix of the row's prompt worth reusing: its own slices so far, or the longest
        cached prefix; its length and per-layer keys and values."""
        if row.partial is not None:
            return row.done, *row.partial
        if self.prefixes is None:
            return 0, [], []
        reused, keys, values = self.prefixes.longest(row.prompt_ids)
        reused = min(reused, len(row.prompt_ids) - 1)  # the last prompt token must run: its logits are needed
        return (reused, keys, values) if reused >= MIN_REUSED_PREFIX else (0, [], [])

    def _pick(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        logits = logits.float()
        # Log-probs are the model's own, before a grammar or ignore_eos narrows the choice (as OpenAI and vLLM).
        scored = [i for i, row in enumerate(rows) if row.logprobs is not None]
        logprobs = torch.log_softmax(logits[scored], dim=-1) if scored else None
        for i, row in enumerate(rows):
            if row.ignore_eos and self.eos_ids:
                logits[i, self.eos_ids] = float("-inf")
            if row.constraint is not None:
                row.constraint.mask(logits[i])
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.temperature > 0:
                chosen[i] = _sample(logits[i], row.temperature, row.top_p, row.generator)
        if logprobs is not None:
            for j, i in enumerate(scored):
                k = rows[i].logprobs or 0
                top = logprobs[j].topk(k) if k else None
                alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
                rows[i].token_logprobs.append((float(logprobs[j, chosen[i]]), alternatives))
        return chosen

    def _append(self, rows: Sequence[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
            if row.constraint is not None:
                row.constraint.accept(token)
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


# A 4-D mask is passed through by transformers untouched; slot_attention does not read it.
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


class SlotCache:
    """The batch's keys and values in buffers of ``[slots, heads, columns, dim]`` per layer, filled in place.

    Rows ``[0, n)`` are the batch's rows, each right-aligned at column ``end``: its cached tokens fill ``[end -
    length, end)`` and its mask is 1 there only. A forward writes column ``end`` of every running row and a new
    row's prompt into a free slot, so that it too ends at ``end + 1``; a finished row is overwritten by the last
    one. Rebuilding the whole cache on every admission and every finished row was 12% of the model time of a
    concurrent SALAM pass; here the buffers are reallocated (``_repack``, with room to spare on both sides) only
    when slots or columns run out.
    """

    ROOM = 128  # spare columns on each side per (re)allocation: one copy per 128 decode steps at most

    def __init__(self, model: Any, max_slots: int) -> None:
        self.max_slots = max_slots
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.layers, self.heads, self.dim, self.group = kv_shape(model)
        self.keys: list[torch.Tensor] = []  # per layer; empty until the first row arrives
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.n = self.start = self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def open_step(self, lengths: Sequence[int]) -> SlotStep:
        """Room for one forward: the running rows' next column, and new rows of ``lengths`` tokens in the next
        free slots. The caller adds those rows to the returned step, runs it, then moves ``end``."""
        left = max((length - 1 for length in lengths), default=0)  # a new row ends at end + 1
        full = not self.keys or self.n + len(lengths) > self.mask.shape[0] or self.end == self.mask.shape[1]
        if full or left > self.end:
            self._repack(rows=self.n + len(lengths), left=left)
        self.mask[: self.n, self.end] = 1
        return SlotStep(self)

    def row(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the last ``length`` cached columns of ``slot``, per layer ``[heads, length, dim]``."""
        columns = slice(self.end - length, self.end)
        return (
            [k[slot, :, columns].clone() for k in self.keys],
            [v[slot, :, columns].clone() for v in self.values],
        )

    def scratch(self, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer keys and values ``[heads, length, dim]`` outside the slots, for a prompt computed in slices."""
        shape = (self.heads, length, self.dim)
        return (
            [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)],
            [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)],
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

    def _repack(self, *, rows: int, left: int) -> None:
        """New buffers with at least ``rows`` slots and ``left`` columns before ``end``, and room on both sides."""
        # Slots double as rows arrive (up to the batch's most), so a batch that stays small stays small in memory.
        slots = max(rows, min(2 * self.mask.shape[0], self.max_slots))
        end = max(self.width, left) + self.ROOM
        shape = (slots, self.heads, end + self.ROOM, self.dim)
        # Zeros, not empty memory: a masked column still enters attention as 0 x value, and NaN x 0 is NaN.
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        new_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        mask = torch.zeros((slots, shape[2]), dtype=torch.long, device=self.device)
        if self.n:
            old, new = slice(self.start, self.end), slice(end - self.width, end)
            for layer in range(len(self.keys)):
                new_keys[layer][: self.n, :, new] = self.keys[layer][: self.n, :, old]
                new_values[layer][: self.n, :, new] = self.values[layer][: self.n, :, old]
            mask[: self.n, new] = self.mask[: self.n, old]
        self.start, self.end = end - self.width, end
        self.keys, self.values, self.mask = new_keys, new_values, mask


class SlotStep:
    """One forward over a flat sequence: first one token per running row (slots ``[0, decode)``), then each new
    row's uncached prompt tokens. Every layer's ``slot_attention`` call lands in ``attend``."""

    def __init__(self, slots: SlotCache) -> None:
        self.slots = slots
        self.decode = slots.n
        self.decode_start = slots.start  # the running rows' columns; new rows may reach further left
        self.offset = slots.n  # where the next new row's tokens start in the flat sequence
        self.new: list[tuple[int, int, int, torch.Tensor]] = []  # slot, offset, tokens computed, tiled causal mask
        # Slices of prompts outside the slots: keys, values, offset, tokens before, tokens computed, causal mask.
        self.slices: list[tuple[list[torch.Tensor], list[torch.Tensor], int, int, int, torch.Tensor]] = []
        self.decode_mask: torch.Tensor | None = None

    def add_row(self, length: int, reused: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Place a new row of ``length`` prompt tokens in the next free slot, its first ``reused`` keys and values
        copied from a cached prefix; the forward computes the rest."""
        s, slot = self.slots, self.slots.n
        first = s.end + 1 - length
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            s.keys[layer][slot, :, first : first + reused] = k[:, :reused]
            s.values[layer][slot, :, first : first + reused] = v[:, :reused]
        s.mask[slot] = 0  # whatever a former row left in this slot stays hidden
        s.mask[slot, first : s.end + 1] = 1
        s.start = min(s.start, first) if s.n else first
        s.n += 1
        computed = length - reused
        # Query i (position reused + i) sees the prefix and the computed tokens up to itself; tiled once for the
        # query heads that share a key head, whose rows ``attend`` stacks head after head.
        causal = torch.arange(length, device=s.device)[None] <= torch.arange(reused, length, device=s.device)[:, None]
        self.new.append((slot, self.offset, computed, causal.repeat(s.group, 1)))
        self.offset += computed

    def add_slice(self, keys: list[torch.Tensor], values: list[torch.Tensor], done: int, computed: int) -> None:
        """Compute prompt tokens ``[done, done + computed)`` of a row outside the slots into its own ``keys`` and
        ``values`` (after every ``add_row``: its tokens come after theirs)."""
        device = self.slots.device
        causal = (
            torch.arange(done + computed, device=device)[None]
            <= torch.arange(done, done + computed, device=device)[:, None]
        )
        self.slices.append((keys, values, self.offset, done, computed, causal.repeat(self.slots.group, 1)))
        self.offset += computed

    def close(self) -> None:
        s = self.slots
        if self.decode:
            self.decode_mask = s.mask[: self.decode, self.decode_start : s.end + 1].bool()[:, None, None, :]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """Write this forward's keys and values into the slots and attend each row to its own: ``query`` is
        ``[1, heads, tokens, dim]``, the result ``[1, tokens, heads, dim]`` as transformers expects."""
        s, sdpa = self.slots, torch.nn.functional.scaled_dot_product_attention
        keys, values = s.keys[layer], s.values[layer]
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
        group, end = heads // kv_heads, s.end + 1
        out = query.new_empty((query.shape[2], heads, dim))
        # Grouped-query attention without repeating keys: a key head's query heads attend to it as one block of
        # rows (head h uses key head h // group, as transformers' repeat_kv).
        if n := self.decode:
            keys[:n, :, s.end] = key[0, :, :n].transpose(0, 1)
            values[:n, :, s.end] = value[0, :, :n].transpose(0, 1)
            q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, group, dim)
            columns = slice(self.decode_start, end)
            o = sdpa(q, keys[:n, :, columns], values[:n, :, columns], attn_mask=self.decode_mask, scale=scaling)
            out[:n] = o.reshape(n, heads, dim)
        for slot, offset, computed, causal in self.new:
            tokens = slice(offset, offset + computed)
            keys[slot, :, end - computed : end] = key[0, :, tokens]
            values[slot, :, end - computed : end] = value[0, :, tokens]
            columns = slice(end - causal.shape[1], end)
            q = query[0, :, tokens].reshape(kv_heads, group * computed, dim)
            o = sdpa(
                q[None],
                keys[slot : slot + 1, :, columns],
                values[slot : slot + 1, :, columns],
                attn_mask=causal,
                scale=scaling,
            )
            out[tokens] = o[0].reshape(heads, computed, dim).transpose(0, 1)
        for own_keys, own_values, offset, done, computed, causal in self.slices:
            tokens, columns = slice(offset, offset + computed), slice(done, done + computed)
            own_keys[layer][:, columns] = key[0, :, tokens]
            own_values[layer][:, columns] = value[0, :, tokens]
            q = query[0, :, tokens].reshape(kv_heads, group * computed, dim)
            seen = slice(0, done + computed)
            o = sdpa(
                q[None],
                own_keys[layer][None, :, seen],
                own_values[layer][None, :, seen],
                attn_mask=causal,
                scale=scaling,
            )
            out[tokens] = o[0].reshape(heads, computed, dim).transpose(0, 1)
        return out[None]


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    slot_step: SlotStep | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: a ``ContinuousBatch`` forward on its slots, anything else plain SDPA."""
    if slot_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return slot_step.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)  # the plain SDPA path's masks


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the first token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

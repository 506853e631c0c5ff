"""Continuous batching for a Hugging Face causal LM: rows join and leave one KV cache between decode steps.

A static ``generate`` runs every row until the longest reply ends and admits nobody midway, so when episodes
issue dependent calls most decode slots idle. Here each step decodes one token for every active row; finished
rows leave at once, and waiting requests are prefilled together and join the running cache. Rows are left-padded
to a common cache length; the attention mask hides the padding and explicit position ids give each row its own
positions, so a row's tokens do not depend on its neighbours (up to kernel rounding in low precision).

transformers' own continuous batching (``generate_batch``) targets GPUs: on CPU its paged attention ran at less
than half the speed of a static ``generate`` on the same prompts, so this keeps the plain ``DynamicCache``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

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


def new_stats() -> dict[str, float]:
    """Counters of the model work: forwards, decode steps, rows decoded (slot_tokens), prefill and decode time."""
    return {"forwards": 0, "decode_steps": 0, "slot_tokens": 0, "useful_tokens": 0, "prefill_rows": 0,
            "prefill_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}


def check_supported(model: Any) -> None:
    """Refuse models whose cache is not a plain full-attention ``DynamicCache``: rows could not be merged."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise ConfigError(
            f"the local backend batches with a full-attention KV cache; this model uses {', '.join(sorted(odd))}. "
            "Serve it with vLLM instead (--backend openai)"
        )


class ContinuousBatch:
    """The active rows of one model (and adapter) and their shared KV cache. Not thread-safe: one caller."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], stats: dict[str, float] | None = None) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, sorted(eos_ids)
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
        from transformers import DynamicCache

        started = time.perf_counter()
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        for row in rows:
            if row.seed is not None and row.temperature > 0:
                row.generator = torch.Generator(self.device).manual_seed(row.seed)
        self._merge(out.past_key_values, mask)
        self.rows.extend(rows)
        self._append(rows, self._pick(out.logits[:, -1], rows))
        self.stats["forwards"] += 1
        self.stats["prefill_rows"] += len(rows)
        self.stats["prefill_tokens"] += int(mask.sum())
        self.stats["prefill_s"] += time.perf_counter() - started

    def _step(self) -> None:
        started = time.perf_counter()
        assert self.mask is not None
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)
        positions = torch.tensor([[r.next_position] for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
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
            self.stats["useful_tokens"] += 1
            if not row.ignore_eos and token in self.eos_ids:
                row.finish = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish = "length"
            elif row.stop:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                if any(s in text for s in row.stop):
                    row.finish = "stop"

    # ---- cache bookkeeping ----------------------------------------------------------------------------------

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        if not self.rows:
            self.cache, self.mask = cache, mask
            return
        assert self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])

    def _drop_finished(self) -> list[Row]:
        finished = [r for r in self.rows if r.finish is not None]
        if not finished:
            return []
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
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return finished


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]  # F.pad lists the last dimension first
    return F.pad(tensor, pad)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the first token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

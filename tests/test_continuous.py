"""ContinuousBatch on a tiny random Llama: rows joining and leaving in any order decode exactly as they do alone, and
the slot cache admits and drops rows in place, reallocating only when slots or columns run out."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from runtime.models.continuous import ContinuousBatch, Row, SlotCache
from tests.helpers import tiny_llama_config


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # Two key heads of two query heads each: attention must pair every query head with its own key head.
    config = tiny_llama_config(
        num_attention_heads=4, num_key_value_heads=2, vocab_size=300, eos_token_id=None, pad_token_id=0
    )
    return LlamaForCausalLM(config).eval()


def batch(model: Any, slots: int = 4, prefix_tokens: int = 0) -> ContinuousBatch:
    return ContinuousBatch(model, tokenizer=None, eos_ids=set(), prefix_tokens=prefix_tokens, slots=slots)


def row(prompt: list[int], new_tokens: int) -> Row:
    return Row(prompt_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


def alone(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy ``generate`` (its cache and SDPA), independent of the slots."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return list(out[0, len(prompt) :].tolist())


def test_rows_joining_and_leaving_in_any_order_decode_as_they_do_alone(model: Any) -> None:
    # Short prompts first, then longer ones (the buffers grow to the left), more rows than the first slots (they
    # grow in number), replies past the spare columns (they grow to the right), rows leaving from the middle.
    rng = random.Random(0)
    plan = [
        (step, [rng.randrange(3, 250) for _ in range(length)], rng.randrange(1, 150))
        for step, length in [
            (0, 5),
            (0, 9),
            (2, 40),
            (3, 7),
            (3, 180),
            (10, 60),
            (10, 3),
            (11, 220),
            (40, 30),
            (41, 90),
            (130, 12),
            (131, 300),
            (200, 8),
        ]
    ]
    shared, rows = batch(model, slots=2), {}
    step = 0
    with torch.inference_mode():
        while step <= max(s for s, _, _ in plan) or shared.rows:
            new = [row(prompt, n) for s, prompt, n in plan if s == step]
            rows.update({id(r): r for r in new})
            shared.advance(new)
            step += 1
    got = [r.tokens for r in rows.values()]
    assert got == [alone(model, prompt, n) for _, prompt, n in plan]
    assert all(len(tokens) == n for tokens, (_, _, n) in zip(got, plan, strict=True))


def test_rows_join_and_leave_in_place_while_there_is_room(model: Any) -> None:
    shared = batch(model, slots=4)
    with torch.inference_mode():
        shared.advance([row([5, 6, 7, 8, 9, 10], 30), row([11, 12, 13], 2)])
        buffer = shared.slots.keys[0].data_ptr()
        for _ in range(3):
            shared.advance([])  # the two-token row leaves: the other stays where it is
        shared.advance([row([20, 21, 22, 23], 5)])  # joins the free slot
        assert len(shared) == 2 and shared.slots.keys[0].data_ptr() == buffer
        shared.advance([row(list(range(30, 30 + 200)), 3)])  # longer than the columns before `end`: reallocated
        assert shared.slots.keys[0].data_ptr() != buffer


def test_a_slot_hides_what_its_former_row_left_there(model: Any) -> None:
    cache = SlotCache(model, max_slots=4)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim

    def join(length: int) -> None:  # a row whose keys are all cached: no forward needed to place it
        kv = [torch.ones(heads, length, dim)] * model.config.num_hidden_layers
        step = cache.open_step([length])
        step.add_row(length, length, kv, kv)
        cache.end += 1

    join(50)
    join(20)  # the 50-token row took a step too: 51
    cache.remove(0)  # the 20-token row moves into slot 0, over the 51-token row
    join(5)  # a new row in the slot the 20-token row left
    cache.trim()
    step = cache.open_step([])
    step.close()
    assert step.decode_mask is not None
    # Each row's own columns and the one decoded now.
    assert step.decode_mask[:, 0, 0].long().tolist() == [[1] * 22, [0] * 16 + [1] * 6]


def test_rows_from_cached_prefixes_decode_as_generate_does(model: Any) -> None:
    # Conversation turns: each next prompt extends an earlier prompt and its reply, and joins while others run.
    rng = random.Random(1)
    system = [rng.randrange(3, 250) for _ in range(40)]
    shared = batch(model, slots=4, prefix_tokens=10_000)
    first = [row(system + [rng.randrange(3, 250) for _ in range(n)], 20) for n in (5, 30)]
    with torch.inference_mode():
        shared.advance(first)
        while shared.rows:
            shared.advance([])
        turns = [row(r.prompt_ids + r.tokens + [7, 8, 9], 15) for r in first]
        shared.advance([row(system + [11, 12], 40)])
        shared.advance(turns)
        while shared.rows:
            shared.advance([])
    assert shared.stats["reused_tokens"] >= 2 * 40 + 2 * (20 - 1)
    for r in [*first, *turns]:
        assert r.tokens == alone(model, r.prompt_ids, r.max_new_tokens)


def test_rows_arriving_together_compute_a_shared_prefix_once(model: Any) -> None:
    rng = random.Random(2)
    system = [rng.randrange(3, 250) for _ in range(40)]
    prompts = [system + [rng.randrange(3, 250) for _ in range(n)] for n in (3, 9, 5)]
    shared = batch(model, slots=4, prefix_tokens=10_000)
    rows = [row(p, 6) for p in prompts]
    with torch.inference_mode():
        shared.advance(rows)  # the first row now; the others wait for its prompt's keys
        assert [r.tokens != [] for r in rows] == [True, False, False] and len(shared) == 3
        while shared.rows or shared.deferred:
            shared.advance([])
    assert shared.stats["prefill_tokens"] == 40 + 3 + 9 + 5  # the system prompt once, as one at a time
    assert [r.tokens for r in rows] == [alone(model, p, 6) for p in prompts]

"""ContinuousBatch on a tiny random Llama: rows joining and leaving in any order decode exactly as they do alone, and
the slot cache admits and drops rows in place, reallocating only when slots or columns run out."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from runtime.models.continuous import ContinuousBatch, Row, SlotCache
from tests.helpers import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batch(model: Any, slots: int = 4, prefix_tokens: int = 0) -> ContinuousBatch:
    return ContinuousBatch(model, tokenizer=None, eos_ids=set(), prefix_tokens=prefix_tokens, slots=slots)


def row(prompt: list[int], new_tokens: int) -> Row:
    return Row(prompt_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


def alone(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    one, solo = batch(model), row(prompt, new_tokens)
    with torch.inference_mode():
        while not one.advance([] if one.rows or solo.tokens else [solo]):
            pass
    return solo.tokens


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
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads

    def kv(length: int) -> list[torch.Tensor]:
        return [torch.ones(heads, length, dim)] * model.config.num_hidden_layers

    cache.place(kv(50), kv(50))
    cache.place(kv(20), kv(20))
    cache.remove(0)  # the 20-token row moves into slot 0, over the 50-token row
    cache.place(kv(5), kv(5))  # a new row in the slot the 20-token row left
    cache.trim()
    _, mask = cache.open_column()
    assert mask.tolist() == [[1] * 21, [0] * 15 + [1] * 6]  # each row's own columns and the one decoded now

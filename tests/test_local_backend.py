"""LocalBackend on a tiny random Llama built in the test: micro-batching, usage, option scoring, LoRA adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from runtime.errors import BackendError, ConfigError
from runtime.models.backend import GenerationSettings, Message
from runtime.models.cache import CachedBackend
from runtime.models.local import LocalBackend
from tests.helpers import build_tiny_model

GREEDY = GenerationSettings(max_new_tokens=10)
PROMPTS = [
    "Who was late to the meeting?",
    "The answer is (B).",
    "Tomorrow is 11/12/2019. What is the date one year ago from today in MM/DD/YYYY?",
    "red",
    "Options: (A) red (B) blue (C) green. Which one is the colour of the sky on a clear day, usually?",
    "0 1 2 3",
    "The quick brown fox jumps over the lazy dog.",
    "Answer with the letter of the correct option, like (A) or (B). Who was late? The older adult or the young man?",
]


def chat(text: str) -> list[Message]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> LocalBackend:
    # float32: bf16 kernels may round a batched row differently from the same row alone.
    return LocalBackend(tiny_model, device="cpu", dtype="float32")


def write_lora(tiny_model: Path, path: Path, seed: int = 1, r: int = 8) -> Path:
    """Save a random LoRA adapter for ``tiny_model`` into ``path`` (replacing what is there)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    # init_lora_weights=False: random B as well as A, so the adapter changes outputs from the first step.
    config = LoraConfig(r=r, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tiny_model, tmp_path_factory.mktemp("lora") / "tuned")


async def one_at_a_time(backend: LocalBackend, prompts: list[str], settings: GenerationSettings, adapter=None):
    return [await backend.generate(chat(p), settings, adapter) for p in prompts]


def counters(backend: LocalBackend) -> dict[str, float]:
    return dict(backend.stats)


def delta(backend: LocalBackend, before: dict[str, float]) -> dict[str, float]:
    return {k: backend.stats[k] - before[k] for k in before}


async def test_concurrent_calls_batch_and_match_one_at_a_time(backend: LocalBackend) -> None:
    before = counters(backend)
    alone = await one_at_a_time(backend, PROMPTS, GREEDY)
    serial = delta(backend, before)
    assert serial["forwards"] == sum(g.usage.completion_tokens for g in alone)  # one prefill + a step per token

    before = counters(backend)
    together = await asyncio.gather(*(backend.generate(chat(p), GREEDY) for p in PROMPTS))
    shared = delta(backend, before)
    assert shared["prefill_rows"] == len(PROMPTS) and shared["admissions"] == 1  # all joined at once
    assert shared["decode_steps"] == max(g.usage.completion_tokens for g in together) - 1  # steps shared by all rows

    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.usage for g in together] == [g.usage for g in alone]
    assert len({g.text for g in alone}) > 1  # the prompts really lead to different replies


async def test_max_batch_size_caps_the_rows_decoded_together(tiny_model: Path) -> None:
    small = LocalBackend(tiny_model, device="cpu", dtype="float32", max_batch_size=3)
    settings = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    results = await asyncio.gather(*(small.generate(chat(p), settings) for p in PROMPTS))
    assert [g.usage.completion_tokens for g in results] == [10] * len(PROMPTS)
    assert small.stats["prefill_rows"] == len(PROMPTS) and small.stats["slot_tokens"] == len(PROMPTS) * 9
    assert small.stats["decode_steps"] >= len(PROMPTS) * 9 / 3  # never more than 3 rows a step
    await small.aclose()


async def test_a_request_joins_a_running_batch_and_finished_rows_leave(backend: LocalBackend) -> None:
    long = GenerationSettings(max_new_tokens=24, ignore_eos=True)
    short = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    alone_long = [await backend.generate(chat(p), long) for p in PROMPTS[:3]]
    alone_late = await backend.generate(chat(PROMPTS[5]), short)

    before = counters(backend)
    running = [asyncio.create_task(backend.generate(chat(p), long)) for p in PROMPTS[:3]]
    while backend.stats["decode_steps"] - before["decode_steps"] < 5:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.001)  # the batch is mid-reply once five steps ran
    late = await backend.generate(chat(PROMPTS[5]), short)
    assert not all(t.done() for t in running)  # answered while the long replies still decode
    together = await asyncio.gather(*running)
    shared = delta(backend, before)
    assert shared["prefill_rows"] == 4 and shared["decode_steps"] == 23  # the late row rode along, no extra steps
    assert [g.text for g in together] == [g.text for g in alone_long] and late.text == alone_late.text


async def test_usage_counts_prompt_and_reply_tokens(backend: LocalBackend) -> None:
    settings = GenerationSettings(max_new_tokens=7)
    results = await asyncio.gather(*(backend.generate(chat(p), settings) for p in PROMPTS))
    for prompt, generation in zip(PROMPTS, results, strict=True):
        rendered = backend.tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
        expected = len(backend.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        assert generation.usage.prompt_tokens == expected  # padding is not counted
        assert 1 <= generation.usage.completion_tokens <= settings.max_new_tokens
        if generation.finish_reason == "length":
            assert generation.usage.completion_tokens == settings.max_new_tokens


async def test_ignore_eos_generates_exactly_max_new_tokens(backend: LocalBackend) -> None:
    settings = GenerationSettings(max_new_tokens=9, ignore_eos=True)
    results = await asyncio.gather(*(backend.generate(chat(p), settings) for p in PROMPTS[:4]))
    assert [g.usage.completion_tokens for g in results] == [9] * 4
    assert {g.finish_reason for g in results} == {"length"}


async def test_ignore_eos_overrides_a_model_that_always_stops(tiny_model: Path) -> None:
    stopper = LocalBackend(tiny_model, device="cpu", dtype="float32")
    assert stopper.tokenizer.eos_token_id == 0
    with torch.no_grad():
        stopper.model.lm_head.weight.zero_()  # all logits tie, greedy takes the first id: EOS
    stopped = await stopper.generate(chat("hello"), GenerationSettings(max_new_tokens=6))
    assert (stopped.usage.completion_tokens, stopped.finish_reason, stopped.text) == (1, "stop", "")
    forced = await stopper.generate(chat("hello"), GenerationSettings(max_new_tokens=6, ignore_eos=True))
    assert (forced.usage.completion_tokens, forced.finish_reason) == (6, "length")
    await stopper.aclose()


async def test_mixed_settings_share_a_batch_and_each_row_keeps_its_own(backend: LocalBackend) -> None:
    short = GenerationSettings(max_new_tokens=3, ignore_eos=True)
    long = GenerationSettings(max_new_tokens=8)
    sampled = GenerationSettings(max_new_tokens=8, temperature=0.9, seed=11, ignore_eos=True)
    plan = [(p, (short, long, sampled)[i % 3]) for i, p in enumerate(PROMPTS)]
    alone = [await backend.generate(chat(p), s) for p, s in plan]

    before = counters(backend)
    together = await asyncio.gather(*(backend.generate(chat(p), s) for p, s in plan))
    shared = delta(backend, before)
    assert shared["admissions"] == 1  # every setting in one batch
    assert [g.text for g in together] == [g.text for g in alone]  # sampled rows too: each has its own seeded RNG
    assert [g.usage.completion_tokens for g in together][0::3] == [3, 3, 3]


async def test_sampling_follows_the_seed(backend: LocalBackend) -> None:
    def seeded(seed: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)

    a, b, c = await asyncio.gather(*(backend.generate(chat("red"), seeded(s)) for s in (1, 1, 2)))
    assert a.text == b.text != c.text


async def test_stop_strings_end_a_reply(backend: LocalBackend) -> None:
    free = await backend.generate(chat(PROMPTS[2]), GenerationSettings(max_new_tokens=16, ignore_eos=True))
    stop = free.text.split()[1] if len(free.text.split()) > 1 else free.text[:2]
    cut = await backend.generate(chat(PROMPTS[2]), GenerationSettings(max_new_tokens=16, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text) and cut.usage.completion_tokens < 16


async def test_shared_prefixes_are_computed_once_and_change_no_reply(tiny_model: Path, backend: LocalBackend) -> None:
    plain = LocalBackend(tiny_model, device="cpu", dtype="float32", prefix_cache_mb=0)
    first_turn = [await plain.generate(chat(p), GREEDY) for p in PROMPTS[:3]]
    follow_ups = [
        [*chat(p), {"role": "assistant", "content": g.text}, {"role": "user", "content": "Are you sure?"}]
        for p, g in zip(PROMPTS[:3], first_turn, strict=True)
    ]
    expected = [await plain.generate(m, GREEDY) for m in follow_ups]
    assert plain.stats["reused_tokens"] == 0
    await plain.aclose()

    cached = LocalBackend(tiny_model, device="cpu", dtype="float32")
    before = counters(cached)
    again = [await cached.generate(chat(p), GREEDY) for p in PROMPTS[:3]]
    system_only = delta(cached, before)["reused_tokens"]
    assert system_only > 0  # the second and third prompt reuse the system prompt of the first
    before = counters(cached)
    follow = [await cached.generate(m, GREEDY) for m in follow_ups]
    turns = delta(cached, before)
    assert turns["reused_tokens"] > turns["prefill_tokens"]  # a follow-up turn mostly starts from the cache
    assert [g.text for g in again] == [g.text for g in first_turn] and [g.text for g in follow] == [
        g.text for g in expected
    ]
    await cached.aclose()


def test_backend_serves_successive_event_loops(backend: LocalBackend) -> None:
    first = asyncio.run(backend.generate(chat("red"), GREEDY))
    second = asyncio.run(backend.generate(chat("red"), GREEDY))  # a new loop needs a new worker, not a hang
    assert first.text == second.text


async def test_score_options_matches_a_manual_log_likelihood(backend: LocalBackend) -> None:
    messages = chat("Which is the colour of the sky? Options: (A) red (B) blue (C) green")
    options = ["(A) red", "(B) blue", "(C) green and a much longer option that pads the others"]
    scores = await backend.score_options(messages, options)
    assert len(scores) == len(options)
    assert all(isinstance(s, float) and s < 0 for s in scores)
    assert len(set(scores)) == len(options)

    tokenizer, model = backend.tokenizer, backend.model
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    option_ids = tokenizer(options[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
    manual = sum(float(logprobs[len(prompt_ids) - 1 + k, token]) for k, token in enumerate(option_ids))
    assert scores[1] == pytest.approx(manual, abs=1e-3)  # "(B) blue" sat left-padded in a batch of three


async def test_score_options_concurrent_calls_match_one_at_a_time(backend: LocalBackend) -> None:
    questions = [("red or blue?", ["red", "blue"]), ("pick a number", ["1", "2", "100", "2024"])]
    alone = [await backend.score_options(chat(q), opts) for q, opts in questions]
    together = await asyncio.gather(*(backend.score_options(chat(q), opts) for q, opts in questions))
    assert [len(s) for s in together] == [2, 4]
    for a, b in zip(alone, together, strict=True):
        assert a == pytest.approx(b, abs=1e-3)


async def test_score_options_needs_options(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="at least one option"):
        await backend.score_options(chat("hi"), [])


async def test_lora_adapter_changes_output_and_leaves_the_base_alone(tiny_model: Path, lora_adapter: Path) -> None:
    fresh = LocalBackend(tiny_model, device="cpu", dtype="float32")
    base_before = await one_at_a_time(fresh, PROMPTS[:3], GREEDY)
    base_scores = await fresh.score_options(chat("red or blue?"), ["red", "blue"])
    await fresh.aclose()

    tuned = LocalBackend(tiny_model, device="cpu", dtype="float32")
    tuned.load_adapter("tuned", lora_adapter)
    assert tuned.adapters == {"tuned": str(lora_adapter)}
    with_adapter = await one_at_a_time(tuned, PROMPTS[:3], GREEDY, adapter="tuned")
    without = await one_at_a_time(tuned, PROMPTS[:3], GREEDY, adapter=None)
    assert [g.text for g in without] == [g.text for g in base_before]
    assert [g.text for g in with_adapter] != [g.text for g in base_before]

    # Both groups in flight at once: each batch uses its own adapter setting.
    mixed = await asyncio.gather(
        *(tuned.generate(chat(p), GREEDY, adapter) for p in PROMPTS[:3] for adapter in ("tuned", None))
    )
    assert [g.text for g in mixed[0::2]] == [g.text for g in with_adapter]
    assert [g.text for g in mixed[1::2]] == [g.text for g in base_before]

    assert await tuned.score_options(chat("red or blue?"), ["red", "blue"]) == pytest.approx(base_scores, abs=1e-4)
    tuned_scores = await tuned.score_options(chat("red or blue?"), ["red", "blue"], adapter="tuned")
    assert tuned_scores != pytest.approx(base_scores, abs=1e-4)
    await tuned.aclose()


async def test_adapter_given_at_construction(tiny_model: Path, lora_adapter: Path) -> None:
    tuned = LocalBackend(tiny_model, adapters={"tuned": lora_adapter}, device="cpu", dtype="float32")
    plain = LocalBackend(tiny_model, device="cpu", dtype="float32")
    assert tuned.describe()["adapters"] == {"tuned": str(lora_adapter)}
    a = await tuned.generate(chat("red"), GREEDY, adapter="tuned")
    b = await tuned.generate(chat("red"), GREEDY)
    c = await plain.generate(chat("red"), GREEDY)
    assert b.text == c.text != a.text
    await tuned.aclose()
    await plain.aclose()


async def test_an_adapter_retrained_in_place_gets_new_answers_through_the_cache(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The response cache keys an adapter by its content: same folder, new weights, new answers."""
    adapter, cache_file = tmp_path / "assistant", tmp_path / "responses.sqlite"
    chats = [chat(p) for p in PROMPTS[:4]]

    async def answers(backend: LocalBackend) -> tuple[list[str], list[str]]:
        """(through the cache, straight from the backend), greedy with the adapter."""
        cached = CachedBackend(backend, cache_file)
        through = [(await cached.generate(c, GREEDY, "tuned")).text for c in chats]
        direct = [(await backend.generate(c, GREEDY, "tuned")).text for c in chats]
        cached._db.close()
        return through, direct

    write_lora(tiny_model, adapter, seed=1)
    first = LocalBackend(tiny_model, adapters={"tuned": adapter}, device="cpu", dtype="float32")
    old, _ = await answers(first)

    write_lora(tiny_model, adapter, seed=2, r=4)  # retrained in place: the same folder, other weights and rank
    again = LocalBackend(tiny_model, adapters={"tuned": adapter}, device="cpu", dtype="float32")  # a later command
    new, fresh = await answers(again)
    assert fresh != old  # the retrained adapter answers otherwise ...
    assert new == fresh  # ... and the cache gives its answers, not the old adapter's
    assert again.describe()["adapter_sha256"]["tuned"] != first.describe()["adapter_sha256"]["tuned"]

    write_lora(tiny_model, adapter, seed=3, r=4)  # another rank than the one loaded
    first.load_adapter("tuned", adapter)  # reloaded in the same process: no stale weights or cached prefixes
    reloaded, fresh = await answers(first)
    third = LocalBackend(tiny_model, adapters={"tuned": adapter}, device="cpu", dtype="float32")
    assert reloaded == fresh == (await answers(third))[1] != new
    for backend in (first, again, third):
        await backend.aclose()


async def test_unknown_adapter_is_a_backend_error(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="unknown adapter 'nope'.*none loaded"):
        await backend.generate(chat("hi"), GREEDY, adapter="nope")
    with pytest.raises(BackendError, match="unknown adapter 'nope'"):
        await backend.score_options(chat("hi"), ["a"], adapter="nope")


def test_adapter_folder_without_config_is_a_config_error(backend: LocalBackend, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="adapter_config.json"):
        backend.load_adapter("broken", tmp_path)
    assert backend.adapters == {}


def test_model_folder_without_config_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        LocalBackend(tmp_path / "empty")
    with pytest.raises(ConfigError, match="max_batch_size"):
        LocalBackend(tmp_path / "empty", max_batch_size=0)


def test_describe_names_the_model(backend: LocalBackend, tiny_model: Path) -> None:
    described = backend.describe()
    assert described["kind"] == "local"
    assert described["model_id"] == "tiny-llama"
    assert described["path"] == str(tiny_model)
    assert described["dtype"] == "float32"


def test_prefix_store_finds_the_longest_common_prefix_and_keeps_its_budget() -> None:
    from runtime.models.continuous import PrefixStore

    def kv(n: int) -> list[torch.Tensor]:
        return [torch.arange(n, dtype=torch.float32).reshape(1, n, 1)]

    store = PrefixStore(budget_tokens=10)
    store.put([1, 2, 3], kv(3), kv(3))
    store.put([1, 2, 3, 4, 5], kv(5), kv(5))  # the stored [1, 2, 3] is now redundant
    assert store.tokens == 5
    n, keys, _ = store.longest([1, 2, 3, 9])
    assert n == 3 and keys[0].shape == (1, 5, 1)  # the caller takes the first n positions
    assert store.longest([7, 1, 2])[0] == 0
    store.put([6, 6, 6, 6], kv(4), kv(4))
    store.put([8, 8, 8], kv(3), kv(3))  # 12 tokens > 10: the least recently used entry goes
    assert store.tokens == 7 and store.longest([1, 2])[0] == 0 and store.longest([8, 8])[0] == 2
    store.put(list(range(11)), kv(11), kv(11))  # larger than the whole budget: not stored
    assert store.tokens == 7


async def test_an_untemplatable_request_fails_alone(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = LocalBackend(tiny_model, device="cpu", dtype="float32")
    render = local.tokenizer.apply_chat_template

    def picky(messages, **kwargs):
        if any(m["content"] == "boom" for m in messages):
            raise ValueError("template refused the messages")
        return render(messages, **kwargs)

    monkeypatch.setattr(local.tokenizer, "apply_chat_template", picky)
    good, bad = await asyncio.gather(
        local.generate(chat("red"), GREEDY), local.generate(chat("boom"), GREEDY), return_exceptions=True
    )
    assert isinstance(bad, BackendError) and "template refused" in str(bad)
    assert not isinstance(good, BaseException) and good.usage.completion_tokens > 0
    assert (await local.generate(chat("blue"), GREEDY)).usage.completion_tokens > 0  # the worker lives on
    await local.aclose()

"""Benchmarks that print ratios measured side by side in one run (machines are shared and noisy)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from runtime.backend import Backend, GenerationSettings

# Plain, varied prompts: the rate depends on lengths, not content.
_PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short story about a lighthouse keeper.",
    "List some facts about the planet Mars.",
    "Describe how a bicycle works.",
    "What should I pack for a weekend hike?",
    "Summarise the rules of chess.",
    "Give advice for learning a new language.",
    "Describe the water cycle.",
]


def _prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{_PROMPTS[i % len(_PROMPTS)]} (request {i})"}]


async def generate_rate(
    backend: Backend,
    *,
    concurrency: int = 32,
    max_new_tokens: int = 64,
    repeats: int = 3,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s of one prompt at a time vs ``concurrency`` prompts at once, medians over ``repeats``.

    Every request generates exactly ``max_new_tokens`` (EOS ignored), so both sides do the same work per request.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
    await backend.generate(_prompt(0), settings)  # warm-up: first-call allocations are not the backend's rate

    async def single() -> float:
        started, tokens = time.perf_counter(), 0
        for i in range(2):
            tokens += (await backend.generate(_prompt(i), settings)).usage.completion_tokens
        return tokens / (time.perf_counter() - started)

    async def batched() -> float:
        started = time.perf_counter()
        results = await asyncio.gather(*(backend.generate(_prompt(i), settings) for i in range(concurrency)))
        return sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - started)

    single_rates, batched_rates = [], []
    for r in range(repeats):  # interleaved, so drift in machine load hits both sides alike
        single_rates.append(await single())
        batched_rates.append(await batched())
        if on_step is not None:
            on_step(
                f"repeat {r + 1}/{repeats}: 1 at a time {single_rates[-1]:.1f} tok/s, "
                f"{concurrency} at once {batched_rates[-1]:.1f} tok/s"
            )
    single_median, batched_median = statistics.median(single_rates), statistics.median(batched_rates)
    return {
        "backend": backend.describe(),
        "max_new_tokens": max_new_tokens,
        "concurrency": concurrency,
        "repeats": repeats,
        "single_tok_s": round(single_median, 2),
        "batched_tok_s": round(batched_median, 2),
        "ratio": round(batched_median / single_median, 2),
        "single_runs": [round(x, 2) for x in single_rates],
        "batched_runs": [round(x, 2) for x in batched_rates],
    }

"""Benchmarks that print ratios measured side by side in one run (machines are shared and noisy), and the code
sandbox's check: canonical solutions pass, broken ones fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.examination import embed_queries, retrieve, run_exam
from agents.gathering import run_gathering
from agents.team import Roles
from runtime.data.graders import program
from runtime.data.rundir import RunDir
from runtime.data.sandbox import Sandbox
from runtime.data.tasks import Example
from runtime.defaults import CONCURRENCY, RETRIEVAL_K, RETRIEVAL_THRESHOLD
from runtime.models.backend import Backend, GenerationSettings, Message
from runtime.models.torch_thread import run_torch

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


def _prompt(i: int) -> list[Message]:
    return [{"role": "user", "content": f"{_PROMPTS[i % len(_PROMPTS)]} (request {i})"}]


async def generate_rate(
    backend: Backend,
    *,
    concurrency: int = CONCURRENCY,
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


async def prefill_rate(backend: Backend, *, prompt_words: int = 400, repeats: int = 3) -> dict[str, Any]:
    """Prompt tokens/s of a long prompt answered with one token, median over ``repeats``: the rate of the backend's
    matrix products over a whole batch of tokens at once, so the most any number of requests in flight can decode.

    Each repeat's prompt starts differently, so a server's prompt cache has no prefix to reuse.
    """
    settings = GenerationSettings(max_new_tokens=1)
    words = " ".join(_PROMPTS).split()
    rates = []
    for r in range(repeats + 1):  # the first is a warm-up
        text = f"Request {r}. " + " ".join(words[i % len(words)] for i in range(prompt_words))
        started = time.perf_counter()
        usage = (await backend.generate([{"role": "user", "content": text}], settings)).usage
        rates.append(usage.prompt_tokens / (time.perf_counter() - started))
    return {"prompt_tokens_per_s": round(statistics.median(rates[1:]), 2), "repeats": repeats}


async def plain_generate_rate(
    backend: Any,
    *,
    concurrency: int = CONCURRENCY,
    max_new_tokens: int = 64,
    repeats: int = 3,
) -> dict[str, Any]:
    """transformers' own ``generate`` on a local backend's model (same weights, device and dtype): one prompt at a
    time and ``concurrency`` prompts in one left-padded batch, greedy, ``max_new_tokens`` each (EOS ignored), the
    same prompts as ``generate_rate``: the baseline that redpen's continuous batching replaces."""
    import torch

    model, tokenizer = backend.model, backend.tokenizer

    def rate(prompts: list[list[Message]]) -> float:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(backend.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        if backend.device.startswith("cuda"):
            torch.cuda.synchronize()
        new_tokens = int(out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
        return new_tokens / (time.perf_counter() - started)

    def measure() -> tuple[list[float], list[float]]:
        rate([_prompt(0)])  # warm-up, as generate_rate does
        single = [statistics.mean(rate([_prompt(i)]) for i in range(2)) for _ in range(repeats)]
        batched = [rate([_prompt(i) for i in range(concurrency)]) for _ in range(repeats)]
        return single, batched

    single, batched = await run_torch(measure)
    return {
        "single_tok_s": round(statistics.median(single), 2),
        "batched_tok_s": round(statistics.median(batched), 2),
        "single_runs": [round(x, 2) for x in single],
        "batched_runs": [round(x, 2) for x in batched],
    }


async def _pipeline_pass(
    roles: Roles,
    gather: Sequence[Example],
    examine: Sequence[Example],
    workdir: Path,
    *,
    task: str,
    width: int,
    on_step: Callable[[str], None] | None,
) -> dict[str, Any]:
    """One gather + assisted examine from an empty memory with ``width`` conversations in flight; the result holds
    the answers (to compare passes) and the longest chain of dependent model calls in each phase."""
    from memory.store import MistakeMemory

    name = workdir.name
    for backend in {id(roles.student): roles.student, id(roles.assistant): roles.assistant}.values():
        if hasattr(backend, "clear_prefix_cache"):  # neither pass may start from the other's prompts
            backend.clear_prefix_cache()
    stats_before = dict(getattr(roles.student, "stats", {}))
    run = RunDir(workdir, {"bench": name})
    memory = MistakeMemory(path=workdir / "memory")
    try:
        # CPU time too: the process's, and this thread's, which runs the event loop every conversation shares.
        started, cpu_started, loop_started = time.perf_counter(), time.process_time(), time.thread_time()
        episodes, queries = await asyncio.gather(
            run_gathering(gather, roles, memory, run, task=task, concurrency=width), embed_queries(memory, examine)
        )
        hits = retrieve(memory, examine, roles.student_id, task, RETRIEVAL_K, RETRIEVAL_THRESHOLD, queries=queries)
        exams = await run_exam(examine, roles, run, "exam.jsonl", mode="assisted", hits=hits, concurrency=width)
        elapsed = time.perf_counter() - started
        cpu_s, loop_cpu_s = time.process_time() - cpu_started, time.thread_time() - loop_started
    finally:
        memory.close()
    tokens = sum(e.completion_tokens for e in episodes) + sum(r.completion_tokens for r in exams)
    result = {
        "items": len(episodes) + len(exams),
        "seconds": round(elapsed, 2),
        "items_per_s": round((len(episodes) + len(exams)) / elapsed, 4),
        "completion_tokens": tokens,
        "tok_s": round(tokens / elapsed, 2),
        "cpu_s": round(cpu_s, 2),
        "loop_cpu_s": round(loop_cpu_s, 2),
        "answers": [e.first_answer for e in episodes] + [r.reply for r in exams],
        # A gathering episode is the first answer, then (feedback, answer) per round; an assisted exam item is the
        # assistant's guidance (when something was retrieved), then the answer. Examining waits for all gathering.
        "longest_chain": {
            "gather": max((1 + 2 * e.rounds for e in episodes), default=0),
            "examine": max((1 + bool(r.guidance) for r in exams), default=0),
        },
        # Decode steps along the costliest chain (a call's first token comes from its prefill, each further token
        # from a step of its own): no pass, however batched, takes fewer.
        "longest_chain_steps": max((e.completion_tokens - 1 - 2 * e.rounds for e in episodes), default=0)
        + max((r.completion_tokens - 1 - bool(r.guidance) for r in exams), default=0),
    }
    stats = getattr(roles.student, "stats", None)
    if stats is not None:  # the local backend's profile: how full the batches were and where time went
        delta = {k: stats[k] - stats_before.get(k, 0) for k in stats}
        model_s = delta["prefill_s"] + delta["decode_s"]  # a forward that prefilled counts as prefill
        result["profile"] = {
            "forwards": int(delta["forwards"]),
            "decode_steps": int(delta["decode_steps"]),
            "mixed_steps": int(delta["mixed_steps"]),  # decode steps that rode along a prefill
            "slot_tokens": int(delta["slot_tokens"]),  # tokens decoded, a row's token per step it was in
            "mean_rows_per_step": round(delta["slot_tokens"] / max(delta["decode_steps"], 1), 2),
            "prefills": int(delta["prefill_rows"]),
            "mean_rows_per_admission": round(delta["prefill_rows"] / max(delta["admissions"], 1), 2),
            "prefill_tokens": int(delta["prefill_tokens"]),
            "reused_prefix_tokens": int(delta["reused_tokens"]),
            "prefill_share_of_model_time": round(delta["prefill_s"] / max(model_s, 1e-9), 3),
            "merge_share_of_model_time": round(delta["merge_s"] / max(model_s, 1e-9), 3),
            "share_of_time_in_model": round(model_s / elapsed, 3),
        }
    if on_step is not None:
        on_step(
            f"{name}: {result['items']} items in {result['seconds']} s, {result['items_per_s']} items/s, "
            f"{result['tok_s']} tok/s"
        )
    return result


async def pipeline_rate(
    roles: Roles,
    gather: Sequence[Example],
    examine: Sequence[Example],
    workdir: Path,
    *,
    task: str,
    concurrency: int = CONCURRENCY,
    generate_concurrency: int = CONCURRENCY,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The same gather + assisted examine, one example at a time and then concurrently, in one process.

    Each pass starts from an empty memory. Also measures the backend's ``generate`` rate one at a time and batched
    in the same process: the pipeline's token rate is given as a fraction of the batched rate and, on the local
    backend, the speedup as a share of the ceiling the serial pass's profile allows (``cpu_ceiling``).
    """
    # Warm-up: first-call allocations would otherwise land in the serial pass, which runs first, and inflate both
    # the speedup and the serial prefill share the ceiling is computed from.
    await roles.student.generate(_prompt(0), GenerationSettings(max_new_tokens=8))
    serial = await _pipeline_pass(
        roles, gather, examine, workdir / "one-at-a-time", task=task, width=1, on_step=on_step
    )
    concurrent = await _pipeline_pass(
        roles, gather, examine, workdir / "concurrent", task=task, width=concurrency, on_step=on_step
    )
    generate = await generate_rate(roles.student, concurrency=generate_concurrency, repeats=1, on_step=on_step)
    same = sum(a == b for a, b in zip(serial.pop("answers"), concurrent.pop("answers"), strict=True))
    speedup = concurrent["items_per_s"] / serial["items_per_s"]
    result = {
        "n_gather": len(gather),
        "n_examine": len(examine),
        "concurrency": concurrency,
        "one_at_a_time": serial,
        "concurrent": concurrent,
        "speedup": round(speedup, 2),
        "generate_single_tok_s": generate["single_tok_s"],
        "generate_batched_tok_s": generate["batched_tok_s"],
        "pipeline_fraction_of_generate": round(concurrent["tok_s"] / generate["batched_tok_s"], 3),
        "identical_answers": same,
        "answers_compared": serial["items"],
    }
    if "profile" in serial:  # the local backend: the ceiling its own profile allows
        prefill_share = serial["profile"]["prefill_share_of_model_time"]
        ceiling = cpu_ceiling(prefill_share, generate["ratio"])
        result["ceiling"] = {
            "serial_prefill_share": prefill_share,
            "decode_speedup": generate["ratio"],  # tok/s of generate_concurrency prompts at once over one at a time
            "decode_rows": generate_concurrency,
            "speedup": round(ceiling, 2),
            "share_achieved": round(speedup / ceiling, 3),
        }
        chained = chain_ceiling(
            prefill_share,
            generate["ratio"],
            generate_concurrency,
            chain_steps=concurrent["longest_chain_steps"],
            row_tokens=serial["profile"]["decode_steps"],  # one at a time, a decode step is one row's token
        )
        result["chain_ceiling"] = {
            "chain_steps": concurrent["longest_chain_steps"],
            "row_tokens": serial["profile"]["decode_steps"],
            "speedup": round(chained, 2),
            "share_achieved": round(speedup / chained, 3),
        }
    return result


def cpu_ceiling(prefill_share: float, decode_speedup: float) -> float:
    """The most a concurrent pass can gain over one at a time (Amdahl's law): the serial pass's prefill, a
    ``prefill_share`` of its model time, gains nothing (compute-bound, one row per forward), and its decoding gains
    what batching gives (``decode_speedup``, batched over one-row tok/s).

    >>> round(cpu_ceiling(0.4, 6.0), 2)  # 0.4 + 0.6 / 6 = 0.5 of the serial time
    2.0
    >>> cpu_ceiling(0.0, 6.0)  # nothing serial: all of the batching gain
    6.0
    """
    return 1 / (prefill_share + (1 - prefill_share) / decode_speedup)


def chain_ceiling(
    prefill_share: float, decode_speedup: float, rows: int, *, chain_steps: int, row_tokens: int
) -> float:
    """``cpu_ceiling`` with the decode steps the workload's dependencies force: ``row_tokens`` tokens decoded in
    no fewer than ``chain_steps`` steps (its longest chain of dependent calls), at most ``rows`` a step.

    In units of a one-row step, a step of ``r`` rows costs at least ``1 + (r - 1) * (rows / decode_speedup - 1) /
    (rows - 1)`` (the chord from one row to ``rows``; a step's cost grows no faster than that, as every step reads
    the weights once), so the decoding costs at least ``chain_steps`` one-row steps plus the extra rows at the
    chord's slope, and no less than all rows at the full batch's rate. Without dependencies (one step) this is
    ``cpu_ceiling``; the longer the chain, the fewer rows each step can hold and the lower the ceiling.

    >>> round(chain_ceiling(0.4, 6.0, 32, chain_steps=1, row_tokens=1000), 2)  # no chain: cpu_ceiling(0.4, 6.0)
    2.0
    >>> round(chain_ceiling(0.0, 8.0, 32, chain_steps=100, row_tokens=1000), 2)  # 100 steps of 10 rows at most
    5.34
    """
    steps = max(min(chain_steps, row_tokens), 1)
    slope = (rows / decode_speedup - 1) / (rows - 1)
    decode = max(steps + (row_tokens - steps) * slope, row_tokens / decode_speedup)
    return 1 / (prefill_share + (1 - prefill_share) * decode / row_tokens)


async def latency_rate(
    roles: Roles,
    gather: Sequence[Example],
    examine: Sequence[Example],
    workdir: Path,
    *,
    task: str,
    latency_s: float,
    concurrency: int,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Gather + assisted examine against an endpoint that answers every request after ``latency_s``, against the
    dependency bound: no client can finish sooner than its longest chain of dependent calls times the latency, so
    ``items / (chain * latency)`` is the rate of a client with no overhead of its own."""
    result = await _pipeline_pass(
        roles, gather, examine, workdir / "simulated", task=task, width=concurrency, on_step=on_step
    )
    result.pop("answers")
    chain = result["longest_chain"]["gather"] + result["longest_chain"]["examine"]
    bound = result["items"] / (chain * latency_s)
    return {
        "n_gather": len(gather),
        "n_examine": len(examine),
        "concurrency": concurrency,
        "latency_s": latency_s,
        "simulated": result,
        "dependency_chain_calls": chain,
        "dependency_bound_items_per_s": round(bound, 3),
        "share_of_bound": round(result["items_per_s"] / bound, 3),
    }


def memory_rate(
    workdir: Path,
    *,
    records: int = 100_000,
    queries: int = 200,
    dim: int = 384,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Insert rate and filtered search latency of the embedded engine vs brute force over the same vectors.

    Vectors are random unit vectors (MiniLM's size); embedding cost is left out on purpose, it is the same
    either way. Searches filter on model id and source, as examination does.
    """
    import numpy as np

    from memory.record import MistakeRecord
    from memory.store import MistakeMemory, RecordFilter

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((records + queries, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    models, sources = [f"model-{i}" for i in range(4)], [f"src-{i}" for i in range(10)]
    embedder = _TableEmbedder({f"q{i}": v for i, v in enumerate(vectors)}, dim)
    store = MistakeMemory(path=workdir / "memory", embedder=embedder)
    try:
        started = time.perf_counter()
        for start in range(0, records, 2000):
            store.upsert(
                MistakeRecord.make(
                    model_id=models[i % 4],
                    source=sources[i % 10],
                    task="bench",
                    query=f"q{i}",
                    wrong_answer="(A)",
                    gold="(B)",
                    reason="",
                    guideline="",
                    outcome="uncorrected",
                    rounds=0,
                )
                for i in range(start, min(start + 2000, records))
            )
        insert_s = time.perf_counter() - started
        if on_step is not None:
            on_step(f"inserted {records} records in {insert_s:.1f} s; building the index ...")
        started = time.perf_counter()
        store.optimize()
        index_s = time.perf_counter() - started
        model_of = np.array([i % 4 for i in range(records)])
        source_of = np.array([i % 10 for i in range(records)])
        stored = vectors[:records]
        engine_ms, numpy_ms, agree = [], [], 0
        for q in range(records, records + queries):
            m, s = q % 4, q % 10
            t = time.perf_counter()
            hits = store.search(f"q{q}", k=3, where=RecordFilter(model_id=models[m], source=sources[s]))
            engine_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            mask = (model_of == m) & (source_of == s)
            scores = stored @ vectors[q]
            scores[~mask] = -np.inf
            best = np.argsort(-scores)[:3]
            numpy_ms.append((time.perf_counter() - t) * 1000)
            agree += [h.record.query for h in hits] == [f"q{i}" for i in best]
    finally:
        store.close()
    p50, p95 = float(np.percentile(engine_ms, 50)), float(np.percentile(engine_ms, 95))
    n50, n95 = float(np.percentile(numpy_ms, 50)), float(np.percentile(numpy_ms, 95))
    return {
        "records": records,
        "queries": queries,
        "dim": dim,
        "filter": "model_id + source (1/20 of records)",
        "insert_records_per_s": round(records / insert_s, 1),
        "index_build_s": round(index_s, 1),
        "engine_p50_ms": round(p50, 3),
        "engine_p95_ms": round(p95, 3),
        "numpy_p50_ms": round(n50, 3),
        "numpy_p95_ms": round(n95, 3),
        "numpy_over_engine_p50": round(n50 / p50, 2),
        "same_top3": agree,
    }


class _TableEmbedder:
    """Looks vectors up by text: the memory benchmark measures storage, not embedding."""

    def __init__(self, table: dict[str, Any], dim: int) -> None:
        self.table, self.dim = table, dim

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        return np.stack([self.table[t] for t in texts])


# ---- the code sandbox ----------------------------------------------------------------------------------------------

# Appended after a solution: its entry point's outermost call returns a changed value (recursive calls inside it
# still see the real one), so tests that check the value must fail.
_CHANGE_RETURN = """
def _redpen_changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float, complex)):
        return value + 1
    if isinstance(value, str):
        return value + "\\x00"
    if isinstance(value, (list, tuple)):
        return type(value)([*value, object()])
    if isinstance(value, (set, frozenset)):
        return type(value)([*value, object()])
    if isinstance(value, dict):
        return dict([*value.items(), (object(), None)])
    return object()


def _redpen_outermost_changed(function):
    depth = 0

    def call(*args, **kwargs):
        nonlocal depth
        depth += 1
        try:
            value = function(*args, **kwargs)
        finally:
            depth -= 1
        return _redpen_changed(value) if depth == 0 else value

    return call


NAME = _redpen_outermost_changed(NAME)
"""


def without_last_line(code: str) -> str:
    """A solution with its last non-blank line removed.

    >>> without_last_line("def f(x):\\n    y = x + 1\\n    return y\\n\\n")
    'def f(x):\\n    y = x + 1'
    """
    lines = code.rstrip().splitlines()
    return "\n".join(lines[:-1])


def with_changed_return(code: str, entry_point: str) -> str:
    """A solution whose entry point returns something else than it computed (a bool negated, a number + 1, ...)."""
    return code + "\n" + _CHANGE_RETURN.replace("NAME", entry_point)


async def sandbox_check(
    examples: Sequence[Example], sandbox: Sandbox, on_step: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every canonical solution must pass through the sandbox, and each of two mutants of it must fail: the solution
    with its last line removed, and with its return value changed. All programs run concurrently (the sandbox's
    workers bound them). Returns the counts per source and the ids (with reasons) of every miss."""
    kinds: dict[str, Callable[[Example], str]] = {
        "canonical": lambda e: e.target,
        "last_line_removed": lambda e: without_last_line(e.target),
        "return_changed": lambda e: with_changed_return(e.target, e.metadata["entry_point"]),
    }
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for kind, make in kinds.items():
        runs = await asyncio.gather(*(sandbox.arun(program(e, make(e))) for e in examples))
        expected = kind == "canonical"
        by_source: dict[str, dict[str, int]] = {}
        misses = []
        for example, run in zip(examples, runs, strict=True):
            counts = by_source.setdefault(example.source, {"n": 0, "as_expected": 0})
            counts["n"] += 1
            if run.passed == expected:
                counts["as_expected"] += 1
            else:
                misses.append({"id": example.id, "reason": run.reason})
        results[kind] = {"by_source": by_source, "misses": misses}
        if on_step is not None:
            shown = ", ".join(f"{s} {c['as_expected']}/{c['n']}" for s, c in by_source.items())
            on_step(f"{kind}: {'pass' if expected else 'fail'} as expected: {shown}")
    return {**results, "programs": 3 * len(examples), "seconds": round(time.perf_counter() - started, 2)}


async def sandbox_rate(
    examples: Sequence[Example], sandboxed: Sandbox, unsandboxed: Sandbox, *, rounds: int = 3
) -> dict[str, Any]:
    """Programs per second through bubblewrap vs through the same harness with no namespaces, side by side.

    The canonical solutions of ``examples`` run ``rounds`` times each way, the two interleaved so that drift in the
    machine's load hits both; both run as many programs at once (their workers).
    """
    programs = [program(e, e.target) for e in examples]

    async def rate(sandbox: Sandbox) -> float:
        started = time.perf_counter()
        runs = await asyncio.gather(*(sandbox.arun(p) for p in programs))
        if not all(r.passed for r in runs):
            failed = next(r for r in runs if not r.passed)
            raise RuntimeError(f"a canonical solution failed under --sandbox {sandbox.mode}: {failed.reason}")
        return len(programs) / (time.perf_counter() - started)

    bwrap_rates, none_rates = [], []
    for _ in range(rounds):
        bwrap_rates.append(await rate(sandboxed))
        none_rates.append(await rate(unsandboxed))
    bwrap, none = statistics.median(bwrap_rates), statistics.median(none_rates)
    return {
        "programs": len(programs),
        "rounds": rounds,
        "workers": sandboxed.workers,
        "bwrap_programs_per_s": round(bwrap, 2),
        "none_programs_per_s": round(none, 2),
        "ratio_bwrap_over_none": round(bwrap / none, 3),
        "bwrap_runs": [round(x, 2) for x in bwrap_rates],
        "none_runs": [round(x, 2) for x in none_rates],
    }


# Short common English words: a hog prompt of N of them is ~N tokens of the default model's tokenizer.
_HOG_WORDS = (
    "the of and to in is was for on that with as by at from it his an are were which this be or has had not but "
    "their its they have one been also who all new after first two more other there some time year city war people "
    "state years world most into would only over school part when may used can many later three where during about "
    "such known both while these between through under before each well made since being"
).split()
SMALL_QUESTION = "Name three colours of the rainbow, then count from one to twenty in words."


def hog_prompt(i: int, words: int) -> str:
    """A long document to summarise, different from its first word on for every ``i`` (no shared prefix)."""
    rng = random.Random(i)
    return f"Document {i}: summarise it in one line.\n\n" + " ".join(rng.choice(_HOG_WORDS) for _ in range(words))


async def starvation_rate(
    url: str,
    model: str,
    small_key: str,
    hog_key: str,
    *,
    hogs: Sequence[int] = (1, 4, 32),
    hog_words: int = 7000,
    hog_max_tokens: int = 64,
    small_max_tokens: int = 32,
    samples: int = 3,
    settle_s: float = 2.0,
    rss_mb: Callable[[], float | None] = lambda: None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One key's small request, alone and beside ``hogs`` long requests of another key, on a server at ``url``.

    Per phase the hogs are sent at once, given ``settle_s`` to be admitted (their prompts being computed), then
    ``samples`` small requests are timed one after another; then the hogs' connections are closed, which cancels
    their work, and the next phase starts once ``settle_s`` has passed. The figure is each phase's median latency
    over the median alone; hogs the server refused (429) are counted, as is the server's memory (``rss_mb``).
    """
    import httpx

    def chat(content: str, key: str, max_tokens: int) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        return {"json": body | {"temperature": 0}, "headers": {"Authorization": f"Bearer {key}"}}

    peak_rss: list[float] = []

    async def watch_memory() -> None:
        while True:
            rss = rss_mb()
            if rss is not None:
                peak_rss.append(rss)
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0)) as http:

        async def small() -> float:
            started = time.perf_counter()
            response = await http.post("/chat/completions", **chat(SMALL_QUESTION, small_key, small_max_tokens))
            response.raise_for_status()
            return time.perf_counter() - started

        watcher = asyncio.ensure_future(watch_memory())
        try:
            await small()  # warm: the server has measured its speed and cached the question's prompt
            alone = [await small() for _ in range(samples)]
            alone_p50 = statistics.median(alone)
            if on_step:
                on_step(f"alone: p50 {alone_p50:.2f} s")
            phases = []
            for count in hogs:
                statuses: list[int] = []

                async def hog(i: int, statuses: list[int]) -> None:
                    body = chat(hog_prompt(i, hog_words), hog_key, hog_max_tokens)
                    statuses.append((await http.post("/chat/completions", **body)).status_code)

                peak_rss.clear()
                tasks = [asyncio.ensure_future(hog(1000 * count + j, statuses)) for j in range(count)]
                await asyncio.sleep(settle_s)
                beside = [await small() for _ in range(samples)]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                p50 = statistics.median(beside)
                phases.append(
                    {
                        "hogs": count,
                        "latencies_s": [round(s, 3) for s in beside],
                        "p50_s": round(p50, 3),
                        "ratio": round(p50 / alone_p50, 2),
                        "hogs_refused_429": statuses.count(429),
                        "hogs_answered": statuses.count(200),
                        "hogs_other": len(statuses) - statuses.count(429) - statuses.count(200),
                        "server_peak_rss_mb": round(max(peak_rss), 1) if peak_rss else None,
                    }
                )
                if on_step:
                    on_step(f"beside {count} hogs: p50 {p50:.2f} s ({p50 / alone_p50:.2f}x alone)")
                await asyncio.sleep(settle_s)  # the cancelled hogs' rows leave the batch
        finally:
            watcher.cancel()
    return {
        "hog_words": hog_words,
        "hog_max_tokens": hog_max_tokens,
        "small_max_tokens": small_max_tokens,
        "samples": samples,
        "alone_latencies_s": [round(s, 3) for s in alone],
        "alone_p50_s": round(alone_p50, 3),
        "phases": phases,
    }


@dataclass(frozen=True)
class Loopback:
    """A ``redpen serve`` on loopback: its ``/v1`` URL, the model it serves, and its process id (to read its memory)."""

    url: str
    model: str
    pid: int


@contextlib.contextmanager
def serve_on_loopback(state: Path, key: str, args: Sequence[str] = ()) -> Iterator[Loopback]:
    """``redpen serve`` in a subprocess on a free loopback port, its keys in ``state`` (``key`` among them), with
    ``args``; yields it once it answers, and stops it after. Its output goes to ``state/server.log``."""
    import httpx

    from runtime.errors import BackendError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from runtime.cli import main; main()", "serve", "--port", str(port)]
    log_path = state / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([*command, "--state", str(state), *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300  # the default model loads in seconds; a loaded machine takes longer
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"the server did not start: {log_path.read_text()[-2000:]}")
            try:
                listed = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
                served = str(listed.json()["data"][0]["id"])
                break
            except httpx.TransportError:
                time.sleep(0.5)
        yield Loopback(url, served, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)


def rss_mb(pid: int) -> float | None:
    """The resident memory of process ``pid`` in MB (Linux's /proc); None where it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS")), None)


def starvation_on_loopback(
    state: Path,
    small_key: str,
    hog_key: str,
    *,
    server_args: Sequence[str] = (),
    hogs: Sequence[int] = (1, 4, 32),
    hog_words: int = 7000,
    hog_max_tokens: int = 64,
    small_max_tokens: int = 32,
    samples: int = 3,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``starvation_rate`` against a ``redpen serve`` (with ``server_args``) started on loopback for it, its keys in
    ``state`` (``small_key`` and ``hog_key`` among them), its memory read from its process."""
    with serve_on_loopback(state, small_key, server_args) as server:
        return asyncio.run(
            starvation_rate(
                server.url,
                server.model,
                small_key,
                hog_key,
                hogs=hogs,
                hog_words=hog_words,
                hog_max_tokens=hog_max_tokens,
                small_max_tokens=small_max_tokens,
                samples=samples,
                rss_mb=lambda: rss_mb(server.pid),
                on_step=on_step,
            )
        )


_QUESTIONS = ["Who was late to the meeting?", "Name a colour.", "What is 2 + 2?", "Say hello."]


async def first_token_rate(
    url: str, key: str, model: str, *, streams: int = 20, max_tokens: int = 64
) -> dict[str, Any]:
    """Streamed chats one at a time (greedy, ``max_tokens`` each): the median time to the first streamed text, the
    median time to the whole reply, and their ratio (small: the reader sees text long before the reply ends)."""
    import httpx

    firsts, wholes = [], []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        for i in range(streams):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{_QUESTIONS[i % len(_QUESTIONS)]} ({i})"}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            started, first = time.perf_counter(), None
            async with http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"stream {i} answered {response.status_code}: {(await response.aread())!r}")
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            first = time.perf_counter() - started
            wholes.append(time.perf_counter() - started)
            firsts.append(first if first is not None else wholes[-1])
    first_s, whole_s = statistics.median(firsts), statistics.median(wholes)
    return {
        "streams": streams,
        "first_token_s": round(first_s, 4),
        "whole_s": round(whole_s, 4),
        "first_token_ratio": round(first_s / whole_s, 3),
    }


async def chat_load(
    url: str, key: str, model: str, *, users: int = 20, seconds: float = 60.0, max_tokens: int = 20
) -> dict[str, Any]:
    """``users`` clients, each sending chats (``max_tokens`` each) one after another for ``seconds``: p50 and p95
    latency of the answered ones, from the first try, and the others counted by status (504 included) or by client
    error. A 429 is waited out for its ``Retry-After`` and the chat sent again, as the openai SDK does; those waits
    are counted (``retried_429``), not taken for errors."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    retried = [0]
    stop = time.monotonic() + seconds

    async def user(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < stop:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{_QUESTIONS[(i + n) % len(_QUESTIONS)]} ({i}.{n})"}],
                "max_tokens": max_tokens,
            }
            started = time.perf_counter()
            while True:
                try:
                    response = await http.post("/chat/completions", json=body)
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if status != "429" or time.monotonic() >= stop:
                    break
                retried[0] += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            if status == "200":
                latencies.append(time.perf_counter() - started)
            elif status != "429":  # a 429 left at the end of the test is a chat the test stopped waiting for
                errors[status] = errors.get(status, 0) + 1
            n += 1

    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        await asyncio.gather(*(user(i, http) for i in range(users)))
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "users": users,
        "seconds": round(elapsed, 1),  # the last requests end after ``seconds``
        "answered": len(latencies),
        "errors": errors,
        "retried_429": retried[0],
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(cuts[18], 3) if latencies else None,
    }

"""`redpen bench`: speed measured as ratios from one run."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.cli.common import (
    BaseModel,
    Config,
    DataDir,
    JsonOut,
    Model,
    console,
    load_backend,
    load_examples,
    load_roles,
    roles_config,
)
from runtime.cli.options import STUDENT, expand, field_option
from runtime.defaults import CONCURRENCY, MOST_IN_FLIGHT, MOST_ITEMS, MOST_NEW_TOKENS
from runtime.models.config import BackendConfig, backend_config
from training.sft_config import LoraSFTConfig

# At most 100 repeats: a median settles in a handful; more only multiplies a bench's minutes.
MOST_REPEATS = 100


@expand(student=STUDENT)
def bench_generate(
    *,
    concurrency: Annotated[
        int, typer.Option(help="prompts at once on the batched side", min=1, max=MOST_IN_FLIGHT)
    ] = CONCURRENCY,
    max_new_tokens: Annotated[
        int, typer.Option(help="tokens generated per prompt (EOS ignored)", min=1, max=MOST_NEW_TOKENS)
    ] = 64,
    repeats: Annotated[int, typer.Option(help="repeats; medians are reported", min=1, max=MOST_REPEATS)] = 3,
    vs_generate: Annotated[
        bool, typer.Option(help="local: also transformers' own generate on the same model (a padded batch)")
    ] = False,
    student: BackendConfig,
    json_out: JsonOut = False,
) -> None:
    """The backend's own rate: tokens/s one prompt at a time vs many at once, as a ratio from one run. With
    ``--model teacher``: the teacher on llama.cpp beside the same GGUF through transformers, on the same prompts."""
    from runtime.bench.speed import generate_rate, plain_generate_rate, prefill_rate
    from runtime.models.config import TEACHER

    teacher = student.kind == TEACHER
    if teacher:
        from runtime.models.teacher import SLOTS

        concurrency = min(concurrency, SLOTS)  # more would only queue in the server's slots
    model_backend = load_backend(student.updated(max_batch_size=concurrency))

    def measure(backend_: Any, plain: bool = False, prefill: bool = False) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            try:
                result = await generate_rate(
                    backend_,
                    concurrency=concurrency,
                    max_new_tokens=max_new_tokens,
                    repeats=repeats,
                    on_step=console.print,
                )
                if plain:  # transformers' own generate on the same loaded model, before it is closed
                    result["generate"] = await plain_generate_rate(
                        backend_, concurrency=concurrency, max_new_tokens=max_new_tokens, repeats=repeats
                    )
                    result["batched_over_generate"] = round(
                        result["batched_tok_s"] / result["generate"]["batched_tok_s"], 2
                    )
                if prefill:
                    result["prefill"] = await prefill_rate(backend_, repeats=repeats)
                return result
            finally:
                await backend_.aclose()

        with console.status(f"measuring {backend_.kind} ..."):
            return asyncio.run(run())

    result = measure(model_backend, plain=vs_generate and student.kind == "local", prefill=teacher)
    result["cpu_count"] = os.cpu_count()
    _rate_line(result, repeats, max_new_tokens)
    if teacher:
        ceiling = result["prefill"]["prompt_tokens_per_s"]
        console.print(
            f"teacher prompt processing: {ceiling:.1f} tok/s (a {concurrency}-way decode reaches "
            f"{result['batched_tok_s'] / ceiling:.0%} of it), the ceiling for any number in flight on these cores"
        )
    if "generate" in result:
        plain = result["generate"]
        console.print(
            f"transformers generate: 1 at a time {plain['single_tok_s']:.1f} tok/s   {concurrency} in a padded batch "
            f"{plain['batched_tok_s']:.1f} tok/s; redpen {concurrency} at once / generate's batch "
            f"{result['batched_over_generate']:.2f}x"
        )
    if teacher:
        from runtime.models.teacher import teacher_model_dir

        with console.status("converting the teacher for transformers (once) ..."):
            folder = teacher_model_dir()
        # Two transformers baselines on the same float32 weights: redpen's continuous batching, and transformers'
        # own generate (one prompt at a time, and the same prompts as one padded batch).
        local = backend_config(kind="local", model=str(folder), max_batch_size=concurrency)
        baseline = measure(load_backend(local), plain=True)
        _rate_line(baseline, repeats, max_new_tokens)
        result["transformers"] = baseline
        for key, rates, label in (
            ("vs_transformers", baseline, "redpen's batching"),
            ("vs_transformers_generate", baseline["generate"], "transformers' generate"),
        ):
            result[key] = {
                "single": round(result["single_tok_s"] / rates["single_tok_s"], 2),
                "batched": round(result["batched_tok_s"] / rates["batched_tok_s"], 2),
            }
            console.print(
                f"llama.cpp / transformers with {label} ({rates['single_tok_s']:.1f} and {rates['batched_tok_s']:.1f} "
                f"tok/s; same GGUF, same prompts): {result[key]['single']:.1f}x one at a time, "
                f"{result[key]['batched']:.1f}x with {concurrency} in flight"
            )
    if json_out:
        print(json.dumps(result))


def _rate_line(result: dict[str, Any], repeats: int, max_new_tokens: int) -> None:
    console.print(
        f"{result['backend']['kind']}: 1 at a time {result['single_tok_s']:.1f} tok/s   {result['concurrency']} at "
        f"once {result['batched_tok_s']:.1f} tok/s   ratio {result['ratio']:.2f}x  (medians of {repeats}, "
        f"{max_new_tokens} new tokens, {os.cpu_count()} cores)"
    )


@expand(student=STUDENT)
def bench_pipeline(
    *,
    task: Annotated[str, typer.Option(help="benchmark task")] = "bbq",
    n: Annotated[int, typer.Option(help="gather items and examine items (each)", min=1, max=MOST_ITEMS)] = 16,
    concurrency: Annotated[
        int, typer.Option(help="conversations in flight on the concurrent side", min=1, max=MOST_IN_FLIGHT)
    ] = CONCURRENCY,
    simulate_latency: Annotated[
        float | None,
        typer.Option(
            help="instead: every item in flight against a loopback OpenAI-compatible endpoint that answers each "
            "request after this many seconds (a benchmark instrument); items/s against the dependency bound",
            min=0.0,
            max=600.0,  # 10 minutes a reply: slower than any real server; a longer one would only hang the bench
        ),
    ] = None,
    student: BackendConfig,
    data_dir: DataDir = None,
    config: Config = None,
    json_out: JsonOut = False,
) -> None:
    """The same gather + examine, one example at a time vs concurrently, in one process (no response cache)."""
    import tempfile

    from runtime.bench.speed import pipeline_rate
    from runtime.errors import ConfigError

    _, gather_set = load_examples(task, None, "choice", "gather", n, data_dir)
    _, examine_set = load_examples(task, None, "choice", "examine", n, data_dir)
    if simulate_latency is not None:
        if student != BackendConfig() or config:
            raise ConfigError(
                "--simulate-latency serves its own endpoint: drop --backend, --model, --base-url, --config"
            )
        _simulated_pipeline(task, gather_set, examine_set, simulate_latency, json_out)
        return
    roles = load_roles(roles_config(config, student, response_cache=False))
    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        result = asyncio.run(
            pipeline_rate(
                roles, gather_set, examine_set, Path(tmp), task=task, concurrency=concurrency, on_step=console.print
            )
        )
    result["cpu_count"] = os.cpu_count()
    _pipeline_table(result)
    if json_out:
        print(json.dumps(result))


def _pipeline_table(result: dict[str, Any]) -> None:
    """Both passes side by side; on the local backend a third row, the CPU ceiling its own profile allows."""
    from rich.table import Table

    ceiling = result.get("ceiling")
    table = Table(
        title=f"{result['n_gather']} gather + {result['n_examine']} examine items, {result['cpu_count']} cores"
    )
    columns = ("side", "items/s", "speedup", "tok/s", "rows per decode step", "prefill share of model time")
    for column in columns:
        table.add_column(column, justify="left" if column == "side" else "right")
    for side, speedup in (("one_at_a_time", 1.0), ("concurrent", result["speedup"])):
        figures, profile = result[side], result[side].get("profile")
        share = f" ({ceiling['share_achieved']:.0%} of the ceiling)" if ceiling and side == "concurrent" else ""
        table.add_row(
            side.replace("_", " "),
            f"{figures['items_per_s']:.3f}",
            f"{speedup:.2f}x{share}",
            f"{figures['tok_s']:.1f}",
            f"{profile['mean_rows_per_step']:.1f}" if profile else "-",
            f"{profile['prefill_share_of_model_time']:.0%}" if profile else "-",
        )
    if ceiling is not None:  # Amdahl: the serial pass's prefill share gains nothing, its decoding the batched rate
        table.add_row(
            "CPU ceiling",
            f"{result['one_at_a_time']['items_per_s'] * ceiling['speedup']:.3f}",
            f"{ceiling['speedup']:.2f}x",
            "-",
            f"{ceiling['decode_rows']} (decode {ceiling['decode_speedup']:.2f}x)",
            f"{ceiling['serial_prefill_share']:.0%} (serial)",
        )
        chained = result["chain_ceiling"]  # the same, with the decode steps the longest dependent chain forces
        table.add_row(
            "CPU ceiling, chained",
            f"{result['one_at_a_time']['items_per_s'] * chained['speedup']:.3f}",
            f"{chained['speedup']:.2f}x ({result['speedup'] / chained['speedup']:.0%} achieved)",
            "-",
            f"<= {chained['row_tokens'] / max(chained['chain_steps'], 1):.1f} ({chained['chain_steps']} steps)",
            f"{ceiling['serial_prefill_share']:.0%} (serial)",
        )
    console.print(table)
    console.print(
        f"pipeline {result['pipeline_fraction_of_generate']:.0%} of batched generate "
        f"({result['generate_batched_tok_s']:.1f} tok/s; one at a time {result['generate_single_tok_s']:.1f}); "
        f"identical answers {result['identical_answers']}/{result['answers_compared']}"
    )
    profile = result["concurrent"].get("profile")
    if profile:
        console.print(
            f"concurrent: {profile['decode_steps']} decode steps for {profile['slot_tokens']} tokens "
            f"({profile['mixed_steps']} of them riding along a prefill); the longest "
            f"chain of dependent calls alone takes {result['concurrent']['longest_chain_steps']} (the chained "
            "ceiling's floor)"
        )


def _simulated_pipeline(
    task: str, gather_set: list[Any], examine_set: list[Any], latency_s: float, json_out: bool
) -> None:
    """Gather + examine with every item in flight against ``runtime.bench.latency_server``: student and assistant are
    the OpenAI backend with its defaults, so the figure is the client's own overhead at a server's latency."""
    import tempfile

    from runtime.bench.latency_server import MODEL, running, stats
    from runtime.bench.speed import latency_rate

    width = max(len(gather_set), len(examine_set))
    with running(latency_s) as url, tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp:
        student = backend_config(kind="openai", model=MODEL, base_url=url)
        roles = load_roles(roles_config(None, student, response_cache=False))

        async def measure() -> dict[str, Any]:
            try:
                return await latency_rate(
                    roles,
                    gather_set,
                    examine_set,
                    Path(tmp),
                    task=task,
                    latency_s=latency_s,
                    concurrency=width,
                    on_step=console.print,
                )
            finally:
                await roles.student.aclose()

        with console.status("measuring ..."):
            result = asyncio.run(measure())
        result["server"] = stats(url)
    result["cpu_count"] = os.cpu_count()
    simulated = result["simulated"]
    # The client's own profile over the pass. Every conversation shares one event loop, so the loop's CPU time is a
    # floor under the pass's time that no server latency hides, to set beside the dependency bound's chain x
    # latency; the rest of the process's CPU is other threads (the embedding model's torch threads).
    requests = max(result["server"]["requests"], 1)
    result["client"] = {
        "cpu_s": simulated["cpu_s"],
        "loop_cpu_s": simulated["loop_cpu_s"],
        "requests": result["server"]["requests"],
        "cpu_ms_per_request": round(1000 * simulated["cpu_s"] / requests, 2),
        "loop_ms_per_request": round(1000 * simulated["loop_cpu_s"] / requests, 2),
        "bound_s": round(result["dependency_chain_calls"] * latency_s, 2),
    }
    console.print(
        f"{simulated['items']} items, {latency_s:g} s a reply, {width} in flight: {simulated['items_per_s']:.2f} "
        f"items/s; dependency bound {result['dependency_bound_items_per_s']:.2f} items/s "
        f"({result['dependency_chain_calls']} dependent calls): {result['share_of_bound']:.0%} of the dependency "
        f"bound; server peak {result['server']['peak_in_flight']} requests in flight; {result['cpu_count']} cores"
    )
    client = result["client"]
    console.print(
        f"client, over the {simulated['seconds']:.1f} s pass: {client['cpu_s']:.1f} s of CPU for "
        f"{client['requests']} requests, {client['loop_cpu_s']:.1f} s of it on the event loop "
        f"({client['loop_ms_per_request']:.1f} ms a request); the bound's pass is {client['bound_s']:.1f} s"
    )
    if json_out:
        print(json.dumps(result))


def bench_memory(
    # At most 1,000,000 records: 1.5 GB of 384-float vectors held at once; more would exhaust a laptop's memory.
    records: Annotated[int, typer.Option(help="records stored", min=1, max=1_000_000)] = 100_000,
    queries: Annotated[int, typer.Option(help="filtered searches timed", min=1, max=MOST_ITEMS)] = 200,
    json_out: JsonOut = False,
) -> None:
    """Embedded engine: insert rate, filtered search p50/p95, and brute-force numpy on the same vectors."""
    import tempfile

    from runtime.bench.speed import memory_rate

    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        result = memory_rate(Path(tmp), records=records, queries=queries, on_step=console.print)
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"{records} records: insert {result['insert_records_per_s']:.0f}/s, index {result['index_build_s']} s; "
        f"search p50 {result['engine_p50_ms']:.2f} ms p95 {result['engine_p95_ms']:.2f} ms; numpy p50 "
        f"{result['numpy_p50_ms']:.2f} ms: engine {result['numpy_over_engine_p50']:.1f}x faster; "
        f"same top-3 {result['same_top3']}/{queries}"
    )
    if json_out:
        print(json.dumps(result))


def bench_sandbox(
    limit: Annotated[
        int | None, typer.Option(help="at most this many problems of each of MBPP and HumanEval", min=1)
    ] = None,
    rate_programs: Annotated[
        int, typer.Option(help="canonical programs timed each way for the rate", min=1, max=MOST_ITEMS)
    ] = 200,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """The code sandbox: every canonical MBPP and HumanEval solution passes, each one broken two ways fails; and
    programs/s under bubblewrap vs unsandboxed, side by side."""
    from runtime.bench.speed import sandbox_check, sandbox_rate
    from runtime.data.sandbox import Sandbox

    _, mbpp = load_examples("mbpp", None, "code", "all", limit, data_dir)
    _, humaneval = load_examples("humaneval", None, "code", "examine", limit, data_dir)
    examples = [*mbpp, *humaneval]
    sandboxed = Sandbox("bwrap")
    unsandboxed = Sandbox("none")  # trusted programs only: the canonical solutions, for the rate
    try:
        with console.status(f"running {3 * len(examples)} programs in the sandbox ..."):
            check = asyncio.run(sandbox_check(examples, sandboxed, on_step=console.print))
        timed = examples[:: max(1, len(examples) // rate_programs)][:rate_programs]
        with console.status(f"timing {len(timed)} programs each way ..."):
            rate = asyncio.run(sandbox_rate(timed, sandboxed, unsandboxed))
    finally:
        sandboxed.close()
        unsandboxed.close()
    result = {"check": check, "rate": rate, "cpu_count": os.cpu_count()}
    for kind in ("canonical", "last_line_removed", "return_changed"):
        for miss in check[kind]["misses"][:5]:
            expected = "pass" if kind == "canonical" else "fail"
            console.print(f"  {kind}: {miss['id']} did not {expected}: {miss['reason']}")
    console.print(
        f"sandboxed {rate['bwrap_programs_per_s']:.1f} programs/s, unsandboxed {rate['none_programs_per_s']:.1f} "
        f"programs/s: ratio {rate['ratio_bwrap_over_none']:.2f} ({rate['workers']} at once, medians of "
        f"{rate['rounds']}, {rate['programs']} programs; {result['cpu_count']} cores)"
    )
    if json_out:
        print(json.dumps(result))


def bench_train(
    # 16 rows, 4 steps of 4 (one pass), 2 repeats: a step of the default model is ~10 s on 2 free cores, so the six
    # trainings take ~5 minutes.
    rows: Annotated[int, typer.Option(help="BBQ gather rows trained on (gold replies)", min=1, max=MOST_ITEMS)] = 16,
    steps: Annotated[int, field_option(LoraSFTConfig, "max_steps", help="optimisation steps per training")] = 4,
    repeats: Annotated[
        int, typer.Option(help="repeats of each side, interleaved; medians are reported", min=1, max=MOST_REPEATS)
    ] = 2,
    base_model: BaseModel = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """redpen's LoRA trainer vs a bare TRL SFTTrainer script, and padded vs padding-free batches: tokens/s and
    final loss on the same rows and settings, side by side in one run."""
    import tempfile

    from rich.table import Table

    from runtime.bench.train import bench_rows, train_rate
    from runtime.data.paths import resolve_data_dir

    train_rows = bench_rows(resolve_data_dir(data_dir), rows)
    config = LoraSFTConfig(base_model=base_model, max_steps=steps)
    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("training ..."):
        result = train_rate(train_rows, config, Path(tmp), repeats=repeats, on_step=console.print)
    result["cpu_count"] = os.cpu_count()
    table = Table(
        title=f"{result['rows']} rows, {steps} steps of {result['batch_size']}, medians of {repeats}, "
        f"{result['cpu_count']} cores"
    )
    for column in ("side", "train s", "total s", "tokens", "tok/s", "final loss"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for side in ("redpen", "bare_trl", "bare_trl_padded"):
        figures = result[side]
        table.add_row(
            side,
            f"{figures['train_s']:.1f}",
            f"{figures['total_s']:.1f}",
            str(figures["tokens"]),
            f"{figures['tok_s']:.1f}",
            f"{figures['final_loss']:.4f}",
        )
    console.print(table)
    console.print(
        f"redpen / bare time: train {result['redpen_over_bare_train_s']:.2f}x, total (load to saved) "
        f"{result['redpen_over_bare_total_s']:.2f}x; padding-free / padded tok/s "
        f"{result['padding_free_over_padded_tok_s']:.2f}x"
    )
    if json_out:
        print(json.dumps(result))


def bench_starvation(
    hogs: Annotated[list[int] | None, typer.Option(help="hogs beside the small request, per phase; repeatable")] = None,
    # At most 100,000 words: past any model's context; the server refuses such a prompt whole.
    hog_words: Annotated[
        int, typer.Option(help="words in a hog's prompt (~tokens of the default model)", min=1, max=100_000)
    ] = 7000,
    hog_max_tokens: Annotated[int, typer.Option(help="max_tokens of a hog", min=1, max=MOST_NEW_TOKENS)] = 64,
    small_max_tokens: Annotated[
        int, typer.Option(help="max_tokens of the small request", min=1, max=MOST_NEW_TOKENS)
    ] = 32,
    samples: Annotated[
        int, typer.Option(help="small requests timed per phase; medians are reported", min=1, max=MOST_REPEATS)
    ] = 3,
    request_timeout_s: Annotated[
        float,
        typer.Option(
            help="the server's --request-timeout-s: long, so that the hogs are admitted and compete however slow "
            "the machine (at serve's 120 s a slow machine refuses them early with 429, a separate protection)",
            min=1.0,
            max=7 * 86400.0,  # a week: past any bench's length
        ),
    ] = 86400.0,
    model: Model = None,
    json_out: JsonOut = False,
) -> None:
    """A small request's latency alone and beside another key's long requests, through `redpen serve` on loopback."""
    import tempfile

    from runtime.bench.speed import starvation_on_loopback
    from runtime.server import KeyRing

    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        ring = KeyRing(Path(tmp) / "keys.json")
        result = starvation_on_loopback(
            Path(tmp),
            ring.add("small"),
            ring.add("hog"),
            server_args=["--request-timeout-s", str(request_timeout_s), *(["--model", model] if model else [])],
            hogs=hogs or [1, 4, 32],
            hog_words=hog_words,
            hog_max_tokens=hog_max_tokens,
            small_max_tokens=small_max_tokens,
            samples=samples,
            on_step=console.print,
        )
    result["cpu_count"] = os.cpu_count()
    _starvation_lines(result)
    if json_out:
        print(json.dumps(result))


def _starvation_lines(result: dict[str, Any]) -> None:
    console.print(
        f"small request ({result['small_max_tokens']} tokens) alone: p50 {result['alone_p50_s']:.2f} s; hogs of "
        f"{result['hog_words']} words, max_tokens {result['hog_max_tokens']}, from another key "
        f"({result['cpu_count']} cores):"
    )
    for phase in result["phases"]:
        console.print(
            f"  beside {phase['hogs']:>3} hogs: p50 {phase['p50_s']:.2f} s = {phase['ratio']:.2f}x alone   "
            f"hogs refused 429: {phase['hogs_refused_429']}   server RSS peak {phase['server_peak_rss_mb']} MB"
        )


def bench_serve(
    streams: Annotated[
        int, typer.Option(help="streamed chats timed one at a time; medians are reported", min=1, max=MOST_REPEATS)
    ] = 20,
    stream_tokens: Annotated[int, typer.Option(help="max_tokens of a streamed chat", min=1, max=MOST_NEW_TOKENS)] = 64,
    users: Annotated[
        int,
        typer.Option(help="users of the load test, each sending chats one after another (0: none)", min=0, max=1000),
    ] = 20,
    seconds: Annotated[float, typer.Option(help="length of the load test", min=1.0, max=3600.0)] = 60.0,
    chat_tokens: Annotated[int, typer.Option(help="max_tokens of a load-test chat", min=1, max=MOST_NEW_TOKENS)] = 20,
    model: Model = None,
    json_out: JsonOut = False,
) -> None:
    """Streaming's time to the first token against the whole reply (medians), then chat latency under --users users
    (p50, p95, errors), through `redpen serve` on loopback."""
    import contextlib
    import tempfile

    from runtime.bench.speed import chat_load, first_token_rate, serve_on_loopback
    from runtime.server import KeyRing

    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, contextlib.ExitStack() as server:
        key = KeyRing(Path(tmp) / "keys.json").add("bench")
        with console.status("starting the server ..."):
            loopback = server.enter_context(serve_on_loopback(Path(tmp), key, ["--model", model] if model else []))
        url, served = loopback.url, loopback.model
        with console.status(f"{streams} streamed chats ..."):
            result = asyncio.run(first_token_rate(url, key, served, streams=streams, max_tokens=stream_tokens))
        console.print(
            f"streaming ({served}, max_tokens {stream_tokens}, median of {streams}): first token "
            f"{result['first_token_s']:.3f} s, whole reply {result['whole_s']:.3f} s, "
            f"ratio {result['first_token_ratio']:.3f}"
        )
        if users:
            with console.status(f"{users} users for {seconds:g} s ..."):
                load = asyncio.run(chat_load(url, key, served, users=users, seconds=seconds, max_tokens=chat_tokens))
            result["load"] = load
            console.print(
                f"load ({users} users, {load['seconds']:g} s, max_tokens {chat_tokens}): {load['answered']} answered, "
                f"{load['requests_per_s']} requests/s, p50 {load['p50_s']} s, p95 {load['p95_s']} s, "
                f"errors {load['errors'] or 0}, 429s waited out {load['retried_429']}"
            )
    result["cpu_count"] = os.cpu_count()
    if json_out:
        print(json.dumps(result))

"""`redpen bench`: speed measured as ratios from one run."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from runtime.cli.common import (
    Backend,
    BaseUrl,
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
from runtime.defaults import CONCURRENCY


def bench_generate(
    concurrency: Annotated[int, typer.Option(help="prompts at once on the batched side")] = CONCURRENCY,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt (EOS ignored)")] = 64,
    repeats: Annotated[int, typer.Option(help="repeats; medians are reported")] = 3,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    json_out: JsonOut = False,
) -> None:
    """The backend's own rate: tokens/s one prompt at a time vs many at once, as a ratio from one run."""
    from runtime.bench import generate_rate

    model_backend = load_backend(backend, model, base_url, max_batch_size=max(concurrency, 1))
    with console.status("measuring ..."):
        result = asyncio.run(
            generate_rate(
                model_backend,
                concurrency=concurrency,
                max_new_tokens=max_new_tokens,
                repeats=repeats,
                on_step=console.print,
            )
        )
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"1 at a time: {result['single_tok_s']:.1f} tok/s   {concurrency} at once: "
        f"{result['batched_tok_s']:.1f} tok/s   ratio {result['ratio']:.2f}x  "
        f"(medians of {repeats}, {max_new_tokens} new tokens, {result['cpu_count']} cores)"
    )
    if json_out:
        print(json.dumps(result))


def bench_pipeline(
    task: Annotated[str, typer.Option(help="benchmark task")] = "bbq",
    n: Annotated[int, typer.Option(help="gather items and examine items (each)")] = 16,
    concurrency: Annotated[int, typer.Option(help="conversations in flight on the concurrent side")] = CONCURRENCY,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    config: Config = None,
    json_out: JsonOut = False,
) -> None:
    """The same gather + examine, one example at a time vs concurrently, in one process (no response cache)."""
    import tempfile

    from runtime.bench import pipeline_rate

    _, gather_set = load_examples(task, None, "choice", "gather", n, data_dir)
    _, examine_set = load_examples(task, None, "choice", "examine", n, data_dir)
    roles = load_roles(roles_config(config, backend=backend, model=model, base_url=base_url, response_cache=False))
    with tempfile.TemporaryDirectory(prefix="redpen-bench-") as tmp, console.status("measuring ..."):
        result = asyncio.run(
            pipeline_rate(
                roles, gather_set, examine_set, Path(tmp), task=task, concurrency=concurrency, on_step=console.print
            )
        )
    result["cpu_count"] = os.cpu_count()
    console.print(
        f"one at a time {result['one_at_a_time']['items_per_s']:.3f} items/s, concurrent "
        f"{result['concurrent']['items_per_s']:.3f} items/s: {result['speedup']:.2f}x; pipeline "
        f"{result['concurrent']['tok_s']:.1f} tok/s = {result['pipeline_fraction_of_generate']:.0%} of batched "
        f"generate ({result['generate_batched_tok_s']:.1f} tok/s); identical answers "
        f"{result['identical_answers']}/{result['answers_compared']}; {result['cpu_count']} cores"
    )
    if json_out:
        print(json.dumps(result))


def bench_memory(
    records: Annotated[int, typer.Option(help="records stored")] = 100_000,
    queries: Annotated[int, typer.Option(help="filtered searches timed")] = 200,
    json_out: JsonOut = False,
) -> None:
    """Embedded engine: insert rate, filtered search p50/p95, and brute-force numpy on the same vectors."""
    import tempfile

    from runtime.bench import memory_rate

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
    limit: Annotated[int | None, typer.Option(help="at most this many problems of each of MBPP and HumanEval")] = None,
    rate_programs: Annotated[int, typer.Option(help="canonical programs timed each way for the rate")] = 200,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """The code sandbox: every canonical MBPP and HumanEval solution passes, each one broken two ways fails; and
    programs/s under bubblewrap vs unsandboxed, side by side."""
    from runtime.bench import sandbox_check, sandbox_rate
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
    rows: Annotated[int, typer.Option(help="BBQ gather rows trained on (gold replies)")] = 16,
    steps: Annotated[int, typer.Option(help="optimisation steps per training")] = 4,
    repeats: Annotated[int, typer.Option(help="repeats of each side, interleaved; medians are reported")] = 2,
    base_model: Annotated[str | None, typer.Option(help="model folder [default: the embedded default]")] = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """redpen's LoRA trainer vs a bare TRL SFTTrainer script, and padded vs padding-free batches: tokens/s and
    final loss on the same rows and settings, side by side in one run."""
    import tempfile

    from rich.table import Table

    from runtime.bench_train import bench_rows, train_rate
    from runtime.data.paths import resolve_data_dir
    from training.sft_config import LoraSFTConfig

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
    for side in ("redpen", "bare_trl", "bare_trl_padding_free"):
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

"""`redpen models` and `redpen tasks`: what is installed and what --task takes."""

from __future__ import annotations

import json

from rich.table import Table

from runtime.cli.common import (
    DataDir,
    console,
    out,
)
from runtime.errors import RedpenError


def models() -> None:
    """List the model backends and the embedded default model."""
    from runtime.models.default_model import DEFAULT_MODEL_NAME, cache_root, find_gguf
    from runtime.models.teacher import TEACHER_NAME

    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("serves")
    table.add_column("option scoring")
    table.add_row("local", "transformers in-process (CPU/GPU); --model FOLDER or the embedded default", "yes")
    table.add_row(
        "openai", "any OpenAI-compatible server: vLLM, OpenAI, `redpen serve` (--base-url, --model)", "with --tokenizer"
    )
    table.add_row(
        "teacher",
        f"the embedded teacher, {TEACHER_NAME}, on a llama.cpp server redpen runs (--assistant-model teacher)",
        "no",
    )
    console.print(table)
    console.print(_teacher_line())
    try:
        gguf: str = str(find_gguf())
    except RedpenError as exc:
        gguf = f"missing: {exc}"
    converted = sorted((cache_root() / "models").glob(f"{DEFAULT_MODEL_NAME}-*"))
    console.print(
        f"default model: {DEFAULT_MODEL_NAME}\n  packaged GGUF: {gguf}\n  converted: "
        f"{converted[0] if converted else 'not yet (converted on first use, ~30 s)'}"
    )


def _teacher_line() -> str:
    """The teacher: installed or not, its size, and the speed `redpen teacher install` measured."""
    from runtime.models.teacher import GGUF_BYTES, TEACHER_NAME, installed, speed_path

    if not installed():
        return f"teacher: {TEACHER_NAME} not installed (README set-up: the parts, then `redpen teacher install`)"
    line = f"teacher: {TEACHER_NAME}, {GGUF_BYTES / 2**30:.2f} GiB (Q4_K_M GGUF), served by llama-server"
    if speed_path().exists():
        speed = json.loads(speed_path().read_text())
        line += (
            f"; measured {speed['single_tok_s']} tok/s alone, {speed['batched_tok_s']} tok/s with "
            f"{speed['concurrency']} in flight ({speed.get('cpu_count', '?')} cores)"
        )
    return line


def tasks(data_dir: DataDir = None) -> None:
    """List the benchmark task names that --task takes."""
    from runtime.data.paths import resolve_data_dir
    from runtime.data.tasks import task_names

    for name in task_names(resolve_data_dir(data_dir)):
        out.print(name)

"""`redpen models` and `redpen tasks`: what is installed and what --task takes."""

from __future__ import annotations

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

    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("serves")
    table.add_column("option scoring")
    table.add_row("local", "transformers in-process (CPU/GPU); --model FOLDER or the embedded default", "yes")
    table.add_row(
        "openai", "any OpenAI-compatible server: vLLM, OpenAI, `redpen serve` (--base-url, --model)", "with --tokenizer"
    )
    console.print(table)
    try:
        gguf: str = str(find_gguf())
    except RedpenError as exc:
        gguf = f"missing: {exc}"
    converted = sorted((cache_root() / "models").glob(f"{DEFAULT_MODEL_NAME}-*"))
    console.print(
        f"default model: {DEFAULT_MODEL_NAME}\n  packaged GGUF: {gguf}\n  converted: "
        f"{converted[0] if converted else 'not yet (converted on first use, ~30 s)'}"
    )


def tasks(data_dir: DataDir = None) -> None:
    """List the benchmark task names that --task takes."""
    from runtime.data.paths import resolve_data_dir
    from runtime.data.tasks import task_names

    for name in task_names(resolve_data_dir(data_dir)):
        out.print(name)

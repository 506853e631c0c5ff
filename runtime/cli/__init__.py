"""The ``redpen`` command line: one module per command group; only this package prints, library code logs."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.text import Text

from runtime.cli import bench, evaluate, info, memory, salam, serve, training
from runtime.cli.common import console
from runtime.errors import RedpenError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything loads from packages and local folders

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="redpen: make language models learn from their own mistakes.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed, printed as ratios from one run.")
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(no_args_is_help=True, help="Inspect and manage a mistake memory.")
app.add_typer(memory_app, name="memory")

app.command("eval")(evaluate.evaluate)
app.command()(salam.gather)
app.command()(salam.exam)
app.command()(salam.run)
app.command("train-assistant")(training.train_assistant)
app.command()(training.correct)
app.command("train-student")(training.train_student)
app.command("ablate-corrections")(training.ablate_corrections)
memory_app.command("count")(memory.memory_count)
memory_app.command("list")(memory.memory_list)
memory_app.command("export")(memory.memory_export)
memory_app.command("delete")(memory.memory_delete)
app.command()(info.models)
app.command()(info.tasks)
app.command()(serve.serve)
bench_app.command("generate")(bench.bench_generate)
bench_app.command("pipeline")(bench.bench_pipeline)
bench_app.command("memory")(bench.bench_memory)


def main() -> None:
    logging.basicConfig(level=os.environ.get("REDPEN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except RedpenError as exc:
        console.print(Text.assemble(("error:", "bold red"), f" {exc}"), soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; finished items are saved, re-run the same command to resume")
        sys.exit(130)

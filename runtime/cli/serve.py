"""`redpen serve`: a backend over an OpenAI-compatible HTTP API, plain or memory-guided, behind API keys;
`redpen serve keys add|list|revoke` manages the keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from runtime.cli.common import Config, console, load_backend, load_roles, open_store, out, roles_config
from runtime.cli.options import STUDENT, Role, Settings, expand
from runtime.defaults import RETRIEVAL_K, RETRIEVAL_THRESHOLD
from runtime.models.config import BackendConfig
from runtime.server.limits import ServeLimits

app = typer.Typer(
    rich_markup_mode=None,
    help="Serve a model over an OpenAI-compatible API; `redpen serve keys add NAME` makes the API keys it needs.",
)
keys_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="The API keys of `redpen serve` (only their hashes are stored)."
)
app.add_typer(keys_app, name="keys")

State = Annotated[
    Path | None,
    typer.Option("--state", help="the server's folder: keys.json, ledger.sqlite [default: <REDPEN_CACHE>/serve]"),
]


def _state(state: Path | None) -> Path:
    from runtime.models.default_model import cache_root

    return state if state is not None else cache_root() / "serve"


# Who guides the student with --memory: no teacher by default, since a server's replies must not wait on one.
ASSISTANT = Role("assistant", "the student's model")


@app.callback(invoke_without_command=True)
@expand(student=STUDENT, assistant=ASSISTANT, limits=Settings(ServeLimits))
def serve(
    *,
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port", min=1, max=65535)] = 8000,
    student: BackendConfig,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER LoRA adapter to serve; repeatable")] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="answer every chat as a SALAM examination with this mistake memory (a folder, or a Qdrant URL); "
            "POST /v1/feedback then learns from corrections",
        ),
    ] = None,
    config: Config = None,
    assistant: BackendConfig | None,
    k: Annotated[int, typer.Option(help="--memory: past mistakes retrieved per request", min=1, max=50)] = RETRIEVAL_K,
    threshold: Annotated[
        float, typer.Option(help="--memory: least cosine similarity of a retrieved mistake", min=0.0, max=1.0)
    ] = RETRIEVAL_THRESHOLD,
    shared_memory: Annotated[
        bool,
        typer.Option(
            help="--memory: every tenant's retrieval also reads the memory's records of no tenant (what `redpen "
            "gather` made), read-only, whatever their task"
        ),
    ] = True,
    state: State = None,
    limits: ServeLimits,
) -> None:
    """Serve a backend over an OpenAI-compatible HTTP API (chat, and completions for prompt scoring).

    Every request needs `Authorization: Bearer KEY`, a key from `redpen serve keys add NAME`. With --memory each
    chat is answered as a SALAM examination of the key's tenant, and POST /v1/feedback learns from corrections.
    """
    if ctx.invoked_subcommand is not None:
        return
    from runtime.errors import ConfigError
    from runtime.server import Guided, KeyRing, Ledger
    from runtime.server import serve as run_server

    folder = _state(state)
    keys = KeyRing(folder / "keys.json")
    if not len(keys):
        raise ConfigError(f"no API keys in {keys.path}: make one first with `redpen serve keys add NAME`")
    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--adapter {item!r}: expected NAME=FOLDER")
        adapters[name] = path
    if memory is None:
        if config is not None or assistant is not None:
            raise ConfigError("--config and --assistant-* choose the study assistant: they need --memory")
        model_backend = load_backend(student.updated(adapters=adapters))
        console.print(f"serving {model_backend.model_id} on http://{host}:{port}/v1 ({len(keys)} keys)")
        run_server(model_backend, keys=keys, host=host, port=port, adapters=tuple(adapters), limits=limits)
        _exit_now()

    # A server answers every request afresh: no response cache.
    roles_cfg = roles_config(config, student.updated(adapters=adapters or None), assistant, response_cache=False)
    location = {"url": memory} if memory.startswith(("http://", "https://")) else {"path": Path(memory)}
    store = open_store(location)
    ledger = Ledger(folder / "ledger.sqlite")
    try:
        roles = load_roles(roles_cfg)
    except BaseException:
        store.close()
        ledger.close()
        raise
    guided = Guided(roles, store, ledger, k=k, threshold=threshold, shared=shared_memory)
    console.print(
        f"serving {roles.student_id} (assistant {roles.assistant_id}) with the mistake memory at {store.where} "
        f"on http://{host}:{port}/v1 ({len(keys)} keys)"
    )
    run_server(roles.student, keys=keys, host=host, port=port, adapters=tuple(adapters), limits=limits, guided=guided)
    _exit_now()


def _exit_now() -> NoReturn:
    """End the process once ``serve`` has returned: the memory, the ledger and the backends are closed by then, so
    nothing is left to save. A normal exit would first join the torch thread, which may still be in a model step of a
    request answered 503 (not interruptible; seconds on busy cores), then collect the models: 7-20 s measured on 2
    busy cores instead of the 3 s grace."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="who the key is for, e.g. an app's name")],
    tenant: Annotated[
        str | None, typer.Option(help="whose memory the key reads and feeds [default: NAME]; keys may share one")
    ] = None,
    state: State = None,
) -> None:
    """Make a key and print it, once: only its hash is stored, so it cannot be shown again."""
    from runtime.server import KeyRing

    ring = KeyRing(_state(state) / "keys.json")
    key = ring.add(name, tenant)
    console.print(f"key {name!r} (tenant {tenant or name!r}) added to {ring.path}; it is shown only now:")
    out.print(key, soft_wrap=True)


@keys_app.command("list")
def keys_list(state: State = None) -> None:
    """The keys' names, tenants and creation times (never the keys)."""
    from runtime.server import KeyRing

    ring = KeyRing(_state(state) / "keys.json")
    for entry in ring.entries.values():
        out.print(f"{entry.name}\ttenant {entry.tenant}\tcreated {entry.created}", soft_wrap=True)
    # On stdout after the rows, not on stderr: a capture that joins the two streams cannot run it into the last row.
    out.print(f"{len(ring)} keys in {ring.path}", soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name")], state: State = None) -> None:
    """Remove a key; a running server reads the keys file when it starts, so restart it."""
    from runtime.errors import ConfigError
    from runtime.server import KeyRing

    ring = KeyRing(_state(state) / "keys.json")
    if not ring.revoke(name):
        raise ConfigError(f"no key named {name!r} in {ring.path}")
    console.print(f"key {name!r} revoked; restart the server for it to take effect")

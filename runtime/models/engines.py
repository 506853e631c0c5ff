"""A model folder served by an engine redpen starts: vLLM's OpenAI-compatible server, one per folder.

``--engine vllm`` runs each model folder a command needs (the student; in ``redpen instruct`` the base, each
iteration's merged model and each baseline) in a ``vllm serve`` of its own, started on a free loopback port behind
a key made for this process, health-checked, talked to through the ``openai`` backend, and stopped when the
backend is closed (``runtime.models.managed``: the same mechanism as the embedded teacher's llama.cpp server).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from runtime.defaults import SERVER_MAX_CONCURRENCY
from runtime.errors import ConfigError
from runtime.models.default_model import DEFAULT_MODEL_NAME, cache_root, default_model_dir
from runtime.models.managed import ManagedServer, ServerCommand
from runtime.models.served import ServedBackend

ENGINES = ("local", "vllm")  # local: transformers in redpen's process (the local backend)


def check_engine(engine: str) -> None:
    """Raise one clear line if ``engine`` is unknown or not installed here (before any work is done)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm needs vLLM, which is not installed: pip install 'redpen[gpu]'")


def vllm_command(folder: Path, name: str) -> ServerCommand:
    """vLLM's OpenAI-compatible server for ``folder``, answering to the model name ``name``."""
    check_engine("vllm")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    # --seed: sampled replies repeat from run to run, as the local backend's do.
    argv += ["--served-model-name", name, "--host", "127.0.0.1", "--port", "{port}", "--seed", "0"]
    return ServerCommand(f"vLLM on {name}", argv, env={"VLLM_API_KEY": "{api_key}"})


def model_name(folder: Path) -> str:
    """The name a model folder answers to: as the local backend names it (the converted default by its model)."""
    if folder.resolve().parent == (cache_root() / "models").resolve() and folder.name.startswith(DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME
    return folder.name


def served_model(folder: Path | None, engine: str = "vllm") -> ServedBackend:
    """``folder`` (None: the embedded default) on a server of ``engine`` started now; ``aclose`` stops it."""
    if engine != "vllm":
        raise ConfigError(f"unknown served engine {engine!r}: vllm (the local engine runs in this process)")
    path = default_model_dir() if folder is None else Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} has no config.json; give a local Hugging Face model folder")
    name = model_name(path)
    command = vllm_command(path, name)
    server = ManagedServer(command, cache_root() / "logs" / f"{engine}-{name}-{os.getpid()}.log").start()
    # A folder's replies depend on its weights (instruct names merged folders by their adapter's digest) and on the
    # engine (its kernels round differently from transformers'), not on the port.
    identity = {"model_id": name, "path": str(path.resolve()), "engine": engine}
    return ServedBackend(engine, server, name, identity, capacity=SERVER_MAX_CONCURRENCY)

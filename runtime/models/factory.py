"""Build a backend from its settings; heavy packages load only for the kind asked for."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import ConfigError
from runtime.models.backend import Backend
from runtime.models.config import BackendConfig


def make_backend(config: BackendConfig, *, response_cache: bool = False) -> Backend:
    """The backend ``config`` describes; with ``response_cache``, greedy calls replay from the on-disk cache."""
    backend = _make(config)
    if not response_cache:
        return backend
    from runtime.models.cache import CachedBackend
    from runtime.models.default_model import cache_root

    return CachedBackend(backend, cache_root() / "responses.sqlite")


def _make(config: BackendConfig) -> Backend:
    if config.kind == "local":
        from runtime.models.local import LocalBackend

        return LocalBackend(
            config.model,
            adapters=config.adapters,
            device=config.device,
            dtype=config.dtype,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
            prefix_cache_mb=config.prefix_cache_mb,
        )
    if config.kind == "teacher":
        return _teacher()
    if config.kind == "vllm":
        from runtime.models.engines import served_model

        if config.adapters:
            raise ConfigError("--engine vllm serves whole model folders: merge the adapter into one, or run it locally")

        return served_model(Path(config.model) if config.model is not None else None, "vllm")
    from runtime.models.openai_backend import OpenAIBackend

    if config.model is None:
        raise ConfigError("the openai backend needs --model (the model name the server serves)")
    return OpenAIBackend(
        config.model,
        base_url=config.base_url,
        api_key=os.environ.get(config.api_key_env),
        max_concurrency=config.max_concurrency,
        tokenizer=config.tokenizer,
    )


def _teacher() -> Backend:
    """The embedded teacher: its GGUF joined once, a llama.cpp server started for this process."""
    from runtime.models.default_model import cache_root
    from runtime.models.managed import ManagedServer
    from runtime.models.served import ServedBackend
    from runtime.models.teacher import GGUF_SHA256, SLOTS, TEACHER_NAME, server_command, teacher_gguf

    command = server_command(teacher_gguf())
    server = ManagedServer(command, cache_root() / "logs" / f"llama-server-{os.getpid()}.log").start()
    identity = {"model_id": TEACHER_NAME, "gguf_sha256": GGUF_SHA256}
    return ServedBackend("teacher", server, TEACHER_NAME, identity, capacity=SLOTS)

"""``redpen serve`` as a user runs it: a subprocess on a free port, used through ``OpenAIBackend``.

The served model is a tiny random chat model built by the test; its greedy replies over HTTP must equal the
``LocalBackend``'s own, with requests sent concurrently (the server micro-batches them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.errors import BackendError
from runtime.models.backend import GenerationSettings, Message
from runtime.models.local import LocalBackend
from runtime.models.openai_backend import OpenAIBackend
from tests.helpers import build_tiny_model

START_TIMEOUT_S = 180  # importing torch and loading the model on 2 busy cores; a healthy start takes ~10 s
SETTINGS = GenerationSettings(max_new_tokens=16)  # greedy
PROMPTS: list[list[Message]] = [
    [
        {"role": "system", "content": "Answer with the letter of the correct option."},
        {"role": "user", "content": f"Question {i}: which colour is the sky?\nOptions:\n(A) red\n(B) blue"},
    ]
    for i in range(4)
] + [[{"role": "user", "content": text}] for text in ("hello", "The quick brown fox", "Numbers: 1 2 3", "Tomorrow?")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``redpen serve`` and yield its ``/v1`` URL once it answers; always stop it afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable,
        "-c",
        "from runtime.cli import main; main()",
        "serve",
        "--model",
        str(tiny_model),
        "--port",
        str(port),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_CACHE": str(log_path.parent / "cache")}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"redpen serve exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"redpen serve did not answer within {START_TIMEOUT_S}s:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"redpen serve ignored SIGTERM for 20 s:\n{log_path.read_text()}")


def test_the_served_model_is_listed(server: str) -> None:
    models = httpx.get(f"{server}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]


async def test_concurrent_replies_over_http_equal_local_greedy_ones(server: str, tiny_model: Path) -> None:
    remote = OpenAIBackend(model="tiny-llama", base_url=server, max_concurrency=len(PROMPTS))
    try:
        served = await asyncio.gather(*(remote.generate(p, SETTINGS) for p in PROMPTS))
    finally:
        await remote.aclose()

    local = LocalBackend(tiny_model)
    try:
        own = [await local.generate(p, SETTINGS) for p in PROMPTS]  # one at a time: no batching at all
    finally:
        await local.aclose()

    assert [g.text for g in served] == [g.text for g in own]
    assert len({g.text for g in own}) > 1, "every prompt got the same reply; the comparison would prove little"
    assert [g.usage for g in served] == [g.usage for g in own]
    assert [g.finish_reason for g in served] == [g.finish_reason for g in own]


async def test_an_unknown_model_is_a_backend_error_naming_it(server: str) -> None:
    remote = OpenAIBackend(model="no-such-model", base_url=server, max_retries=0)
    try:
        with pytest.raises(BackendError) as error:
            await remote.generate(PROMPTS[0], SETTINGS)
    finally:
        await remote.aclose()
    assert str(error.value) == f"model 'no-such-model' is not served at {server}; served: tiny-llama"

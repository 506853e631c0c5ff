"""``redpen serve`` as a user runs it: a subprocess on a free port, behind an API key, used through ``OpenAIBackend``.

The served model is a tiny random chat model built by the test; its greedy replies over HTTP must equal the
``LocalBackend``'s own, with requests sent concurrently (the server micro-batches them). SIGTERM with requests in
flight must end the process within seconds; with ``--memory``, acknowledged feedback must survive ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.errors import BackendError
from runtime.models.backend import GenerationSettings, Message
from runtime.models.local import LocalBackend
from runtime.models.openai_backend import OpenAIBackend
from runtime.server import KeyRing
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


def start(folder: Path, key: str, *options: str, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``redpen serve --state folder`` and return the process and its ``/v1`` URL once it answers ``key``."""
    port = port or free_port()
    log_path = folder / f"server-{time.monotonic_ns()}.log"
    command = [sys.executable, "-c", "from runtime.cli import main; main()", "serve", "--port", str(port)]
    command += ["--state", str(folder), *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_CACHE": str(folder / "cache")}
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"redpen serve exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"redpen serve did not answer within {START_TIMEOUT_S}s:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if httpx.get(f"{base_url}/models", headers=auth(key), timeout=2).status_code == 200:
                return process, base_url
        time.sleep(0.2)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The server's folder, holding one API key; and the key."""
    folder = tmp_path_factory.mktemp("serve")
    return folder, KeyRing(folder / "keys.json").add("tests")


@pytest.fixture(scope="module")
def server(tiny_model: Path, state: tuple[Path, str]) -> Iterator[str]:
    """Start ``redpen serve`` and yield its ``/v1`` URL once it answers; always stop it afterwards."""
    folder, key = state
    process, base_url = start(folder, key, "--model", str(tiny_model))
    try:
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("redpen serve ignored SIGTERM for 20 s")


def test_the_served_model_is_listed_to_a_key_holder_only(server: str, state: tuple[Path, str]) -> None:
    models = httpx.get(f"{server}/models", headers=auth(state[1]), timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    for headers in ({}, auth("rp-wrong")):
        refused = httpx.get(f"{server}/models", headers=headers, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


async def test_concurrent_replies_over_http_equal_local_greedy_ones(
    server: str, tiny_model: Path, state: tuple[Path, str]
) -> None:
    remote = OpenAIBackend(model="tiny-llama", base_url=server, api_key=state[1], max_concurrency=len(PROMPTS))
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


async def test_an_unknown_model_is_a_backend_error_naming_it(server: str, state: tuple[Path, str]) -> None:
    remote = OpenAIBackend(model="no-such-model", base_url=server, api_key=state[1], max_retries=0)
    try:
        with pytest.raises(BackendError) as error:
            await remote.generate(PROMPTS[0], SETTINGS)
    finally:
        await remote.aclose()
    assert str(error.value) == f"model 'no-such-model' is not served at {server}; served: tiny-llama"


def test_no_keys_no_server(tmp_path: Path, tiny_model: Path) -> None:
    command = [sys.executable, "-c", "from runtime.cli import main; main()", "serve", "--state", str(tmp_path)]
    done = subprocess.run([*command, "--model", str(tiny_model)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no API keys" in done.stderr and "redpen serve keys add NAME" in done.stderr


async def test_sigterm_with_requests_in_flight_exits_within_seconds(tmp_path: Path, tiny_model: Path) -> None:
    key = KeyRing(tmp_path / "keys.json").add("tests")
    process, base_url = start(tmp_path, key, "--model", str(tiny_model), "--shutdown-grace-s", "2")
    # 400 tokens (the tiny model's context is 512): longer than the 2 s of grace on 2 cores.
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 400}
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=auth(key), timeout=60) as http:
            flight = [asyncio.create_task(http.post("/chat/completions", json=body)) for _ in range(8)]
            await asyncio.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await asyncio.to_thread(process.wait, 30)
            exit_s = time.monotonic() - started
            answers = await asyncio.gather(*flight, return_exceptions=True)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0 and exit_s < 10, f"exit {code} after {exit_s:.1f} s"
    # Each request was answered: in full if it finished within the grace period, else 503 (send it again).
    assert {a.status_code for a in answers if isinstance(a, httpx.Response)} <= {200, 503}, answers
    assert all(isinstance(a, httpx.Response) for a in answers), answers


@pytest.mark.slow  # loads the packaged MiniLM embedder in the server
def test_acknowledged_feedback_survives_kill_9(tmp_path: Path) -> None:
    from memory.store import MistakeMemory

    # The tiny model with room for a question and its guidance (the rotary positions have no weights to train).
    model = build_tiny_model(tmp_path / "tiny-llama")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    key = KeyRing(tmp_path / "keys.json").add("acme")
    memory = tmp_path / "memory"
    options = ("--model", str(model), "--memory", str(memory))
    question = "Who forgot?\nOptions:\n(A) Cannot be determined\n(B) The grandmother\n(C) The grandson"
    chat: dict[str, Any] = {"model": "tiny-llama", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    process, base_url = start(tmp_path, key, *options)
    try:
        answer = httpx.post(f"{base_url}/chat/completions", json=chat, headers=auth(key), timeout=60)
        feedback = {"completion_id": answer.json()["id"], "gold": "(B)"}
        ack = httpx.post(f"{base_url}/feedback", json=feedback, headers=auth(key), timeout=60).json()
        assert ack["recorded"] and not ack["duplicate"]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    process, base_url = start(tmp_path, key, *options)
    try:
        again = httpx.post(f"{base_url}/feedback", json=feedback, headers=auth(key), timeout=60).json()
        guided = httpx.post(f"{base_url}/chat/completions", json=chat, headers=auth(key), timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert again == {**ack, "duplicate": True}
    assert [r["id"] for r in guided.json()["redpen"]["retrieved"]] == [ack["mistake_id"]]
    with MistakeMemory(path=memory) as store:
        assert [(r.id, r.tenant) for r in store.iter_records()] == [(ack["mistake_id"], "acme")]

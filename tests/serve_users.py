"""Users of a plain ``redpen serve`` on loopback: chat latency under load, and streaming's time to first token.

    python tests/serve_users.py --workdir /tmp/users [--model FOLDER] [--users 20] [--seconds 60] [--streams 20]

It starts ``redpen serve`` in a subprocess (a tiny random Llama built on the spot unless ``--model`` names a local
model folder) with a fresh key, then:

- load: ``--users`` asyncio clients, each sending 20-token chats one after another for ``--seconds``; prints p50 and
  p95 latency, requests answered and errors (any non-200, 429 and 504 included);
- streaming: ``--streams`` streamed chats one at a time (``max_tokens`` 64, greedy); prints the median time to the
  first streamed text, the median time to the whole reply, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import build_tiny_model  # noqa: E402

CLI = [sys.executable, "-c", "from runtime.cli import main; main()"]
QUESTIONS = ["Who was late to the meeting?", "Name a colour.", "What is 2 + 2?", "Say hello."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(workdir: Path, model: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    state = workdir / "state"
    key = subprocess.run(
        [*CLI, "serve", "keys", "add", "load", "--state", str(state)], capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--model", str(model), "--port", str(port), "--state", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "server.log", "wb"),  # noqa: SIM115 - the server's lifetime
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                return server, url, key
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not start; see {workdir / 'server.log'}")


async def load(url: str, key: str, model: str, users: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.monotonic() + seconds

    async def user(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.monotonic() < stop:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{QUESTIONS[(i + n) % len(QUESTIONS)]} ({i}.{n})"}],
                "max_tokens": 20,
            }
            started = time.perf_counter()
            try:
                response = await http.post("/chat/completions", json=body)
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            if status == "200":
                latencies.append(time.perf_counter() - started)
            else:
                errors[status] = errors.get(status, 0) + 1
            n += 1

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        await asyncio.gather(*(user(i, http) for i in range(users)))
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    return {
        "users": users,
        "seconds": seconds,
        "answered": len(latencies),
        "errors": errors,
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(cuts[18], 3),
    }


async def streams(url: str, key: str, model: str, count: int) -> dict[str, Any]:
    firsts, wholes = [], []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        for i in range(count):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}],
                "max_tokens": 64,
                "temperature": 0,
                "stream": True,
            }
            started, first = time.perf_counter(), None
            async with http.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"]
                        if delta and delta[0]["delta"].get("content"):
                            first = time.perf_counter() - started
            wholes.append(time.perf_counter() - started)
            firsts.append(first if first is not None else wholes[-1])
    first, whole = statistics.median(firsts), statistics.median(wholes)
    return {
        "streams": count,
        "first_token_s": round(first, 4),
        "whole_s": round(whole, 4),
        "ratio": round(first / whole, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--streams", type=int, default=20)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_tiny_model(args.workdir / "tiny")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server, url, key = start(args.workdir, model)
    try:
        figures = asyncio.run(streams(url, key, model.name, args.streams)) if args.streams else {}
        if args.users:
            figures |= asyncio.run(load(url, key, model.name, args.users, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

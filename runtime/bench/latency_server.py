"""A fixed-latency OpenAI-compatible endpoint: a benchmark instrument, never a product path.

``redpen bench pipeline --simulate-latency S`` starts it in a child process on loopback, so that the client side of
a large deployment can be measured without one: every chat request is answered after exactly ``S`` seconds,
however many are in flight (a vLLM replica with free batch slots looks like that to a client). Replies are
deterministic and shaped for the SALAM roles: a study assistant's system prompt gets a JSON reason and guideline,
everything else an option letter picked by a hash of the conversation, so gathering conversations end after
different numbers of rounds, as they do with a model.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# At module level: FastAPI resolves the handlers' (postponed) annotations in this module's globals, and a
# ``request: Request`` it cannot resolve becomes a required query parameter (every call a 422).
from fastapi import FastAPI, Request

ASSISTANT_MARK = "You are a study assistant"  # the first words of every study-assistant system prompt
MODEL = "simulated"


def reply_to(messages: list[dict[str, Any]]) -> str:
    """The deterministic reply to one conversation."""
    system = next((str(m.get("content", "")) for m in messages if m.get("role") == "system"), "")
    if system.startswith(ASSISTANT_MARK):
        return json.dumps({"reason": "The answer does not follow from the context.", "guideline": "Reread it."})
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return f"The answer is ({'ABC'[digest[0] % 3]})."


def build_app(latency_s: float) -> FastAPI:
    app = FastAPI()
    served = {"requests": 0, "in_flight": 0, "peak_in_flight": 0}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "redpen-bench"}]}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return served

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        served["requests"] += 1
        served["in_flight"] += 1
        served["peak_in_flight"] = max(served["peak_in_flight"], served["in_flight"])
        try:
            await asyncio.sleep(latency_s)
        finally:
            served["in_flight"] -= 1
        text = reply_to(body.get("messages", []))
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return {
            "id": f"chatcmpl-{served['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(text.split()),
                "total_tokens": prompt_tokens + len(text.split()),
            },
        }

    return app


@contextmanager
def running(latency_s: float) -> Iterator[str]:
    """Start the endpoint in a child process on a loopback port the parent has already bound (so no other process
    can take it between choosing and listening); yields its base URL and stops it on exit."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.bench.latency_server",
            "--fd",
            str(listener.fileno()),
            "--latency",
            str(latency_s),
        ],
        pass_fds=[listener.fileno()],
    )
    listener.close()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(url, child)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def stats(url: str) -> dict[str, int]:
    import httpx

    return dict(httpx.get(url.removesuffix("/v1") + "/stats", timeout=5).json())


def _wait_ready(url: str, child: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the simulated endpoint exited with status {child.returncode} before serving")
        try:
            httpx.get(url + "/models", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the simulated endpoint did not answer within 30 s")


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="a bound, listening socket to serve on")
    parser.add_argument("--latency", type=float, required=True, help="seconds before every reply")
    args = parser.parse_args()
    # No access log: at hundreds of requests a second it is the terminal's noise and the server's CPU.
    uvicorn.run(build_app(args.latency), fd=args.fd, log_level="warning", access_log=False, backlog=1024)


if __name__ == "__main__":
    main()

"""The attack table of issue 14, run against a live ``redpen serve``: one row per attack, measured, as JSON.

    python tests/serve_attacks.py --base-url http://127.0.0.1:8000/v1 --pid PID [--key K --other-key K2]

``--pid`` is the server's process id: the script reads its memory and CPU time from /proc and, last, sends it
SIGTERM with requests in flight and times its exit (a server still alive after 30 s is killed). A watchdog kills
the server if it grows past 8 GiB, so a runaway prompt cannot take the machine down. Without keys it measures a
server that has none (today's ``redpen serve`` before issue 14); with them, the keyed server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx

WATCHDOG_BYTES = 8 * 2**30
SMALL = [{"role": "user", "content": "Which colour is the sky?\nOptions:\n(A) red\n(B) blue"}]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of a child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, limit_s: float) -> float:
    """Seconds until ``pid`` is gone, polled every 50 ms, at most ``limit_s``."""
    started = time.perf_counter()
    while alive(pid) and time.perf_counter() - started < limit_s:
        time.sleep(0.05)
    return time.perf_counter() - started


class Attacks:
    def __init__(self, base_url: str, pid: int, key: str | None, other_key: str | None, model: str) -> None:
        self.base_url, self.pid, self.model = base_url.rstrip("/"), pid, model
        self.key, self.other_key = key, other_key
        self.rows: list[dict[str, Any]] = []
        self.peak_rss = rss_bytes(pid)
        self.watchdog_fired = False

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def body(self, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "max_tokens": 16, "temperature": 0, **extra}

    def row(self, attack: str, **fields: Any) -> None:
        self.rows.append({"attack": attack, **fields})
        print(json.dumps(self.rows[-1]), flush=True)

    async def watchdog(self) -> None:
        while alive(self.pid):
            rss = rss_bytes(self.pid)
            self.peak_rss = max(self.peak_rss, rss)
            if rss > WATCHDOG_BYTES:
                self.watchdog_fired = True
                os.kill(self.pid, signal.SIGKILL)
                return
            await asyncio.sleep(0.2)

    async def post(
        self, http: httpx.AsyncClient, path: str, body: dict[str, Any] | bytes, key: str | None, wait_s: float = 60
    ) -> tuple[int | str, float, str]:
        started = time.perf_counter()
        try:
            if isinstance(body, bytes):
                headers = {**self.headers(key), "Content-Type": "application/json"}
                response = await http.post(path, content=body, headers=headers, timeout=wait_s)
            else:
                response = await http.post(path, json=body, headers=self.headers(key), timeout=wait_s)
        except httpx.TimeoutException:
            return "client timeout", time.perf_counter() - started, ""
        except httpx.TransportError as exc:
            return f"connection error ({type(exc).__name__})", time.perf_counter() - started, ""
        return response.status_code, time.perf_counter() - started, response.text[:160]

    async def cpu_over(self, seconds: float) -> float:
        before = cpu_s(self.pid)
        await asyncio.sleep(seconds)
        return round(cpu_s(self.pid) - before, 2)

    async def run(self) -> list[dict[str, Any]]:
        dog = asyncio.create_task(self.watchdog())
        async with httpx.AsyncClient(base_url=self.base_url) as http:
            status, took, text = await self.post(http, "/chat/completions", self.body(SMALL), self.key)
            self.row("valid request (control)", status=status, seconds=round(took, 2), body=text)
            self.row("idle CPU over 5 s", cpu_s=await self.cpu_over(5))
            status, _, text = await self.post(http, "/chat/completions", self.body(SMALL), None)
            self.row("no key", status=status, body=text)
            status, _, text = await self.post(http, "/chat/completions", self.body(SMALL), "sk-wrong-key")
            self.row("wrong key", status=status, body=text)
            await self.other_tenants_completion(http)
            for attack, body in [
                ("empty messages", self.body([])),
                ("empty prompt", self.body([{"role": "user", "content": ""}])),
                ("unknown role", self.body([{"role": "wizard", "content": "hi"}])),
                ("max_tokens 0", self.body(SMALL, max_tokens=0)),
                ("temperature 5", self.body(SMALL, temperature=5)),
                ("top_p 1.5", self.body(SMALL, top_p=1.5)),
                ("unknown model", {**self.body(SMALL), "model": "no-such-model"}),
                ("seed 2**70", self.body(SMALL, temperature=1.0, seed=2**70)),
                ("seed -1", self.body(SMALL, temperature=1.0, seed=-1)),
                ("seed 1.5", self.body(SMALL, temperature=1.0, seed=1.5)),
            ]:
                status, _, text = await self.post(http, "/chat/completions", body, self.key)
                self.row(attack, status=status, body=text)
            await self.seed_beside_another_tenant(http)
            await self.feedback_flood(http)
            await self.schema_without_key(http)
            await self.echo_past_context(http)
            await self.big_prompt(http)
            await self.huge_max_tokens(http)
            await self.disconnect(http)
        await self.sigterm_under_load()
        dog.cancel()
        return self.rows

    async def other_tenants_completion(self, http: httpx.AsyncClient) -> None:
        response = await http.post(
            "/chat/completions", json=self.body(SMALL), headers=self.headers(self.other_key), timeout=60
        )
        completion = response.json().get("id", "chatcmpl-unknown") if response.status_code == 200 else "none"
        feedback = {"completion_id": completion, "gold": "(B)"}
        status, _, text = await self.post(http, "/feedback", feedback, self.key)
        self.row("other tenant's completion id in feedback", status=status, body=text)

    async def seed_beside_another_tenant(self, http: httpx.AsyncClient) -> None:
        """A seed torch refuses (2**64), sent at once with 6 requests of another tenant: does it fail them too?"""
        hostile = self.post(http, "/chat/completions", self.body(SMALL, temperature=1.0, seed=2**64), self.key)
        others = [self.post(http, "/chat/completions", self.body(SMALL), self.other_key) for _ in range(6)]
        results = await asyncio.gather(hostile, *others)
        self.row(
            "seed 2**64 beside 6 requests of another tenant",
            status=results[0][0],
            body=results[0][2],
            other_tenant_statuses=[status for status, _, _ in results[1:]],
        )

    async def feedback_flood(self, http: httpx.AsyncClient) -> None:
        """40 feedback requests at once from one key: are they held to its in-flight limit?"""
        feedback = {"completion_id": "chatcmpl-none", "correct": True}
        results = await asyncio.gather(*(self.post(http, "/feedback", feedback, self.key) for _ in range(40)))
        statuses: dict[str, int] = {}
        for status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        self.row("40 concurrent feedback from one key", statuses=statuses)

    async def schema_without_key(self, http: httpx.AsyncClient) -> None:
        root = self.base_url.removesuffix("/v1")
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = await http.get(f"{root}{path}")
            self.row(f"GET {path} without a key", status=response.status_code, names_model=self.model in response.text)

    async def echo_past_context(self, http: httpx.AsyncClient) -> None:
        """Prompt scoring (echo) of ~40k tokens, past the model's context."""
        prompt = " ".join(["word"] * 40_000)
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}
        status, took, text = await self.post(http, "/completions", body, self.key)
        self.row("completions echo of a 40k-token prompt", status=status, seconds=round(took, 2), body=text)

    async def big_prompt(self, http: httpx.AsyncClient) -> None:
        """A 1 MB prompt, and a small request from another client 1 s later: does it wait behind the big one?"""
        text = ("The quick brown fox jumps over the lazy dog. " * (2**20 // 45 + 1))[: 2**20]
        rss_before = rss_bytes(self.pid)
        self.peak_rss = rss_before
        big = asyncio.create_task(
            self.post(http, "/chat/completions", self.body([{"role": "user", "content": text}]), self.key, 150)
        )
        await asyncio.sleep(1)
        probe_status, probe_s, _ = await self.post(http, "/chat/completions", self.body(SMALL), self.key, 150)
        status, took, body = await big
        self.row(
            "1 MB prompt",
            status=status,
            seconds=round(took, 2),
            body=body,
            small_request_meanwhile_s=round(probe_s, 2),
            small_request_status=probe_status,
            rss_before_gib=round(rss_before / 2**30, 2),
            rss_peak_gib=round(self.peak_rss / 2**30, 2),
            watchdog_killed_server=self.watchdog_fired,
        )
        if self.watchdog_fired or not alive(self.pid):
            raise SystemExit("the server died; restart it to measure the other attacks")

    async def huge_max_tokens(self, http: httpx.AsyncClient) -> None:
        """max_tokens 1e9 from a client that gives up after 5 s: is the server still working for it afterwards?"""
        body = self.body([{"role": "user", "content": "Write a very long story."}], max_tokens=1_000_000_000)
        body["temperature"] = 1.0
        status, took, text = await self.post(http, "/chat/completions", body, self.key, wait_s=5)
        cpu = await self.cpu_over(10)
        probe_status, probe_s, _ = await self.post(http, "/chat/completions", self.body(SMALL), self.key)
        self.row(
            "max_tokens 1e9 (client leaves after 5 s)",
            status=status,
            seconds=round(took, 2),
            body=text,
            server_cpu_s_in_next_10_s=cpu,
            small_request_after_s=round(probe_s, 2),
            small_request_status=probe_status,
        )

    async def disconnect(self, http: httpx.AsyncClient) -> None:
        """A 1000-token reply whose client disconnects after 1 s: does generation stop?"""
        body = self.body([{"role": "user", "content": "Write a very long story."}], max_tokens=1000, temperature=1.0)
        status, _, _ = await self.post(http, "/chat/completions", body, self.key, wait_s=1)
        per_second = [await self.cpu_over(1) for _ in range(10)]
        self.row(
            "client disconnect after 1 s",
            status=status,
            server_cpu_s_in_next_10_s=round(sum(per_second), 2),
            cpu_s_each_second=per_second,
        )

    async def sigterm_under_load(self) -> None:
        """8 requests in flight, then SIGTERM: how long until the process is gone, and what did the 8 get?"""
        body = self.body([{"role": "user", "content": "Tell me about the sea."}], max_tokens=200, temperature=1.0)
        async with httpx.AsyncClient(base_url=self.base_url) as http:
            flight = [asyncio.create_task(self.post(http, "/chat/completions", body, self.key, 60)) for _ in range(8)]
            await asyncio.sleep(1.5)
            os.kill(self.pid, signal.SIGTERM)
            exit_s = await asyncio.to_thread(wait_gone, self.pid, 30)
            killed = alive(self.pid)
            if killed:
                os.kill(self.pid, signal.SIGKILL)
            results = await asyncio.gather(*flight)
        statuses: dict[str, int] = {}
        for status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        self.row(
            "SIGTERM with 8 requests in flight",
            exit_s=round(exit_s, 2),
            still_alive_after_30_s=killed,
            in_flight_results=statuses,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--key")
    parser.add_argument("--other-key")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows = asyncio.run(Attacks(args.base_url, args.pid, args.key, args.other_key or args.key, args.model).run())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

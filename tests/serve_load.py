"""A bounded load test of ``redpen serve --memory`` on loopback, with an optional ``kill -9`` in the middle.

    python tests/serve_load.py --workdir /tmp/load [--backend scripted|tiny|FOLDER] [--requests 400] \
        [--concurrency 32] [--tenants 4] [--kill-after 200] [--json figures.json]

It starts the server in a subprocess (the packaged MiniLM embedder, an embedded Qdrant Edge memory, keys and ledger in
``--workdir``), then an asyncio client sends ``--requests`` chat requests from
``--tenants`` tenants, at most ``--concurrency`` in flight, BBQ questions from the same pool for every tenant (so,
without isolation, tenants would retrieve each other's mistakes). Every question carries its tenant's marker; a
quarter of each tenant's answers get feedback with the gold and the marker in the note.

The models: ``scripted`` (the default) runs ``runtime.server.serve`` over scripted student and assistant backends that
answer after a fixed delay (0.1 s and 0.2 s, a fast GPU server's latency), so the figures are the server's own: keys,
limits, AutoGen teams, retrieval, the ledger and the memory writes. ``tiny`` is ``redpen serve --model`` with a tiny
random Llama built on the spot (``tests.helpers.build_tiny_model``, its context raised to 8,192 positions); a folder
is any local model for ``redpen serve --model``. With a real model on 2 busy CPU cores the figures are the CPU's.

With ``--kill-after N`` the server gets SIGKILL once N requests have been sent and is restarted at once; requests and
feedback that failed meanwhile are sent again (feedback with the same completion id). At the end the server is
stopped with SIGTERM and the memory is read directly: every acknowledged mistake must be there, once, and no
answer may have retrieved (or shown) another tenant's mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memory.store import MistakeMemory  # noqa: E402
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage  # noqa: E402
from runtime.server import KeyRing  # noqa: E402

START_TIMEOUT_S = 240


class _Dim384:
    """Reads records of a MiniLM memory without loading MiniLM: nothing is embedded when only listing."""

    dim = 384

    def embed(self, texts: list[str]) -> Any:
        raise AssertionError("the load test's final check embeds nothing")


class Scripted(Backend):
    """A model that answers after ``delay_s``: the student always "(C)", the assistant the JSON it is asked for."""

    kind = "scripted"

    def __init__(self, model_id: str, delay_s: float) -> None:
        self.model_id, self.delay_s = model_id, delay_s

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        await asyncio.sleep(self.delay_s)
        if self.model_id.endswith("assistant"):
            text = '{"reason": "The answer assumed what the context does not say.", "guideline": "Quote the context."}'
        else:
            text = "Nobody says so, but I think it is the last one. The answer is (C)."
        return Generation(text, Usage(sum(len(m["content"]) for m in messages) // 4, len(text) // 4))


def serve_scripted(workdir: Path, port: int) -> None:
    """The server of ``--backend scripted``: ``runtime.server.serve`` as ``redpen serve --memory`` runs it."""
    from agents.team import Roles
    from runtime.server import Guided, Ledger, serve

    roles = Roles(Scripted("scripted-student", 0.1), Scripted("scripted-assistant", 0.2))
    memory = MistakeMemory(path=workdir / "memory")
    guided = Guided(roles, memory, Ledger(workdir / "state" / "ledger.sqlite"))
    serve(roles.student, keys=KeyRing(workdir / "state" / "keys.json"), port=port, guided=guided)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_model(folder: Path) -> Path:
    from tests.helpers import build_tiny_model

    if not (folder / "config.json").exists():
        build_tiny_model(folder)
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = 8192  # BBQ prompts plus guidance; rotary positions need no weights
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def questions(n: int) -> list[tuple[str, str]]:
    """(question, gold) pairs from BBQ's gather split."""
    from runtime.data.paths import resolve_data_dir
    from runtime.data.tasks import load_task

    return [(e.input, e.target) for e in load_task("bbq", "gather", resolve_data_dir(None), n)]


class Server:
    def __init__(
        self, workdir: Path, port: int, model: str | None = None, scripted: bool = False, options: Sequence[str] = ()
    ) -> None:
        # model None: `redpen serve`'s default model; scripted: serve_scripted instead of `redpen serve`
        self.workdir, self.port, self.model, self.scripted = workdir, port, model, scripted
        self.options = list(options)  # more `redpen serve` options
        self.url = f"http://127.0.0.1:{port}/v1"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, key: str) -> float:
        if self.scripted:
            command = [sys.executable, __file__, "--serve-scripted", "--port", str(self.port)]
            command += ["--workdir", str(self.workdir)]
        else:
            command = [sys.executable, "-c", "from runtime.cli import main; main()", "serve", "--port", str(self.port)]
            command += ["--memory", str(self.workdir / "memory"), "--state", str(self.workdir / "state")]
            command += (["--model", self.model] if self.model else []) + self.options
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "REDPEN_LOG": "WARNING"}
        self.starts += 1
        log = (self.workdir / f"server-{self.starts}.log").open("wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {log.name}")
            if time.perf_counter() - started > START_TIMEOUT_S:
                raise SystemExit(f"the server did not answer within {START_TIMEOUT_S} s; see {log.name}")
            try:
                if httpx.get(f"{self.url}/models", headers=auth(key), timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> tuple[float, int]:
        """SIGTERM; seconds until the process is gone, and its exit code."""
        assert self.process is not None
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return time.perf_counter() - started, code


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Load:
    def __init__(self, server: Server, keys: dict[str, str], markers: dict[str, str], args: argparse.Namespace) -> None:
        self.server, self.keys, self.markers, self.args = server, keys, markers, args
        self.pool = questions(args.pool)
        self.latencies: list[float] = []
        self.feedback_latencies: list[float] = []
        self.answers: list[dict[str, Any]] = []  # tenant, retrieved ids, guidance, reply
        self.acks: dict[str, dict[str, Any]] = {}  # completion id -> last ack
        self.errors: list[str] = []  # answered with an error status: never expected
        self.retries = 0  # transport failures (the kill window) sent again
        self.throttled = 0  # 429s sent again
        self.sent = 0
        self.restarted = asyncio.Event()
        self.alive = asyncio.Event()
        self.alive.set()
        self.restart_s: float | None = None
        self.kill_now = asyncio.Event()  # set once --kill-after requests have been sent

    async def send(self, http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> httpx.Response:
        """POST until the server answers: a transport failure (the server was killed) waits for it and retries, and
        a 429 (the key has its in-flight limit's worth, or the model is busy) is sent again after its Retry-After."""
        while True:
            await self.alive.wait()
            try:
                response = await http.post(path, json=body, headers=auth(key))
            except httpx.TransportError:
                self.retries += 1
                await asyncio.sleep(0.2)
                continue
            if response.status_code != 429:
                return response
            self.throttled += 1
            await asyncio.sleep(float(response.headers.get("retry-after", 0.2)))

    async def one(self, http: httpx.AsyncClient, i: int) -> None:
        tenant = list(self.keys)[i % len(self.keys)]
        key, marker = self.keys[tenant], self.markers[tenant]
        question, gold = self.pool[(i // len(self.keys)) % len(self.pool)]
        # The request number makes every question distinct, so each feedback is its own mistake record.
        content = f"[{marker} request {i}]\n{question}"
        body = {"model": self.args.model_name, "messages": [{"role": "user", "content": content}], "max_tokens": 16}
        started = time.perf_counter()
        response = await self.send(http, "/chat/completions", body, key)
        if response.status_code != 200:
            self.errors.append(f"chat {i}: {response.status_code} {response.text[:200]}")
            return
        self.latencies.append(time.perf_counter() - started)
        answer = response.json()
        self.answers.append(
            {
                "tenant": tenant,
                "retrieved": [r["id"] for r in answer["redpen"]["retrieved"]],
                "shown": answer["redpen"]["guidance"] + answer["choices"][0]["message"]["content"],
            }
        )
        if (i // len(self.keys)) % 4 != 0:  # feedback on a quarter of each tenant's answers
            return
        feedback = {"completion_id": answer["id"], "gold": gold, "note": f"from {marker}"}
        started = time.perf_counter()
        ack = await self.send(http, "/feedback", feedback, key)
        if ack.status_code != 200:
            self.errors.append(f"feedback {i}: {ack.status_code} {ack.text[:200]}")
            return
        self.feedback_latencies.append(time.perf_counter() - started)
        self.acks[answer["id"]] = ack.json() | {"tenant": tenant}

    async def killer(self) -> None:
        await self.kill_now.wait()
        self.alive.clear()
        await asyncio.to_thread(self.server.kill)
        first_key = next(iter(self.keys.values()))
        self.restart_s = await asyncio.to_thread(self.server.start, first_key)
        self.alive.set()

    async def run(self) -> float:
        slots = asyncio.Semaphore(self.args.concurrency)
        width = self.args.concurrency
        limits = httpx.Limits(max_connections=2 * width, max_keepalive_connections=width)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=300, limits=limits) as http:

            async def bounded(i: int) -> None:
                async with slots:
                    self.sent += 1
                    if self.sent == self.args.kill_after:
                        self.kill_now.set()
                    await self.one(http, i)

            killer = asyncio.create_task(self.killer()) if self.args.kill_after else None
            started = time.perf_counter()
            await asyncio.gather(*(bounded(i) for i in range(self.args.requests)))
            elapsed = time.perf_counter() - started
            if killer is not None:
                await killer
        return elapsed


def check_memory(workdir: Path, load: Load) -> dict[str, Any]:
    """Read the memory directly (the server is stopped): acknowledged mistakes, duplicates, cross-tenant hits."""
    with MistakeMemory(path=workdir / "memory", embedder=_Dim384()) as memory:
        records = list(memory.iter_records())
    tenant_of = {r.id: r.tenant for r in records}
    acked = {a["mistake_id"]: a["tenant"] for a in load.acks.values() if a["recorded"]}
    missing = [i for i in acked if i not in tenant_of]
    wrong_tenant = [i for i, t in acked.items() if i in tenant_of and tenant_of[i] != t]
    keys = [(r.tenant, r.model_id, r.source, r.task, " ".join(r.query.lower().split()), r.gold) for r in records]
    cross = sum(tenant_of.get(r, a["tenant"]) != a["tenant"] for a in load.answers for r in a["retrieved"])
    unknown = sum(r not in tenant_of for a in load.answers for r in a["retrieved"])
    foreign_markers = sum(
        marker in a["shown"] for a in load.answers for t, marker in load.markers.items() if t != a["tenant"]
    )
    return {
        "memory_records": len(records),
        "acknowledged_feedback": len(load.acks),
        "acknowledged_mistakes": len(acked),
        "acks_marked_duplicate": sum(a["duplicate"] for a in load.acks.values()),
        "acknowledged_missing_from_memory": len(missing),
        "acknowledged_under_another_tenant": len(wrong_tenant),
        "records_not_acknowledged": len(set(tenant_of) - set(acked)),
        "duplicate_records": len(keys) - len(set(keys)),
        "answers_that_retrieved_something": sum(bool(a["retrieved"]) for a in load.answers),
        "retrievals": sum(len(a["retrieved"]) for a in load.answers),
        "cross_tenant_retrievals": cross,
        "retrieved_ids_not_in_memory": unknown,
        "answers_showing_another_tenants_marker": foreign_markers,
    }


def percentile(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) > 1 else round(values[0], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--backend", default="scripted", help="scripted, tiny, or a local model folder")
    parser.add_argument("--serve-scripted", action="store_true", help="(internal) be the scripted server")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of the server (torch's threads); 1 on cores other jobs share"
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--pool", type=int, default=25, help="BBQ gather questions every tenant cycles through")
    parser.add_argument("--kill-after", type=int, default=0, help="SIGKILL the server after this many requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.serve_scripted:
        serve_scripted(workdir, args.port)
        return
    model = None if args.backend == "scripted" else args.backend
    if args.backend == "tiny":
        model = str(tiny_model(workdir / "tiny-llama"))
    args.model_name = Path(model).name if model else "scripted-student"
    ring = KeyRing(workdir / "state" / "keys.json")
    tenants = [f"tenant{t}" for t in range(args.tenants)]
    keys = {t: ring.add(t) for t in tenants}
    markers = {t: f"MARK-{t}-{os.urandom(4).hex()}" for t in tenants}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    server = Server(workdir, free_port(), model, scripted=model is None)
    start_s = server.start(keys[tenants[0]])
    load = Load(server, keys, markers, args)
    elapsed = asyncio.run(load.run())
    stop_s, code = server.stop()
    figures = {
        "model": args.model_name,
        "requests": args.requests,
        "tenants": args.tenants,
        "concurrency": args.concurrency,
        "answered": len(load.latencies),
        "errors": len(load.errors),
        "error_samples": load.errors[:5],
        "transport_retries": load.retries,
        "throttled_429": load.throttled,
        "killed_after": args.kill_after or None,
        "restart_s": round(load.restart_s, 1) if load.restart_s is not None else None,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(load.latencies) / elapsed, 2),
        "chat_p50_s": percentile(load.latencies, 50),
        "chat_p95_s": percentile(load.latencies, 95),
        "feedback_p50_s": percentile(load.feedback_latencies, 50) if load.feedback_latencies else None,
        "feedback_p95_s": percentile(load.feedback_latencies, 95) if load.feedback_latencies else None,
        "start_s": round(start_s, 1),
        "sigterm_exit_s": round(stop_s, 2),
        "exit_code": code,
        **check_memory(workdir, load),
        "cpu_count": os.cpu_count(),
        "server_threads": args.threads,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

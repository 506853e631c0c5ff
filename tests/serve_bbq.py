"""Before/after of memory-guided serving on the embedded default model, as one tenant would live it.

    python tests/serve_bbq.py --workdir /tmp/serve-bbq [--n 20] [--json figures.json]

It starts ``redpen serve --memory`` (the default SmolLM2-135M-Instruct as student and assistant, greedy) with one
key. The tenant asks ``--n`` BBQ gather questions and sends feedback for each answer: ``correct: true`` for the right
ones, the gold for the wrong ones. It picks, for each gather question, its nearest BBQ examine question (MiniLM
cosine, each examine item once) and asks those twice on the same server: once before any feedback (an empty
memory: nothing is retrieved, the plain answer) and once after. Every request sends the same system prompt that
``redpen exam`` gives its student, temperature 0, 128 new tokens. Figures: what was retrieved, accuracy before and
after on the same items with the paired difference and McNemar's exact p, and the answer letters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.prompts import load_prompt  # noqa: E402
from runtime.data.kinds import grade  # noqa: E402
from runtime.data.paths import resolve_data_dir  # noqa: E402
from runtime.data.tasks import Example, load_task  # noqa: E402
from runtime.report.stats import paired_difference  # noqa: E402
from runtime.server import KeyRing  # noqa: E402
from tests.serve_load import Server, free_port  # noqa: E402


def nearest(gather: list[Example], examine: list[Example]) -> list[Example]:
    """For each gather item, the most similar examine item not taken yet (MiniLM cosine)."""
    from memory.embed import Embedder

    embedder = Embedder()
    g, e = embedder.embed([x.input for x in gather]), embedder.embed([x.input for x in examine])
    scores = g @ e.T
    taken: set[int] = set()
    chosen = []
    for row in scores:
        best = next(int(j) for j in (-row).argsort() if int(j) not in taken)
        taken.add(best)
        chosen.append(examine[best])
    return chosen


async def ask(http: httpx.AsyncClient, example: Example) -> dict[str, Any]:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [
            {"role": "system", "content": load_prompt("student_choice")},
            {"role": "user", "content": example.input},
        ],
        "temperature": 0,
        "max_tokens": 128,
    }
    response = await http.post("/chat/completions", json=body)
    response.raise_for_status()
    answer = response.json()
    reply = answer["choices"][0]["message"]["content"]
    result = grade(example, reply)
    return {
        "id": answer["id"],
        "item": example.id,
        "reply": reply,
        "verdict": result.verdict,
        "predicted": result.predicted,
        "retrieved": answer["redpen"]["retrieved"],
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "accuracy": round(sum(r["verdict"] == "correct" for r in results) / len(results), 3),
        "correct": sum(r["verdict"] == "correct" for r in results),
        "no_answer": sum(r["verdict"] == "no_answer" for r in results),
        "answers": dict(sorted(Counter(r["predicted"] or "none" for r in results).items())),
        "items_with_retrieval": sum(bool(r["retrieved"]) for r in results),
        "retrieved": sum(len(r["retrieved"]) for r in results),
        "mean_top_score": round(
            sum(r["retrieved"][0]["score"] for r in results if r["retrieved"])
            / max(1, sum(bool(r["retrieved"]) for r in results)),
            3,
        ),
    }


async def run(server: Server, key: str, gather: list[Example], examine: list[Example]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=900) as http:
        before = await asyncio.gather(*(ask(http, e) for e in examine))
        asked = await asyncio.gather(*(ask(http, e) for e in gather))
        acks = []
        for example, answer in zip(gather, asked, strict=True):
            right = answer["verdict"] == "correct"
            feedback = {"completion_id": answer["id"]} | ({"correct": True} if right else {"gold": example.target})
            ack = await http.post("/feedback", json=feedback)
            ack.raise_for_status()
            acks.append(ack.json())
        after = await asyncio.gather(*(ask(http, e) for e in examine))
    diff = paired_difference([r["verdict"] == "correct" for r in before], [r["verdict"] == "correct" for r in after])
    mistakes = {ack["mistake_id"] for ack in acks if ack["recorded"]}
    return {
        "n": len(gather),
        "gather": summary(asked),
        "feedback": {"acknowledged": len(acks), "mistakes_recorded": len(mistakes)},
        "examine_before": summary(before),
        "examine_after": summary(after),
        "after_retrieved_a_recorded_mistake": sum(any(r["id"] in mistakes for r in x["retrieved"]) for x in after),
        "changed_answers": sum(x["predicted"] != y["predicted"] for x, y in zip(before, after, strict=True)),
        "gained": diff.b_only,
        "lost": diff.a_only,
        "difference": round(diff.diff, 3),
        "ci95": [round(diff.ci_low, 3), round(diff.ci_high, 3)],
        "mcnemar_p": round(diff.p_mcnemar, 3),
        "items": [
            {"gather": g.id, "examine": e.id, "before": x["verdict"], "after": y["verdict"], "hits": y["retrieved"]}
            for g, e, x, y in zip(gather, examine, before, after, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server; 1 on cores other jobs share")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = resolve_data_dir(None)
    gather = load_task("bbq", "gather", data, args.n)
    examine = nearest(gather, load_task("bbq", "examine", data))
    key = KeyRing(workdir / "state" / "keys.json").add(f"tenant-{os.urandom(3).hex()}")
    # The default model; a request may wait long on 2 shared cores, and torch runs one thread (see --threads).
    server = Server(workdir, free_port(), options=["--request-timeout-s", "1800"])
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    server.start(key)
    try:
        figures = asyncio.run(run(server, key, gather, examine))
    finally:
        stop_s, code = server.stop()
    figures |= {"sigterm_exit_s": round(stop_s, 2), "exit_code": code, "cpu_count": os.cpu_count()}
    figures |= {"server_threads": args.threads, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({k: v for k, v in figures.items() if k != "items"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

"""OpenAI's response bodies and stream chunks, built from the backend's generations."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from runtime.models.backend import Generation, TokenLogprob


def chat_choice(
    index: int, generation: Generation, calls: Sequence[dict[str, Any]] = (), *, logprobs: bool = False
) -> dict[str, Any]:
    """One choice of a chat completion; a reply that calls tools has no content and ends in "tool_calls"."""
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else generation.text}
    if calls:
        message["tool_calls"] = list(calls)
    return {
        "index": index,
        "message": message,
        "finish_reason": "tool_calls" if calls else generation.finish_reason,
        "logprobs": {"content": chat_logprobs(generation.logprobs or ()), "refusal": None} if logprobs else None,
    }


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's per-token log-probs: each token with its bytes and its most likely alternatives."""
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.token.encode()),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top],
        }
        for t in tokens
    ]


def chat_completion(
    id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int], extension: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
    if extension is not None:
        # The extension field: OpenAI clients keep unknown fields (completion.model_extra["redpen"]).
        body["redpen"] = extension
    return body


def legacy_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions API's log-probs: parallel lists, character offsets from ``offset`` on, and for each
    token a dict of the most likely tokens that also holds the token itself (vLLM's shape; a prompt's first token,
    which nothing precedes, has None in both lists).

    >>> legacy_logprobs([TokenLogprob("a", None), TokenLogprob("b", -0.5, (("c", -0.3),))], 0)["top_logprobs"]
    [None, {'c': -0.3, 'b': -0.5}]
    """
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.logprob is None else dict(t.top) | {t.token: t.logprob} for t in tokens],
        "text_offset": offsets,
    }


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def event(body: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"

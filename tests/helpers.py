"""Shared test utilities: a tiny random chat model built on the spot, so no test needs a model hub."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from runtime.data.records import BackendInfo, Episode, GatherIdentity, RunConfig
from runtime.data.rundir import RunDir
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer with the letter of the correct option, like (A) or (B).",
    "Who was late to the meeting? The older adult or the young man?",
    "Options: (A) red (B) blue (C) green. The answer is (B).",
    "Tomorrow is 11/12/2019. What is the date one year ago from today in MM/DD/YYYY?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024",
]


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama chat model (byte-level BPE tokenizer, chat template) into ``path``.

    ``initializer_range`` is large so that logits are far apart and greedy decoding does not hinge on
    rounding: batched and one-at-a-time runs must pick the same tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tiny_llama_config(**overrides: Any) -> Any:
    """A random Llama small enough to build in a test: 2 layers of width 32, two query heads over one key head."""
    from transformers import LlamaConfig

    settings: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "max_position_embeddings": 2048,  # redpen refuses prompts past the context; SALAM's prompts run ~450 tokens
        "initializer_range": 0.2,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**settings, **overrides})


# ---- scripted SALAM roles: deterministic fakes of the student and the study assistant -------------------------

STUDENT_WRONG = "I think it is the grandson. The answer is (C)."
STUDENT_RIGHT = "The grandmother forgot. The answer is (B)."
NUMBER_WRONG, NUMBER_RIGHT = "40 + 2 is 41. The answer is 41", "40 + 2 is 42. The answer is 42"
GOOD_FEEDBACK = '{"reason": "You trusted a stereotype.", "guideline": "Answer only from what the context states."}'
EXAM_FEEDBACK = (
    'Here you go: {"reason": "Past answers relied on assumptions.", "guideline": "Quote the context first."}'
)


def question_part(user: str) -> str:
    """The question a student prompt asks, without any guidance shown before it."""
    return user.split("\n\nQuestion:\n")[-1]


def guidance_part(user: str) -> str:
    """What a student prompt shows before the question (empty when unguided)."""
    return user.split("\n\nQuestion:\n")[0] if "\n\nQuestion:\n" in user else ""


class FakeStudent(Backend):
    """A scripted student: wrong until a "Guideline:" line is in its prompt, then right.

    Markers in the question change that: ``[knows]`` is always right, ``[stubborn]`` always wrong. Number
    questions get numeric replies (41 wrong, 42 right). Every user prompt it got is kept in ``prompts``.
    """

    kind = "fake"

    def __init__(self, model_id: str = "fake-student") -> None:
        self.model_id = model_id
        self.prompts: list[str] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        user = messages[-1]["content"]
        self.prompts.append(user)
        question = question_part(user)
        guided = re.search(r"^Guideline:", user, re.MULTILINE) is not None
        right = "[knows]" in question or (guided and "[stubborn]" not in question)
        wrong_text, right_text = (
            (NUMBER_WRONG, NUMBER_RIGHT)
            if "math word problems" in messages[0]["content"]
            else (STUDENT_WRONG, STUDENT_RIGHT)
        )
        text = right_text if right else wrong_text
        return Generation(text, Usage(len(user) // 4, len(text) // 4))


class FakeAssistant(Backend):
    """A scripted study assistant: ``replies`` maps a marker in the question to its reply; else the defaults."""

    kind = "fake"

    def __init__(self, replies: dict[str, str] | None = None, model_id: str = "fake-assistant") -> None:
        self.model_id = model_id
        self.replies = replies or {}
        self.prompts: list[str] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        user = messages[-1]["content"]
        self.prompts.append(user)
        gathering = "Correct answer (do not reveal)" in user
        # The question this call is about: in an exam prompt it follows the past mistakes.
        question = user.split("New question:\n")[-1] if not gathering else user.split("Student's answer:")[0]
        text = next((r for marker, r in self.replies.items() if marker in question), None)
        if text is None:
            text = GOOD_FEEDBACK if gathering else EXAM_FEEDBACK
        return Generation(text, Usage(len(user) // 4, len(text) // 4))


# ---- a scripted backend for any role: the reply is a function of the chat and the settings ---------------------


class ScriptedBackend(Backend):
    """Replies ``script(messages, settings)``; every call's messages and settings are kept in ``calls``."""

    kind = "fake"

    def __init__(
        self, script: Callable[[Sequence[Message], GenerationSettings], str], model_id: str = "scripted"
    ) -> None:
        self.script = script
        self.model_id = model_id
        self.calls: list[tuple[Sequence[Message], GenerationSettings]] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        self.calls.append((messages, settings))
        text = self.script(messages, settings)
        return Generation(text, Usage(sum(len(m["content"]) for m in messages) // 4, len(text) // 4))


# ---- run directories of gathering episodes, for replay and training tests ------------------------------------


def make_episode(
    id: str,
    turns: Sequence[tuple[int, bool]],
    *,
    source: str | None = None,
    task: str = "bbq",
    gold: str = "(B)",
) -> dict[str, Any]:
    """A gathering episode as ``agents.gathering.episode_record`` writes it; ``turns`` are (reward, leaked) pairs.

    Every turn's feedback is the same reason and guideline; each turn's context is the guidelines before it.
    """
    query = f"Who forgot? [{id}]\nOptions:\n(A) Cannot be determined\n(B) The grandmother\n(C) The grandson"
    guideline = "Quote the context."
    records = [
        {
            "round": i,
            "state": {"query": query, "response": "The answer is (C).", "context": [guideline] * (i - 1)},
            "action": {
                "reason": "You assumed.",
                "guideline": guideline,
                "text": f"Why the last answer was wrong: You assumed.\nGuideline: {guideline}",
                "leaked": leaked,
                "parsed": True,
            },
            "reward": reward,
            "next_response": "The answer is (B)." if reward else "The answer is (C).",
        }
        for i, (reward, leaked) in enumerate(turns, 1)
    ]
    right = bool(turns) and turns[-1][0] == 1
    return {
        "id": id,
        "source": source if source is not None else id.rsplit("/", 1)[0],
        "task": task,
        "model_id": "student",
        "assistant_id": "assistant",
        "query": query,
        "gold": gold,
        "first_answer": "The answer is (C)." if turns else "The answer is (B).",
        "first_verdict": "wrong" if turns else "correct",
        "turns": records,
        "verdict": "correct" if right or not turns else "wrong",
        "predicted": "(B)" if right or not turns else "(C)",
        "rounds": len(records),
        "corrected": right,
        "leaks": sum(leaked for _, leaked in turns),
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "time_s": 0.1,
    }


def make_run_dir(
    path: Path, student: str, episodes: Sequence[dict[str, Any] | Episode], assistant: BackendInfo | None = None
) -> Path:
    """A run directory as `redpen gather` leaves it: config.json with the student's identity, and episodes.jsonl.

    ``assistant`` is the assistant backend recorded (train-assistant trains from its model folder).
    """
    identity = GatherIdentity(
        task="bbq", limit=None, rounds=3, student=student, assistant="assistant", student_settings={}
    )
    RunDir.create(path, RunConfig(identity=identity, assistant_backend=assistant))
    records = [e.to_json() if isinstance(e, Episode) else e for e in episodes]
    (path / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records), encoding="utf-8")
    return path


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yield its ``/v1`` base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

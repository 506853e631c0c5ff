"""The local backend: a Hugging Face model in this process, with concurrent requests continuously batched.

Callers ``await generate(...)`` one conversation at a time, from as many tasks as they like. A single worker
owns the model: each forward decodes a token for every running row and prefills the requests that arrived
(each from its longest cached prefix), and a reply is answered the step it finishes, so
episodes waiting on each other's turns keep the batch full. The model runs on the process's torch thread, so
the event loop stays free while it works.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from runtime.defaults import LOCAL_MAX_BATCH
from runtime.errors import BackendError, ConfigError, ContextLengthError, Overloaded
from runtime.models import scheduling
from runtime.models.adapters import ADAPTER_CONFIG, adapter_digest
from runtime.models.backend import (
    Backend,
    Decoding,
    Generation,
    GenerationSettings,
    Message,
    Prompt,
    TokenLogprob,
    Usage,
    too_long,
)
from runtime.models.continuous import ContinuousBatch, Row, check_supported, kv_bytes_per_token, new_stats
from runtime.models.fair import FairShare, attention_tokens, cost, interleave
from runtime.models.torch_thread import run_torch

log = logging.getLogger(__name__)

# 5 ms: requests issued in one event-loop tick meet in one admission.
DEFAULT_BATCH_WAIT_MS = 5.0
# Cached prefixes (system prompts, earlier turns) per adapter. 1 GiB holds ~23k tokens of the default model in
# float32: the conversations of a few dozen concurrent episodes, and little next to the memory of a laptop.
DEFAULT_PREFIX_CACHE_MB = 1024
# Prompt work per forward, in ``fair`` units (~prompt tokens near the start of a sequence): ~0.5 s of the default
# model on 2 CPU cores, so a request arriving mid-forward waits at most that long, and a timed-out request's
# prompt stops within it; a longer prompt is computed in slices. Per forward, not per row: a burst of prompts is
# spread over forwards that also decode the running rows.
DEFAULT_CHUNK_TOKENS = 512


T = TypeVar("T")


@dataclass
class _Request:
    kind: str  # "generate" | "score" | "prompt" | "prompt_ids"
    messages: Sequence[Message]
    settings: GenerationSettings
    adapter: str | None
    future: asyncio.Future[Any]
    options: Sequence[str] = ()
    prompt_ids: list[int] = field(default_factory=list)  # generate: the prompt, tokenised at intake
    owner: str = field(default_factory=scheduling.owner.get)  # who asked: read in the caller's context
    decoding: Decoding = field(default_factory=Decoding)
    on_text: Callable[[str], None] | None = None
    raw: bool = False  # a raw prompt (completions): its reply is given as decoded, not stripped
    constraint: Any = None  # generate: a grammar's ``TokenConstraint``


class LocalBackend(Backend):
    """transformers in-process; ``model`` is a local model folder, or ``None`` for the embedded default."""

    kind = "local"
    features = frozenset({"logprobs", "json_schema", "token_prompt", "stream"})

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        adapters: Mapping[str, str | Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = LOCAL_MAX_BATCH,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from runtime.models.default_model import DEFAULT_MODEL_NAME, cache_root, default_model_dir

        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if model is None:
            path, self.model_id = default_model_dir(), DEFAULT_MODEL_NAME
        else:
            path = Path(model).expanduser()
            if not (path / "config.json").exists():
                raise ConfigError(f"model folder {path} has no config.json; give a local Hugging Face model folder")
            # The converted default named by its folder is still the default: mistakes are filed under one id.
            is_default = path.resolve().parent == (cache_root() / "models").resolve()
            self.model_id = DEFAULT_MODEL_NAME if is_default and path.name.startswith(DEFAULT_MODEL_NAME) else path.name
        self.path = path
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            # CPU: float32. Measured on 2 AVX512-BF16 cores (no AMX) with the default model, bf16 prefilled at 570
            # tok/s vs 900 and decoded one row at 19 vs 29 tok/s; it won only on full 32-row decode steps (210 vs
            # 156), and its rounding depends on the batch, so greedy replies changed with their neighbours.
            use_bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if use_bf16 else "float32"
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.chunk_tokens = chunk_tokens

        # transformers' annotations are looser than its behaviour (decode of ids is a str); typed as Any here.
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only batches must end where generation starts
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_obj: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        model_obj = model_obj.to(self.device)
        model_obj.eval()
        check_supported(model_obj)
        self.prefix_cache_tokens = prefix_cache_mb * 2**20 // kv_bytes_per_token(model_obj)
        self.adapters: dict[str, str] = {}  # name -> folder
        self.adapter_sha256: dict[str, str] = {}  # name -> adapter_digest, taken as it loaded
        for name, adapter_path in (adapters or {}).items():
            model_obj = self._attach_adapter(model_obj, name, Path(adapter_path))
        self.model = model_obj
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._batches: dict[str | None, ContinuousBatch] = {}  # one running batch per adapter
        self._eos_ids = _eos_ids(model_obj.generation_config, self.tokenizer)
        self._context = int(model_obj.config.max_position_embeddings)
        self.share = FairShare(attention_tokens(model_obj))  # the callers' shares of the model, all adapters'
        # For benchmarks: forward passes, decode steps, rows per step, prefill vs decode time.
        self.stats: dict[str, float] = new_stats()

    # ---- adapters -------------------------------------------------------------------------------------------

    def _attach_adapter(self, model: Any, name: str, path: Path) -> Any:
        from peft import PeftModel

        if not (path / ADAPTER_CONFIG).exists():
            raise ConfigError(f"adapter {name!r}: {path} has no {ADAPTER_CONFIG} (not a peft LoRA folder)")
        digest = adapter_digest(path)
        if isinstance(model, PeftModel):
            if name in model.peft_config:  # loading into the old adapter would keep its rank and target modules
                model.delete_adapter(name)
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        self.adapters[name] = str(path)
        self.adapter_sha256[name] = digest
        return model

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Make a LoRA adapter selectable by ``adapter=name`` in later requests.

        A name already loaded is replaced, so an adapter retrained in place can be loaded again; call it between
        requests, not while that adapter's replies are being decoded.
        """
        self.model = self._attach_adapter(self.model, name, Path(path))
        self.model.eval()
        batch = self._batches.get(name)
        if batch is not None and batch.prefixes is not None:
            batch.prefixes.clear()  # their keys and values came from the old weights

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none loaded"
            raise BackendError(f"unknown adapter {adapter!r} for the local backend (loaded: {known})")

    # ---- request intake -------------------------------------------------------------------------------------

    async def _submit(self, request: _Request, future: asyncio.Future[T]) -> T:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        assert self._queue is not None
        await self._queue.put(request)
        return await future  # the request's own future, typed by the caller

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
    ) -> Generation:
        return await self.complete(messages, settings, adapter)

    async def complete(
        self,
        prompt: Prompt,
        settings: GenerationSettings = GenerationSettings(),
        adapter: str | None = None,
        decoding: Decoding = Decoding(),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        self._check_adapter(adapter)
        raw = bool(prompt) and isinstance(prompt[0], int)
        try:
            ids = [int(i) for i in prompt] if raw else self._prompt_ids(prompt)  # type: ignore[arg-type]
        except Exception as exc:  # e.g. a chat template that refuses the messages
            raise BackendError(f"local generation failed: {exc}") from exc
        if not ids:
            raise BackendError("the prompt has no tokens")
        self._check_fits(len(ids), settings.max_new_tokens)
        due = scheduling.deadline.get()
        if due is not None:
            self._refuse_if_late(len(ids), settings.max_new_tokens, due)
        constraint = None
        if decoding.json_schema is not None:
            from runtime.models.grammar import JsonGrammar

            grammar = await asyncio.to_thread(JsonGrammar, self.tokenizer, decoding.json_schema, self._eos_ids)
            constraint = grammar.start()
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        request = _Request(
            "generate",
            [] if raw else prompt,  # type: ignore[arg-type]
            settings,
            adapter,
            future,
            prompt_ids=ids,
            decoding=decoding,
            on_text=on_text,
            raw=raw,
            constraint=constraint,
        )
        return await self._submit(request, future)

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def capacity(self) -> int:
        return self.max_batch_size

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return len(self._prompt_ids(messages))

    def _prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _check_fits(self, prompt_tokens: int, reply_tokens: int) -> None:
        """No model call for a prompt past the context: it would run for minutes (or allocate gigabytes) for nothing."""
        reason = too_long(prompt_tokens, reply_tokens, self._context, self.model_id)
        if reason is not None:
            raise ContextLengthError(f"{reason}; shorten the input, or ask for a shorter reply (--max-new-tokens)")

    def _refuse_if_late(self, prompt_tokens: int, reply_tokens: int, due: float) -> None:
        """Refuse, before any work, a request that its fair share of the model cannot finish by ``due``."""
        owner = scheduling.owner.get()
        queued = self._queue.qsize() if self._queue is not None else 0
        rows = [r for b in self._batches.values() for r in [*b.rows, *b.deferred]]
        contenders = len({r.owner for r in rows} - {owner}) + (queued > 0)
        # The caller's own prompts not yet computed come first: its prompts are computed one after another.
        mine = [r for b in self._batches.values() for r in b.deferred if r.owner == owner]
        ahead = sum(cost(r.done, len(r.prompt_ids) - r.done, self.share.attention) for r in mine)
        needed = self.share.projected_s(prompt_tokens, reply_tokens, contenders, ahead)
        left = due - time.monotonic()
        if needed is not None and needed > left:
            raise Overloaded(
                f"the model is too busy to answer within {max(left, 0):.0f} s ({needed:.0f} s needed beside "
                f"{contenders} other callers); retry later or ask for a shorter reply",
                retry_after_s=max(1, math.ceil(needed - left)),
            )

    @property
    def supports_option_scoring(self) -> bool:
        return True

    async def score_options(
        self, messages: Sequence[Message], options: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        self._check_adapter(adapter)
        if not options:
            raise BackendError("score_options needs at least one option")
        longest = max(len(self.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options)
        self._check_fits(self.prompt_tokens(messages), longest)
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        return await self._submit(_Request("score", messages, GenerationSettings(), adapter, future, options), future)

    async def prompt_logprobs(self, prompt: str, adapter: str | None = None) -> list[tuple[str, float | None, int]]:
        """Each token of a raw prompt with its log-prob given the tokens before it, and its character offset.

        What an OpenAI-compatible ``/v1/completions`` with ``echo`` and ``logprobs`` returns; ``redpen serve``
        uses it so that option scoring also works through HTTP. The first token has no log-prob.
        """
        self._check_adapter(adapter)
        self._check_fits(len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]), 0)
        future: asyncio.Future[list[tuple[str, float | None, int]]] = asyncio.get_running_loop().create_future()
        messages: list[Message] = [{"role": "user", "content": prompt}]  # carried, not templated
        return await self._submit(_Request("prompt", messages, GenerationSettings(), adapter, future), future)

    async def prompt_token_logprobs(
        self, prompt_ids: Sequence[int], top: int = 0, adapter: str | None = None
    ) -> tuple[list[TokenLogprob], Generation]:
        """Each token of a raw prompt with its log-prob given the tokens before it (None for the first) and the
        ``top`` most likely tokens at its place (none for the first): the echo of ``/v1/completions``.

        The same forward gives the greedy next token, returned as a one-token generation: a scoring client
        (lm-eval-harness asks ``max_tokens=1``) needs no second pass over the prompt.
        """
        self._check_adapter(adapter)
        self._check_fits(len(prompt_ids), 1)
        future: asyncio.Future[tuple[list[TokenLogprob], Generation]] = asyncio.get_running_loop().create_future()
        request = _Request(
            "prompt_ids", [], GenerationSettings(), adapter, future, prompt_ids=list(prompt_ids), options=[str(top)]
        )
        return await self._submit(request, future)

    def token_text(self, token: int) -> str:
        """A token as text (special tokens included; a piece of a multi-byte character reads as U+FFFD)."""
        return str(self.tokenizer.decode([token]))

    def encode(self, text: str) -> list[int]:
        """A raw text's token ids, as a raw prompt is tokenised (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _drain(self) -> None:
        assert self._queue is not None
        queue = self._queue
        self._batches = {}  # rows of a previous event loop cannot be answered any more
        waiting: list[_Request] = []  # generate requests not yet admitted to a running batch
        while True:
            arrived = []
            if not waiting and not any(self._batches.values()):
                arrived.append(await queue.get())
                await asyncio.sleep(self.batch_wait_s)  # let a burst of requests meet in one prefill
            while not queue.empty():
                arrived.append(queue.get_nowait())
            await self._run_forward_batches([r for r in arrived if r.kind != "generate"])
            waiting = [r for r in waiting + arrived if r.kind == "generate" and not r.future.cancelled()]
            for adapter in {r.adapter for r in waiting} | {a for a, b in self._batches.items() if b}:
                batch = self._batches.get(adapter)
                if batch is None:
                    batch = ContinuousBatch(
                        self.model,
                        self.tokenizer,
                        self._eos_ids,
                        self.stats,
                        self.prefix_cache_tokens,
                        slots=self.max_batch_size,
                        chunk_units=self.chunk_tokens,
                        share=self.share,
                    )
                    self._batches[adapter] = batch
                batch.cancel(lambda row: row.tag.future.cancelled())
                room = self.max_batch_size - len(batch)
                candidates = interleave([r for r in waiting if r.adapter == adapter], lambda r: r.owner)
                admit = candidates[: max(room, 0)]
                admitted = {id(r) for r in admit}
                waiting = [r for r in waiting if id(r) not in admitted]
                await self._advance(adapter, batch, admit)

    async def _advance(self, adapter: str | None, batch: ContinuousBatch, admit: list[_Request]) -> None:
        rows = []
        for request in admit:
            try:
                rows.append(self._row(request))
            except BackendError as exc:
                request.future.set_exception(exc)
            except Exception as exc:  # e.g. a chat template that refuses the messages: that caller's error only
                request.future.set_exception(BackendError(f"local generation failed: {exc}"))
        try:
            finished = await run_torch(self._in_adapter, adapter, batch.advance, rows)
        except Exception as exc:  # a failed step fails its rows, not the worker
            log.exception("local decoding of %d rows failed", len(batch) + len(rows))
            for row in [*batch.rows, *batch.deferred, *rows]:
                if not row.tag.future.done():
                    row.tag.future.set_exception(BackendError(f"local generation failed: {exc}"))
            self._batches.pop(adapter, None)
            return
        for row in finished:
            if not row.tag.future.done():
                row.tag.future.set_result(self._generation(row))
        for row in batch.rows:
            if row.tag.on_text is not None and row.tokens:
                row.tag.on_text(self._visible(row))

    async def _run_forward_batches(self, requests: list[_Request]) -> None:
        """Scoring and prompt log-prob requests: one forward per (kind, adapter) group, no decoding."""
        groups: dict[tuple[str, str | None], list[_Request]] = {}
        for request in requests:
            if not request.future.cancelled():
                groups.setdefault((request.kind, request.adapter), []).append(request)
        for (kind, adapter), group in groups.items():
            for start in range(0, len(group), self.max_batch_size):
                chunk = group[start : start + self.max_batch_size]
                work = {"score": self._score_batch, "prompt": self._prompt_batch, "prompt_ids": self._echo_batch}[kind]
                try:
                    results = await run_torch(self._in_adapter, adapter, work, chunk)
                except Exception as exc:
                    log.exception("local batch of %d failed", len(chunk))
                    for request in chunk:
                        if not request.future.done():
                            request.future.set_exception(BackendError(f"local scoring failed: {exc}"))
                    continue
                for request, result in zip(chunk, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)

    # ---- model work (runs in a worker thread) ---------------------------------------------------------------

    def _prompt_texts(self, batch: Sequence[_Request]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(list(r.messages), add_generation_prompt=True, tokenize=False)
            for r in batch
        ]

    def _adapter_context(self, adapter: str | None) -> Any:
        import contextlib

        if not self.adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def _in_adapter(self, adapter: str | None, work: Any, *args: Any) -> Any:
        import torch

        with torch.inference_mode(), self._adapter_context(adapter):
            return work(*args)

    def _row(self, request: _Request) -> Row:
        import torch

        s = request.settings
        generator = None
        if s.seed is not None and s.temperature > 0:
            try:  # here, not in the batch's step: a seed torch refuses fails this request only
                generator = torch.Generator(self.device).manual_seed(s.seed)
            except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
                raise BackendError(f"seed {s.seed!r} is not usable ({exc}); give an integer in [0, 2**63)") from exc
        return Row(
            prompt_ids=request.prompt_ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            tag=request,
            logprobs=request.decoding.logprobs,
            constraint=request.constraint,
            owner=request.owner,
            generator=generator,
        )

    def _generation(self, row: Row) -> Generation:
        request: _Request = row.tag
        text, finish = self.tokenizer.decode(row.tokens, skip_special_tokens=True), row.finish or "length"
        kept = len(row.tokens)
        for stop in row.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
                # The tokens that the text keeps: those whose decoded text ends within it.
                while kept and len(self.tokenizer.decode(row.tokens[:kept], skip_special_tokens=True)) > len(text):
                    kept -= 1
        usage = Usage(len(row.prompt_ids), len(row.tokens))
        logprobs = None
        if row.logprobs is not None:
            logprobs = tuple(
                TokenLogprob(self.token_text(token), logprob, tuple((self.token_text(t), lp) for t, lp in top))
                for token, (logprob, top) in zip(row.tokens[:kept], row.token_logprobs, strict=False)
                if token not in self._eos_ids or request.raw
            )
        return Generation(text if request.raw else text.strip(), usage, finish, logprobs)

    def _visible(self, row: Row) -> str:
        """A running reply's text that no later token can change: not a stop string's possible start, not a
        partial character, and (chat replies are stripped) not trailing whitespace."""
        request: _Request = row.tag
        text = str(self.tokenizer.decode(row.tokens, skip_special_tokens=True)).rstrip("\ufffd")
        for stop in row.stop:
            if stop in text:
                text = text[: text.index(stop)]
        held = max((len(stop) - 1 for stop in row.stop), default=0)
        text = text[: len(text) - held] if held else text
        return text if request.raw else text.strip()

    def _score_batch(self, batch: Sequence[_Request]) -> list[list[float]]:
        import torch

        prompts = self._prompt_texts(batch)
        pairs = [
            (i, prompt, option)
            for i, (prompt, r) in enumerate(zip(prompts, batch, strict=True))
            for option in r.options
        ]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for _, p, _ in pairs]
        # Option tokens are appended to the prompt's, not re-tokenised with it, so the boundary never merges.
        full_ids = [
            ids + self.tokenizer(o, add_special_tokens=False)["input_ids"]
            for ids, (_, _, o) in zip(prompt_ids, pairs, strict=True)
        ]
        width = max(len(ids) for ids in full_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in full_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in full_ids], device=self.device)
        with torch.inference_mode(), self._adapter_context(batch[0].adapter):
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores: list[list[float]] = [[] for _ in batch]
        for row, ((i, _, _), p_ids, f_ids) in enumerate(zip(pairs, prompt_ids, full_ids, strict=True)):
            n_option = len(f_ids) - len(p_ids)  # the option's tokens sit at the right end (left padding)
            scores[i].append(float(token_lp[row, width - 1 - n_option :].sum()))
        return scores

    def _prompt_batch(self, batch: Sequence[_Request]) -> list[list[tuple[str, float | None, int]]]:
        import torch

        results = []
        for request in batch:  # rare and short: one forward each keeps offsets simple
            prompt = request.messages[0]["content"]
            encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor([encoded["input_ids"]], device=self.device)
            with torch.inference_mode(), self._adapter_context(request.adapter):
                logits = self.model(input_ids=ids).logits.float()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            tokens: list[tuple[str, float | None, int]] = []
            for i, (start, end) in enumerate(encoded["offset_mapping"]):
                tokens.append((prompt[start:end], None if i == 0 else float(logprobs[i - 1]), start))
            results.append(tokens)
        return results

    def _echo_batch(self, batch: Sequence[_Request]) -> list[tuple[list[TokenLogprob], Generation]]:
        import torch

        # One left-padded forward for the batch, as _score_batch: scoring clients send many prompts at once.
        width = max(len(r.prompt_ids) for r in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor(
            [[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=self.device
        )
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        with torch.inference_mode(), self._adapter_context(batch[0].adapter):
            logits = self.model(input_ids=input_ids, attention_mask=mask.to(self.device)).logits
        results = []
        for row, request in enumerate(batch):
            top, ids = int(request.options[0]), request.prompt_ids
            logprobs = torch.log_softmax(logits[row, width - len(ids) :].float(), dim=-1)
            following = [*ids[1:], int(logprobs[-1].argmax())]  # each place's token; the last, the greedy next
            chosen = logprobs.gather(-1, torch.tensor(following, device=self.device)[:, None])[:, 0].tolist()
            best = logprobs.topk(top) if top else None
            tokens = [TokenLogprob(self.token_text(ids[0]), None)]
            for i, token in enumerate(following):
                alternatives: tuple[tuple[str, float], ...] = ()
                if best is not None:
                    pairs = zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)
                    alternatives = tuple((self.token_text(t), lp) for t, lp in pairs)
                tokens.append(TokenLogprob(self.token_text(token), chosen[i], alternatives))
            next_token = following[-1]
            text = str(self.tokenizer.decode([next_token], skip_special_tokens=True))
            finish = "stop" if next_token in self._eos_ids else "length"
            results.append((tokens[:-1], Generation(text, Usage(len(ids), 1), finish, (tokens[-1],))))
        return results

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def cache_identity(self, adapter: str | None) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": str(self.path),
            "dtype": self.dtype,
            "adapter": self.adapter_sha256.get(adapter) if adapter else None,  # its content, not its folder
        }

    def clear_prefix_cache(self) -> None:
        """Forget cached prefixes, so that a benchmark pass starts as cold as the one before it."""
        for batch in self._batches.values():
            if batch.prefixes is not None:
                batch.prefixes.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_id": self.model_id,
            "path": str(self.path),
            "device": self.device,
            "dtype": self.dtype,
            "adapters": dict(self.adapters),
            "adapter_sha256": dict(self.adapter_sha256),
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait_s * 1000,
            "prefix_cache_tokens": self.prefix_cache_tokens,
            "chunk_tokens": self.chunk_tokens,
        }


def _eos_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids

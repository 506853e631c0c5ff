"""Grammar-constrained decoding for the local backend, by llguidance (the library behind vLLM's and SGLang's
structured outputs): a JSON schema becomes a grammar, and at every step the tokens that would leave it are masked.

A tokenizer's llguidance view costs about a second to build, so one is kept per tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from runtime.errors import ConfigError

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object: any object at all


class JsonGrammar:
    """A compiled JSON-schema grammar over one tokenizer; ``start`` gives each reply its own matcher."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any], eos_ids: Iterable[int]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = _tokenizer_view(tokenizer, sorted(eos_ids))
        # Flexible whitespace off: a small model given room for whitespace can loop on newlines until max_tokens.
        self._grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self._grammar, self._llg)
        if is_error:
            raise ConfigError(f"the JSON schema cannot be enforced: {messages[0]}")

    def start(self) -> GrammarConstraint:
        import llguidance

        return GrammarConstraint(llguidance.LLMatcher(self._llg, self._grammar, log_level=0), self._llg.vocab_size)


class GrammarConstraint:
    """One reply's place in its grammar (``continuous.TokenConstraint``)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        allowed = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)[: self.vocab_size] > 0
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[: len(allowed)] = torch.from_numpy(allowed.copy()).to(logits.device)
        logits.masked_fill_(~keep, float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


_VIEWS: dict[int, Any] = {}


def _tokenizer_view(tokenizer: Any, eos_ids: list[int]) -> Any:
    import llguidance.hf

    key = id(tokenizer)
    if key not in _VIEWS:
        try:
            _VIEWS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos_ids)
        except ValueError as error:  # a slow (Python) tokenizer
            raise ConfigError(f"constrained decoding needs a fast tokenizer: {error}") from error
    return _VIEWS[key]

"""The instructor (LLMs-as-Instructors): analyses a student's errors and writes new training samples.

Three ways to ask, as in the paper's Appendix C: ``le`` (one wrong case), ``lec`` (the wrong case with its nearest
correct cases of the same source, for contrast) and ``augment`` (AugGPT: a random case, no error shown). The prompts
are the appendix's, as package data; unlike the appendix they also show the gold answer, since an instructor that
analyses an error needs to know what the right answer was (the paper's GPT-4-class instructor can work it out, a
small local instructor cannot).

Replies are parsed strictly into ``Sample`` rows; every rejected block is counted with its reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import ascii_uppercase
from typing import Literal

from agents.feedback import group_claim, sentences
from agents.prompts import load_prompt
from runtime.data.kinds import AnswerKind, Sample, kind_named, kind_of
from runtime.data.tasks import Example
from runtime.models.backend import Message

Strategy = Literal["le", "lec", "augment"]

# One numbered block per sample: "1. Question: ..." up to the next "N. Question:" or the end; markdown bold around
# the label may close before or after its colon ("**Question:**", the 1.5B teacher's habit).
_BLOCK = re.compile(r"(?:^|\n)\s*(?:\d+[.)]\s*)?\**Question\**\s*:\**", re.IGNORECASE)
_ANSWER = re.compile(r"\**Answer\**\s*:\**", re.IGNORECASE)


@dataclass
class Parsed:
    samples: list[Sample] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count


def instructor_messages(
    strategy: Strategy,
    case: Example,
    response: str,
    n: int,
    correct: Sequence[Example] = (),
) -> list[Message]:
    """The chat that asks for ``n`` samples about one case (``response``: the student's reply, empty for augment)."""
    kind = kind_of(case)
    system = load_prompt("instructor_augment" if strategy == "augment" else kind.instructor_prompt)
    if strategy != "augment":  # the choice form's fields: as many options as the case has, A.. lettered
        letters = ascii_uppercase[: max(len(case.options), 2)]
        system = system.format(
            n_options=len(letters),
            letters=", ".join(letters[:-1]) + f" and {letters[-1]}",
            option_lines="\n".join(f"{letter}. [option]" for letter in letters),
        )
    values = {
        "question": case.input,
        "gold": case.target,
        "response": _clip(response),
        "n": n,
        "shape": kind.sample_shape,
    }
    if strategy == "lec":
        values["correct"] = "\n\n".join(f"{i}. {c.input}" for i, c in enumerate(correct, 1)) or "(none)"
    user = load_prompt(f"instructor_{strategy}_user").format(**values)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_samples(reply: str, answer_kind: str, n_options: int = 0) -> Parsed:
    """Samples from an instructor reply; blocks without a question, answer or (for choice) options are rejected.

    >>> r = parse_samples("1. Question: Who is older? A. Tom B. Ann C. Unknown Answer: C - nothing says so.", "choice")
    >>> r.samples[0].question
    'Who is older?\\nOptions:\\n(A) Tom\\n(B) Ann\\n(C) Unknown'
    >>> r.samples[0].target, r.samples[0].response
    ('(C)', 'nothing says so. The answer is (C).')
    >>> parse_samples("1. Question: 2+3? Answer: 2+3=5. The answer is 5", "number").samples[0].target
    '5'
    >>> twice = "1. Question: Who? A. Tom B. Ann C. Unknown Options: (A) Tom (B) Ann (C) Unknown Answer: C - not said."
    >>> parse_samples(twice, "choice").samples[0].question
    'Who?\\nOptions:\\n(A) Tom\\n(B) Ann\\n(C) Unknown'
    >>> parse_samples("Here you go!", "number").rejected
    Counter({'no question block': 1})
    """
    parsed, kind = Parsed(), kind_named(answer_kind)
    starts = [m.end() for m in _BLOCK.finditer(reply)]
    if not starts:
        parsed.rejected["no question block"] += 1
        return parsed
    ends = [m.start() for m in _BLOCK.finditer(reply)][1:] + [len(reply)]
    for start, end in zip(starts, ends, strict=True):
        block = reply[start:end].strip()
        sample, reason = _sample(block, kind, n_options)
        if sample is None:
            parsed.rejected[reason] += 1
        else:
            parsed.samples.append(sample)
    return parsed


def _sample(block: str, kind: AnswerKind, n_options: int) -> tuple[Sample | None, str]:
    parts = _ANSWER.split(block, maxsplit=1)
    if len(parts) != 2:
        return None, "no answer"
    question, answer = parts[0].strip(), parts[1].strip()
    if not question or not answer:
        return None, "empty question or answer"
    sample, reason = kind.sample(question, answer, n_options)
    # A sample that teaches "the Jewish man was the scammer" would train the stereotype the student should unlearn.
    if sample is not None and any(group_claim(s) for s in sentences(sample.response)):
        return None, "says something of a social group"
    return sample, reason


def _clip(text: str, limit: int = 1200) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."

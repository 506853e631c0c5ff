"""Prompt templates, shipped as package data files beside this module (agents/prompts/*.txt), and the study
assistant's prompts built from them: one builder per prompt, used by the agents and by the replay that trains them.

The student's prompt is built in ``agents.student``, the corrector's in ``training.lema.corrector``; the list of
retrieved mistakes in ``memory.format_mistakes`` (the memory layer shows it to any AutoGen agent too).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

from runtime.models.backend import Message


@cache
def load_prompt(name: str) -> str:
    """The template ``agents/prompts/<name>.txt``, without its trailing newline."""
    return (files("agents") / "prompts" / f"{name}.txt").read_text(encoding="utf-8").rstrip("\n")


def gathering_messages(
    query: str, response: str, gold: str, earlier: Sequence[str] = (), note: str = ""
) -> list[Message]:
    """The gathering assistant's chat: it sees the gold, the student's answer and the guidelines that did not help;
    ``note`` is what a served client said along with the right answer (``redpen serve``'s feedback).

    >>> chat = gathering_messages("Q?", "The answer is 41", "42", ["Add carefully."])
    >>> chat[1]["content"].endswith("did not help yet:\\n- Add carefully.")
    True
    >>> gathering_messages("Q?", "41", "42", note="carry the one")[1]["content"].endswith("carry the one")
    True
    """
    previous = ""
    if note:
        previous += "\n" + load_prompt("assistant_gather_note").format(note=note)
    if earlier:
        guidelines = "\n".join(f"- {g}" for g in earlier)
        previous += "\n" + load_prompt("assistant_gather_earlier").format(guidelines=guidelines)
    user = load_prompt("assistant_gather_user").format(query=query, response=response, gold=gold, previous=previous)
    return [{"role": "system", "content": load_prompt("assistant_gather")}, {"role": "user", "content": user}]


def examining_messages(mistakes: str, query: str) -> list[Message]:
    """The examining assistant's chat: past mistakes (``memory.format_mistakes``) and the new question, no gold."""
    user = load_prompt("assistant_exam_user").format(mistakes=mistakes, query=query)
    return [{"role": "system", "content": load_prompt("assistant_exam")}, {"role": "user", "content": user}]


def feedback_guidance(reason: str, guideline: str) -> str:
    """How the student sees gathering feedback: why the last answer was wrong (if said), then the guideline.

    >>> feedback_guidance("", "Count the days.")
    'Guideline: Count the days.'
    """
    lines = [load_prompt("guidance_reason").format(reason=reason)] if reason else []
    return "\n".join([*lines, load_prompt("guidance_guideline").format(guideline=guideline)])


def exam_guidance(mistakes: str, guideline: str) -> str:
    """How the student sees examination guidance: the past mistakes, then the assistant's new guideline."""
    return load_prompt("guidance_exam").format(mistakes=mistakes, guideline=guideline)

"""Prompt templates, shipped as package data files beside this module (agents/prompts/*.txt)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def load_prompt(name: str) -> str:
    """The template ``agents/prompts/<name>.txt``, without its trailing newline."""
    return (files("agents") / "prompts" / f"{name}.txt").read_text(encoding="utf-8").rstrip("\n")

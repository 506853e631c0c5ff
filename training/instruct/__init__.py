"""The instructor loop (LLMs-as-Instructors): evaluate, supply data aimed at the errors, fine-tune, repeat.

The loop (torch, transformers) is imported when ``run_instruct`` is first used: the command line reads
``InstructSettings``' fields for its options at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.instruct.settings import BASELINES, STRATEGIES, InstructSettings

if TYPE_CHECKING:
    from training.instruct.run import InstructResult, run_instruct

__all__ = ["BASELINES", "STRATEGIES", "InstructResult", "InstructSettings", "run_instruct"]


def __getattr__(name: str) -> Any:
    if name not in ("InstructResult", "run_instruct"):
        raise AttributeError(f"module 'training.instruct' has no attribute {name!r}")
    from training.instruct import run

    return getattr(run, name)

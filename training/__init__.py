"""Training: reward-filtered replay of gathering turns, and LoRA fine-tuning with TRL.

``export_replay`` turns run directories into SFT (``messages``) and KTO (``label``) datasets; ``train_lora`` fine-tunes
a LoRA adapter on any ``messages`` dataset and saves it whole; ``train_assistant`` does both for the study assistant
and compares it with the general one. Heavy libraries (torch, transformers, trl, autogen) are imported only when a
name that needs them is first used: the command line reads ``LoraSFTConfig``'s fields for its options at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from training.sft_config import LoraSFTConfig

if TYPE_CHECKING:
    from training.assistant import AssistantTraining, train_assistant
    from training.replay import ReplayStats, export_replay, keep_rewarded, kto_row, read_steps, sft_row, steps_of
    from training.sft_trainer import (
        TrainResult,
        build_trainer,
        read_messages,
        to_prompt_completion,
        train_lora,
        trained_before,
    )

# The module each lazily imported name lives in.
_HOMES = {
    "AssistantTraining": "training.assistant",
    "train_assistant": "training.assistant",
    **{
        name: "training.replay"
        for name in ("ReplayStats", "export_replay", "keep_rewarded", "kto_row", "read_steps", "sft_row", "steps_of")
    },
    **{
        name: "training.sft_trainer"
        for name in ("TrainResult", "build_trainer", "read_messages", "to_prompt_completion", "train_lora")
    },
    "trained_before": "training.sft_trainer",
}

__all__ = [
    "AssistantTraining",
    "LoraSFTConfig",
    "ReplayStats",
    "TrainResult",
    "build_trainer",
    "export_replay",
    "keep_rewarded",
    "kto_row",
    "read_messages",
    "read_steps",
    "sft_row",
    "steps_of",
    "to_prompt_completion",
    "train_assistant",
    "train_lora",
    "trained_before",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)

"""Training: reward-filtered replay of gathering turns, and LoRA fine-tuning with TRL.

``export_replay`` turns run directories into SFT (``messages``) and KTO (``label``) datasets; ``train_lora`` fine-tunes
a LoRA adapter on any ``messages`` dataset and saves it whole; ``train_assistant`` does both for the study assistant
and compares it with the general one. Heavy libraries (torch, transformers, trl) are imported
only when a function needs them.
"""

from training.assistant import AssistantTraining, train_assistant
from training.replay import ReplayStats, export_replay, keep_rewarded, kto_row, read_steps, sft_row, steps_of
from training.sft_config import LoraSFTConfig
from training.sft_trainer import (
    TrainResult,
    build_trainer,
    read_messages,
    to_prompt_completion,
    train_lora,
    trained_before,
)

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

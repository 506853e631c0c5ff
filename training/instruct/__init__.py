"""The instructor loop (LLMs-as-Instructors): evaluate, supply data aimed at the errors, fine-tune, repeat."""

from training.instruct.run import InstructResult, run_instruct
from training.instruct.settings import BASELINES, STRATEGIES, InstructSettings

__all__ = ["BASELINES", "STRATEGIES", "InstructResult", "InstructSettings", "run_instruct"]

"""Settings of an instructor loop run (``redpen instruct``): what to target, how to supply data, how hard to train."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from runtime.bounds import check_bounds, within
from runtime.data.kinds import jsonl_kinds
from runtime.defaults import MOST_IN_FLIGHT, MOST_ITEMS, MOST_NEW_TOKENS, MOST_SEED
from runtime.errors import ConfigError
from training.instruct.benchmarks import is_jsonl
from training.sft_config import LoraSFTConfig

STRATEGIES = ("replay", "le", "lec", "memory")
BASELINES = ("plain", "replay", "augment")


@dataclass
class InstructSettings:
    targets: list[str] = field(
        metadata={
            "help": "Target tasks, comma-separated; bbq/Age+SES is a union of categories; a .jsonl file is a "
            "bring-your-own train part (input, target).",
            "flag": "--target",
        }
    )
    strategies: list[str] = field(
        default_factory=lambda: ["replay"],
        metadata={"help": "One per iteration, comma-separated: replay, le, lec, memory.", "flag": "--strategy"},
    )
    baselines: list[str] = field(
        default_factory=list, metadata={"help": "At the same number of rows: plain, replay, augment (comma-separated)."}
    )
    ood: list[str] | None = field(
        default=None,
        metadata={"help": "Out-of-domain benchmarks or .jsonl files [default: the targets' pairs and bbh]."},
    )
    examine_jsonl: list[str] = field(
        default_factory=list,
        metadata={"help": "Each .jsonl target's examine file, comma-separated, in --target order."},
    )
    answer_kind: str = field(
        default="choice", metadata={"help": "For .jsonl targets and --ood files: choice, number or text."}
    )
    # 300 per target: the selection is answered by the current model every iteration (~1 min per 100 BBQ items on
    # 2 cores with the default model); enough wrong cases for a few hundred rows at its ~0.3 accuracy.
    select: int = field(
        default=300, metadata={"help": "Selection size per target per iteration (train part).", **within(1, MOST_ITEMS)}
    )
    # The paper caps a dataset at 3,000 samples per iteration on GPUs; 400 rows train in ~6 min on 2 cores.
    budget: int = field(
        default=400, metadata={"help": "Most training rows per target per iteration.", **within(1, MOST_ITEMS)}
    )
    # 110 items: 10 per BBQ category; a paired CI at n=110 is about +-8 points, so read small gains with care.
    eval_limit: int = field(
        default=110,
        metadata={"help": "Evaluation items per benchmark (spread over sources).", **within(1, MOST_ITEMS)},
    )
    eval_split: str = field(
        default="examine", metadata={"help": "examine (report) or dev (held-out train rows: choose settings here)."}
    )
    # k=3: the paper's ablation (its Figure 6) found 3 nearest correct cases best for LEC. At most 50: each one is
    # a training row (replay) or a worked case in the instructor's prompt (lec), which 50 already overflow.
    k: int = field(
        default=3, metadata={"help": "Nearest correct cases of the same source per wrong case.", **within(1, 50)}
    )
    contrast: bool = field(
        default=True, metadata={"help": "replay: add each wrong case's k nearest correct cases as rows."}
    )
    balance: bool = field(
        default=True, metadata={"help": "replay: match the rows' gold answers to the selection's distribution."}
    )
    name_option: bool = field(
        default=False, metadata={"help": "Multiple-choice rows: the reply names the option's text before its letter."}
    )
    shuffle_options: bool = field(
        default=False, metadata={"help": "Multiple-choice rows: options in a random order, the gold relettered."}
    )
    # 0.10 of each target's train part is never selected nor trained on: the dev split for choosing settings.
    dev_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of each train part held out as dev.", **within(0, 1, open_low=True, open_high=True)},
    )
    # 0.7: a guess; far above the paper's mean max ROUGE-L of 0.30, so only near-copies of evaluation items go.
    contamination: float = field(
        default=0.7, metadata={"help": "Drop samples with ROUGE-L above this.", **within(0, 1)}
    )
    # 0.95 cosine: paraphrases with a word or two changed, not merely questions on the same topic.
    near_duplicate: float = field(
        default=0.95, metadata={"help": "Drop samples this similar to a kept one.", **within(0, 1)}
    )
    # At most 100 passes: over a few hundred rows already far past learning them by heart.
    epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over each iteration's rows (sets max_steps).", **within(0, 100, open_low=True)},
    )
    learning_rate: float = field(
        default=LoraSFTConfig.learning_rate,
        metadata={"help": "Iteration 1's learning rate.", **within(0, 1, open_low=True)},
    )
    # 0.5: the paper found a falling rate across iterations better; halving is a guess at how fast.
    lr_decay: float = field(
        default=0.5,
        metadata={"help": "Each iteration's rate is the previous one's times this.", **within(0, 1, open_low=True)},
    )
    max_cases: int = field(
        default=64,
        metadata={"help": "le/lec/augment: most wrong cases sent to the instructor.", **within(1, MOST_ITEMS)},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the selections and the random baseline rows.", **within(0, MOST_SEED)}
    )
    concurrency: int = field(default=32, metadata={"help": "Items in flight at once.", **within(1, MOST_IN_FLIGHT)})
    max_new_tokens: int = field(
        default=128, metadata={"help": "Student reply length at evaluation.", **within(1, MOST_NEW_TOKENS)}
    )
    instructor_tokens: int = field(
        default=512, metadata={"help": "Instructor reply length.", **within(1, MOST_NEW_TOKENS)}
    )
    check_answers: bool = field(
        default=True,
        metadata={
            "help": "Keep a written sample only if the instructor, asked it cold in a fresh call, gives its stated "
            "answer (a sample whose answer nothing in it determines rarely survives)."
        },
    )
    memory: str | None = field(
        default=None,
        metadata={"help": "Strategy memory: a mistake memory folder (from `redpen gather` / `run`)."},
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("--target is empty: name at least one task, e.g. --target bbq")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"unknown --strategy {s!r}: choose from {', '.join(STRATEGIES)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"unknown --baselines {b!r}: choose from {', '.join(BASELINES)}")
        jsonl_targets = [t for t in self.targets if is_jsonl(t)]
        if self.eval_split == "examine" and len(self.examine_jsonl) != len(jsonl_targets):
            raise ConfigError(
                f"--examine-jsonl: a bring-your-own target is its train part and needs its own examine file; "
                f"{len(jsonl_targets)} JSONL target(s), {len(self.examine_jsonl)} examine file(s)"
            )
        if self.answer_kind not in jsonl_kinds():
            raise ConfigError(f"unknown --answer-kind {self.answer_kind!r}: choose one of {', '.join(jsonl_kinds())}")
        if "memory" in self.strategies and self.memory is None:
            raise ConfigError("--strategy memory needs --memory PATH (a mistake memory from `redpen gather/run`)")
        if self.eval_split not in ("examine", "dev"):
            raise ConfigError(f"unknown --eval-split {self.eval_split!r}: choose examine or dev")
        check_bounds(self, options=True)

    def lr(self, iteration: int) -> float:
        """The learning rate of iteration ``iteration`` (1-based)."""
        return self.learning_rate * self.lr_decay ** (iteration - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

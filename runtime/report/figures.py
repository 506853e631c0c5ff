"""The figures reports are drawn from and the terminal prints: typed, each with ``to_dict`` for its JSON file and
``--json``.

``agents`` and ``training`` compute them from their records; ``runtime.report`` renders them. The JSON keeps the
keys earlier versions wrote: a field listed in a class's ``_OMITTED_IF_NONE`` is left out when it does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Figures:
    """Figures as a dataclass; ``to_dict`` is their JSON, nested figures included."""

    _OMITTED_IF_NONE: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self._OMITTED_IF_NONE:
                continue
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Figures):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---- accuracy of a set of items --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Accuracy(Figures):
    """Accuracy of a set of graded items, with its controls.

    >>> a = Accuracy(n=2, correct=1, wrong=1, no_answer=0, accuracy=0.5, accuracy_answered=0.5, majority_gold=None,
    ...              chance=0.5, completion_tokens=4, prompt_tokens=9)
    >>> list(a.to_dict())[-3:]
    ['chance', 'completion_tokens', 'prompt_tokens']
    """

    _OMITTED_IF_NONE: ClassVar[tuple[str, ...]] = ("samples", "pass_at")

    n: int
    correct: int
    wrong: int
    no_answer: int
    accuracy: float
    accuracy_answered: float
    majority_gold: float | None  # always the commonest gold: a control only where golds repeat
    chance: float | None  # uniform over the options: multiple-choice items only
    completion_tokens: int
    prompt_tokens: int
    samples: int | None = None  # replies sampled per item, when every item has that many
    pass_at: dict[str, float] | None = None  # k -> pass@k, with ``samples``


@dataclass(frozen=True)
class Answers(Figures):
    """How often each answer was given and each gold was, over the multiple-choice items."""

    predicted: dict[str, int]
    gold: dict[str, int]


@dataclass(frozen=True, kw_only=True)
class Summary(Figures):
    """A results file's figures (``metrics.json``): overall, per source, the modes and the answer distributions."""

    _OMITTED_IF_NONE: ClassVar[tuple[str, ...]] = ("elapsed_s", "run_dir")

    overall: Accuracy
    by_source: dict[str, Accuracy]
    modes: dict[str, int]
    answers: Answers
    elapsed_s: float | None = None  # a command's metrics add its time
    run_dir: str | None = None  # and ``redpen eval``'s its folder


@dataclass(frozen=True, kw_only=True)
class Condition(Summary):
    """A :class:`Summary` with its per-item verdicts (item id -> right), to pair with another condition's."""

    verdicts: dict[str, bool]


# ---- redpen run: the SALAM experiment, and train-assistant's comparison ---------------------------------------


@dataclass(frozen=True)
class GatherFigures(Figures):
    """``redpen gather``'s: its episodes, and how many of this student's mistakes the memory now holds."""

    episodes: int
    first_answer_wrong: int
    corrected: int
    mistakes_stored: int


@dataclass(frozen=True)
class Gathering(Figures):
    """Gathering within ``redpen run``: episodes, corrections, feedback turns and what the filters removed."""

    episodes: int
    first_answer_wrong: int
    corrected: int  # of the wrong ones, right within the round limit
    feedback_turns: int
    rewarded_turns: int
    leaks_removed: int
    group_claims_removed: int
    generic_guidelines: int
    instruction_echoes_removed: int
    unparsed_feedback: int
    stored_guidelines: list[str]  # the first wrong episodes' last guideline, as the memory holds it


@dataclass(frozen=True)
class GuidanceExample(Figures):
    id: str
    question: str
    guidance: str
    reply: str
    verdict: str
    target: str


@dataclass(frozen=True)
class ExperimentFigures(Figures):
    """``redpen run``'s figures (``figures.json``): every condition on the same examine items, and its controls."""

    task: str
    student: str
    assistant: str
    n_gather: int
    n_examine: int
    conditions: dict[str, Condition]  # baseline, assisted, retrieval_only
    without_near_duplicates: dict[str, Condition]
    near_duplicates: int
    near_duplicate_threshold: float
    gathering: Gathering
    mistakes_stored: int
    retrieved_per_item: float
    examples: list[GuidanceExample]
    time_s: dict[str, float]  # per phase
    tokens: dict[str, int]  # per phase


@dataclass(frozen=True)
class ComparisonFigures(Figures):
    """The general against the trained study assistant, on the same examine items, memory and student."""

    _OMITTED_IF_NONE = ("run_assistant",)
    task: str
    student: str
    general_assistant: str
    trained_assistant: str
    n_examine: int
    conditions: dict[str, Condition]  # general, trained, retrieval_only, and run_assistant when run_assistant is set
    changed_answers: int
    run_assistant: str | None = None  # the gathering run's assistant, when another model than the general one


# ---- redpen instruct ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change(Figures):
    """Learned and forgotten items between a model and the one it was trained from, over the same ``n`` items."""

    n: int
    learned: int
    forgotten: int

    @property
    def learned_rate(self) -> float:
        """Learned over ``n``, to 4 decimals (as reported)."""
        return round(self.learned / self.n, 4) if self.n else 0.0

    @property
    def forgotten_rate(self) -> float:
        return round(self.forgotten / self.n, 4) if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "learned_rate": self.learned_rate, "forgotten_rate": self.forgotten_rate}


@dataclass(frozen=True, kw_only=True)
class InstructCondition(Accuracy):
    """One condition on one benchmark: accuracy, the answers given, and the change from its predecessor."""

    _OMITTED_IF_NONE: ClassVar[tuple[str, ...]] = ("samples", "pass_at", "vs_previous")

    predicted: dict[str, int]  # answer -> count; empty for a benchmark that is not multiple choice
    prior_shift: float  # total variation distance from the gold answers
    prior_shift_flag: bool
    vs_previous: Change | None = None  # none for the base


@dataclass(frozen=True)
class Benchmark(Figures):
    gold: dict[str, int]  # the gold answers' distribution; empty when not multiple choice
    conditions: dict[str, InstructCondition]


@dataclass(frozen=True)
class Story(Figures):
    """The last iteration against the base on one benchmark, and what that shows."""

    benchmark: str
    condition: str
    n: int
    before: float
    after: float
    change: float
    ci: list[float]  # paired bootstrap 95% interval of ``change``
    p_mcnemar: float
    majority_gold: float | None
    prior_shift_flag: bool
    verdict: str


@dataclass(frozen=True)
class Stages(Figures):
    seconds: dict[str, float]
    tokens: dict[str, int]


@dataclass(frozen=True)
class InstructFigures(Figures):
    """``redpen instruct``'s figures (``figures.json``)."""

    conditions: list[str]  # base, iter1, its baselines, iter2, ...
    benchmarks: list[str]
    in_domain: list[str]
    by_benchmark: dict[str, Benchmark]
    story: list[Story]
    supplies: dict[str, dict[str, Any]]  # condition -> its supply.json, as the strategy that made the rows counts them
    stages: Stages

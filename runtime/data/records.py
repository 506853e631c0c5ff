"""The typed records redpen writes: a run directory's config, one answered item, one gathering episode.

Results files keep the JSON keys earlier versions wrote, so a run resumes across versions. ``config.json`` carries
a version: a run directory from an older redpen gets an error that says so, never a ``KeyError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.data.graders import Verdict
from runtime.errors import ConfigError, DataError

CONFIG = "config.json"
# 2: the first versioned config (typed identities, every SALAM command records its backends). 1: none recorded.
RUN_CONFIG_VERSION = 2

_FROZEN = ConfigDict(extra="forbid", frozen=True)


# ---- a line of a results file --------------------------------------------------------------------------------------


class Record(BaseModel):
    """One line of a results file, read back as the type it was written as; ``id`` is what a re-run resumes by."""

    model_config = _FROZEN

    id: str

    def to_json(self) -> dict[str, Any]:
        """The record as written to its results file."""
        return self.model_dump(mode="json")


# ---- one answered item ------------------------------------------------------------------------------------------


class Retrieved(BaseModel):
    """A past mistake an examined item's assistant was shown."""

    model_config = _FROZEN

    id: str
    score: float
    source: str


class SampleResult(BaseModel):
    """One of an item's sampled replies (``redpen eval --samples N``), for pass@k."""

    model_config = _FROZEN

    reply: str
    verdict: Verdict
    error: str | None = None


class ItemResult(Record):
    """One graded answer, as ``eval`` and the examinations append it to their results file."""

    source: str
    mode: Literal["generate", "loglik", "baseline", "assisted", "retrieval_only"]
    verdict: Verdict
    predicted: str | None = Field(description="the answer the grader extracted; None when there was none")
    target: str
    n_options: int = Field(description="0 for an item that is not multiple choice")
    reply: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The fields below belong to some modes only, and are left out of the record where they do not apply.
    latency_s: float | None = Field(None, description="seconds the item took; none for the retrieval-only control")
    finish_reason: str | None = Field(None, description="eval (generate mode) and examination: stop or length")
    scores: list[float] | None = Field(None, description="eval, loglik mode: each option's log-likelihood")
    guidance: str | None = Field(None, description="examination: what the student was shown before the question")
    retrieved: list[Retrieved] | None = Field(None, description="examination: the past mistakes retrieved")
    error: str | None = Field(None, description="code items that failed: why, then the program's stderr tail")
    samples: list[SampleResult] | None = Field(
        None, description="eval --samples N: all N sampled replies (the first is the item's reply), for pass@k"
    )

    def to_json(self) -> dict[str, Any]:
        """The record as written to the results file.

        >>> ItemResult(id="q/1", source="q", mode="generate", verdict="no_answer", predicted=None, target="(A)",
        ...            n_options=2, reply="", finish_reason="length").to_json()["predicted"] is None
        True
        """
        return self.model_dump(mode="json", exclude={name for name in _BY_MODE if getattr(self, name) is None})


_BY_MODE = ("latency_s", "finish_reason", "scores", "guidance", "retrieved", "error", "samples")


# ---- one gathering episode: turns of (state, action, reward) -------------------------------------------------------


class State(BaseModel):
    """What the assistant saw: the question, the student's wrong answer, and the guidelines given before it."""

    model_config = _FROZEN

    query: str
    response: str
    context: list[str]


class Action(BaseModel):
    """The assistant's feedback, after the leak filter."""

    model_config = _FROZEN

    reason: str
    guideline: str
    text: str = Field(description="the feedback as the student was shown it")
    leaked: bool = Field(description="a sentence named the gold answer and was removed")
    parsed: bool = Field(description="the reply was the JSON (or labelled lines) asked for")
    stereotyped: bool = Field(False, description="a sentence said something of a social group and was removed")
    generic: bool = Field(False, description="nothing usable was left: the guideline is the neutral fallback")
    # Written only when true: episodes from before the field existed read back and are written again unchanged.
    echoed: bool = Field(
        False,
        description="a sentence restated the assistant's instructions and was removed",
        exclude_if=lambda echoed: not echoed,
    )


class Turn(BaseModel):
    """One MDP step: reward 1 when the student's next answer was right."""

    model_config = _FROZEN

    round: int = Field(ge=1)
    state: State
    action: Action
    reward: Literal[0, 1]
    next_response: str


class Episode(Record):
    """One gathering conversation, as appended to ``episodes.jsonl``."""

    source: str
    task: str
    model_id: str = Field(description="the student")
    assistant_id: str
    query: str
    gold: str
    first_answer: str
    first_verdict: Verdict
    turns: list[Turn]
    verdict: Verdict = Field(description="the last answer's")
    predicted: str | None
    rounds: int
    corrected: bool = Field(description="wrong at first, right by the end")
    leaks: int
    prompt_tokens: int
    completion_tokens: int
    time_s: float


# ---- a run directory's config.json -----------------------------------------------------------------------------


class _Identity(BaseModel):
    model_config = _FROZEN


class EvalIdentity(_Identity):
    command: Literal["eval"] = "eval"
    task: str
    split: str
    limit: int | None
    mc_mode: str
    model_id: str
    adapter: str | None
    max_new_tokens: int
    samples: int = 1  # replies sampled per item (pass@k); 1: one reply, greedy unless a temperature is given
    temperature: float = 0.0


class GatherIdentity(_Identity):
    command: Literal["gather"] = "gather"
    task: str
    limit: int | None
    rounds: int
    student: str
    assistant: str
    student_settings: dict[str, Any]


class ExamIdentity(_Identity):
    command: Literal["exam"] = "exam"
    mode: str
    task: str
    limit: int | None
    student: str
    assistant: str
    k: int
    threshold: float
    assistant_adapter: str | None
    student_settings: dict[str, Any]
    skip_absorbed: bool = False  # retrieval leaves out mistakes a fine-tuned student has absorbed


class RunIdentity(_Identity):
    command: Literal["run"] = "run"
    task: str
    limit: int | None
    gather_limit: int | None
    rounds: int
    k: int
    threshold: float
    student: str
    assistant: str
    student_settings: dict[str, Any]


class CorrectIdentity(_Identity):
    command: Literal["correct"] = "correct"
    task: str
    limit: int | None
    samples: int
    student: str
    corrector: str


class AblateIdentity(_Identity):
    command: Literal["ablate-corrections"] = "ablate-corrections"
    data: str
    rows: int | None
    limit: int | None
    hashes: dict[str, str]


class CompareIdentity(_Identity):
    command: Literal["compare-assistants"] = "compare-assistants"
    run: str
    adapter: str
    dataset_hash: str
    limit: int | None


Identity = Annotated[
    EvalIdentity | GatherIdentity | ExamIdentity | RunIdentity | CorrectIdentity | AblateIdentity | CompareIdentity,
    Field(discriminator="command"),
]


class BackendInfo(BaseModel):
    """A backend as ``Backend.describe()`` recorded it: kind and model, and what the kind adds (path, base_url)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    model_id: str
    path: str | None = Field(None, description="local: the model folder")
    base_url: str | None = Field(None, description="openai: the server")


class RunConfig(BaseModel):
    """A run directory's ``config.json``: the identity a re-run must match to resume, and what later commands read."""

    model_config = _FROZEN

    version: int = RUN_CONFIG_VERSION
    identity: Identity
    student_backend: BackendInfo | None = None
    assistant_backend: BackendInfo | None = None
    corrector_backend: BackendInfo | None = None
    memory: dict[str, str] | None = Field(None, description='where the mistakes went: {"path": ...} or {"url": ...}')
    settings: dict[str, Any] | None = Field(None, description="eval: the generation settings")
    n_examples: int | None = None

    def info(self) -> dict[str, Any]:
        """Everything but the version and the identity, as ``RunDir`` takes it."""
        return self.model_dump(mode="json", exclude={"version", "identity"}, exclude_none=True)

    @classmethod
    def read(cls, run_dir: Path) -> RunConfig:
        """The config of ``run_dir``; a missing, old or foreign one is an error that names the file."""
        raw = read_config(run_dir / CONFIG)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DataError(
                f"{run_dir / CONFIG} is not a config redpen writes ({where}: {first['msg']}); "
                "give the --out folder of a redpen command"
            ) from None


def read_config(path: Path) -> dict[str, Any]:
    """The JSON of a run's ``config.json``, checked to be one this redpen wrote (its version, its identity)."""
    if not path.is_file():
        raise DataError(
            f"{path.parent} is not a redpen run directory (no {CONFIG}); give the --out of a redpen command"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{path}: not valid JSON; delete the folder to start over") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("identity"), dict):
        raise ConfigError(
            f"{path}: not a redpen run config (no identity recorded); use another --out, or delete the folder"
        )
    version = raw.get("version", 1)
    if version != RUN_CONFIG_VERSION:
        age = "an older" if isinstance(version, int) and version < RUN_CONFIG_VERSION else "another"
        raise ConfigError(
            f"{path} was written by {age} redpen (version {version}; this one reads {RUN_CONFIG_VERSION}); "
            "re-run the command into a new --out, or delete the folder to start over"
        )
    return raw

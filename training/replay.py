"""Filtered offline replay: the gathering turns that helped become the study assistant's training data.

Each gathering turn is one MDP step (SALAM, part 2): state = (query, the student's wrong response, the guidelines
already given), action = the assistant's feedback, reward = 1 if the student's next answer was right. The steps
that earned a reward are kept, with the feedback as the student saw it (after the leak filter, so it never names the
gold), and exported as chat ``messages`` for TRL's ``SFTTrainer``; every step is also exported with a true/false
``label`` in TRL's KTO format. The prompt of each row is built by the gathering assistant's own builder
(``agents.prompts.gathering_messages``), so the fine-tuned assistant is trained on what it will see.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agents.gathering import EPISODES
from agents.prompts import gathering_messages
from runtime.data.records import Episode, GatherIdentity, RunConfig, RunIdentity
from runtime.data.rundir import read_records, write_atomic
from runtime.errors import ConfigError, DataError
from runtime.models.backend import Message

log = logging.getLogger(__name__)

SFT_JSONL, SFT_PARQUET = "sft.jsonl", "sft.parquet"
KTO_JSONL, KTO_PARQUET = "kto.jsonl", "kto.parquet"
MANIFEST = "replay.json"


@dataclass(frozen=True)
class Step:
    """One turn of an episode, flattened with the facts of its episode (see ``steps_of``)."""

    id: str  # the episode's id, "#", the round
    task: str
    source: str
    gold: str
    query: str
    response: str  # the student's answer the feedback was about
    context: list[str]  # the guidelines given before it
    reason: str
    guideline: str
    leaked: bool
    reward: int


def keep_rewarded(step: Step) -> bool:
    """Filtered replay: keep a step whose feedback, as the student saw it, got the student right.

    The student saw the feedback after the leak filter: a sentence that named the gold was removed before it was
    shown (``leaked`` says one was), so what is kept, and trained on, never names the answer; the reward was earned
    by the rest. A step whose feedback was all removed is not kept: nothing of it reached the student.

    >>> from dataclasses import replace
    >>> step = Step("e#1", "bbq", "bbq/Age", "(A)", "Who?", "(B)", [], "You guessed.", "Quote it.", False, 1)
    >>> keep_rewarded(step), keep_rewarded(replace(step, leaked=True)), keep_rewarded(replace(step, reward=0))
    (True, True, False)
    >>> keep_rewarded(replace(step, reason="", guideline=" "))
    False
    """
    return step.reward == 1 and bool(step.reason.strip() or step.guideline.strip())


def steps_of(episode: Episode) -> list[Step]:
    """The turns of one episode as steps, each carrying what its prompt and its statistics need."""
    return [
        Step(
            id=f"{episode.id}#{turn.round}",
            task=episode.task,
            source=episode.source,
            gold=episode.gold,
            query=turn.state.query,
            response=turn.state.response,
            context=list(turn.state.context),
            reason=turn.action.reason,
            guideline=turn.action.guideline,
            leaked=turn.action.leaked,
            reward=turn.reward,
        )
        for turn in episode.turns
    ]


def assistant_prompt(step: Step) -> list[Message]:
    """The system and user messages the gathering assistant got in this state: the agents' own builder."""
    return gathering_messages(step.query, step.response, step.gold, step.context)


def feedback_reply(step: Step) -> Message:
    """The action as the assistant should have written it: the JSON its system prompt asks for.

    >>> step = Step("e#1", "bbq", "bbq/Age", "(A)", "Who?", "(B)", [], "You guessed.", "Quote the context.", False, 1)
    >>> feedback_reply(step)["content"]
    '{"reason": "You guessed.", "guideline": "Quote the context."}'
    """
    reply = json.dumps({"reason": step.reason, "guideline": step.guideline}, ensure_ascii=False)
    return {"role": "assistant", "content": reply}


def sft_row(step: Step) -> dict[str, list[Message]]:
    """A conversational row for TRL's ``SFTTrainer``: system, user, and the assistant's JSON reply."""
    return {"messages": [*assistant_prompt(step), feedback_reply(step)]}


def kto_row(step: Step) -> dict[str, Any]:
    """An unpaired-preference row for TRL's ``KTOTrainer``: desirable iff the step would be kept."""
    return {"prompt": assistant_prompt(step), "completion": [feedback_reply(step)], "label": keep_rewarded(step)}


# ---- reading run directories ---------------------------------------------------------------------------------


def student_of(run_dir: Path) -> str:
    """The student model a run directory was gathered with, from its ``config.json`` identity."""
    identity = RunConfig.read(run_dir).identity
    if not isinstance(identity, GatherIdentity | RunIdentity):
        raise DataError(f"{run_dir} holds a `redpen {identity.command}` run: give the --out of `redpen gather/run`")
    return identity.student


def read_steps(run_dirs: Sequence[Path], model_id: str | None = None) -> Iterator[Step]:
    """Every step of the episodes in ``run_dirs``, all gathered with the student ``model_id``.

    ``model_id=None`` takes the first directory's student, so that directories of different students are never
    mixed: an assistant trained on one student's mistakes is specific to that student.
    """
    if not run_dirs:
        raise ConfigError("no run directories given: pass the --out folder of `redpen gather` or `redpen run`")
    for run_dir in dict.fromkeys(Path(d).resolve() for d in run_dirs):  # a folder given twice is read once
        if not run_dir.is_dir():
            raise DataError(f"run directory {run_dir} does not exist (or is not a folder)")
        student = student_of(run_dir)
        model_id = student if model_id is None else model_id
        if student != model_id:
            raise ConfigError(
                f"run dir {run_dir} was gathered with model {student}, not {model_id}; "
                "replay only run dirs of the student this assistant is for"
            )
        path = run_dir / EPISODES
        if not path.is_file():
            raise DataError(f"{path} does not exist: run `redpen gather` (or `redpen run`) into {run_dir} first")
        for episode in read_records(path, Episode):
            yield from steps_of(episode)


# ---- export ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayStats:
    """How many steps the replay saw and kept, in total and per task and per source dataset."""

    steps: int
    kept: int
    scrubbed: int = 0  # kept steps whose feedback had a sentence naming the gold removed before the student saw it
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {"steps": n, "kept": k}
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, steps: Sequence[Step]) -> ReplayStats:
        def counts(key: Callable[[Step], str]) -> dict[str, dict[str, int]]:
            seen = Counter(key(s) for s in steps)
            kept = Counter(key(s) for s in steps if keep_rewarded(s))
            return {name: {"steps": seen[name], "kept": kept[name]} for name in sorted(seen)}

        by_task, by_source = counts(lambda s: s.task), counts(lambda s: s.source)
        kept = [s for s in steps if keep_rewarded(s)]
        return cls(len(steps), len(kept), sum(s.leaked for s in kept), by_task, by_source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_replay(run_dirs: Sequence[Path], out_dir: Path, model_id: str | None = None) -> ReplayStats:
    """Write the kept steps as SFT ``messages`` and every step as KTO rows into ``out_dir`` (JSONL and parquet).

    Files: ``sft.jsonl``/``sft.parquet`` ({"messages"}), ``kto.jsonl``/``kto.parquet`` ({"prompt", "completion",
    "label"}) and ``replay.json`` (the counts and where they came from). Each is written whole, then renamed.
    """
    steps = list(read_steps(run_dirs, model_id))
    model_id = model_id if model_id is not None else student_of(Path(run_dirs[0]))
    stats = ReplayStats.of(steps)
    names = " ".join(str(d) for d in run_dirs)
    if stats.kept == 0:
        raise DataError(
            f"no rewarded steps in {names}: nothing to train on ({stats.steps} steps, none rewarded); "
            "gather more examples or more --rounds, or use a stronger assistant model"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_rows(out_dir, SFT_JSONL, SFT_PARQUET, [sft_row(s) for s in steps if keep_rewarded(s)])
    _write_rows(out_dir, KTO_JSONL, KTO_PARQUET, [kto_row(s) for s in steps])
    manifest = {"run_dirs": [str(d) for d in run_dirs], "model_id": model_id, **stats.to_dict()}
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "replay  %d steps  %d kept (%d with a gold sentence removed)  -> %s",
        stats.steps,
        stats.kept,
        stats.scrubbed,
        out_dir,
    )
    return stats


def _write_rows(out_dir: Path, jsonl: str, parquet: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_atomic(out_dir / jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp = out_dir / f".{parquet}.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out_dir / parquet)

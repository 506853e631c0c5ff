"""The student's side of LEMA as library calls: gather correction data, fine-tune the student, run the ablation.

``correct`` writes a run directory of CoT and correction datasets (``training.lema.data``); ``train_student`` fine-tunes
a LoRA adapter on one of them; ``ablate_corrections`` trains on CoT only and on CoT + corrections at equal size and
evaluates both and the base model on the same examine items (``training.lema.ablation``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agents.team import Roles
from runtime.data.paths import resolve_data_dir
from runtime.data.records import AblateIdentity, BackendInfo, CorrectIdentity, Record, RunConfig
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example, load_task
from runtime.defaults import CONCURRENCY, REASONING_MAX_NEW_TOKENS, SAMPLES
from runtime.errors import ConfigError, DataError
from runtime.models.backend import GenerationSettings
from runtime.report import Condition
from runtime.workflows.experiment import Progress, counter
from training.lema.ablation import (
    SETS,
    evaluate_adapters,
    read_rows,
    render_ablation,
    train_sets,
    training_set_texts,
    training_sets,
    write_training_sets,
)
from training.lema.data import CORRECTIONS, COT, Problem, equal_size, run_correction
from training.sft_config import LoraSFTConfig
from training.sft_trainer import TrainResult, claim_folder, scratch_folder, train_lora

OnLog = Callable[[dict[str, Any]], None]
FIGURES = "figures.json"


@dataclass(frozen=True)
class Corrected:
    run_dir: Path
    counts: dict[str, Any]  # training.lema.data.count's figures


@dataclass(frozen=True)
class Ablation:
    run_dir: Path
    figures: dict[str, Condition]  # condition (base and each training set) -> its summary
    trained: dict[str, TrainResult]


async def correct(
    examples: Sequence[Example],
    roles: Roles,
    out: Path,
    *,
    task: str,
    limit: int | None,
    samples: int = SAMPLES,
    concurrency: int = CONCURRENCY,
    on_progress: Callable[[Problem], None] | None = None,
) -> Corrected:
    """``redpen correct``: the student samples reasoning paths, the assistant role corrects the wrong ones."""
    identity = CorrectIdentity(
        task=task, limit=limit, samples=samples, student=roles.student_id, corrector=roles.assistant_id
    )
    config = RunConfig(
        identity=identity,
        student_backend=BackendInfo(**roles.student.describe()),
        corrector_backend=BackendInfo(**roles.assistant.describe()),
    )
    run = RunDir.create(out, config)
    with run.removed_on_failure():
        counts = await run_correction(
            examples,
            roles.student,
            roles.assistant,
            run,
            samples=samples,
            concurrency=concurrency,
            on_progress=on_progress,
        )
    return Corrected(run.path, counts)


def train_student(
    data: Path,
    out: Path,
    *,
    mode: Literal["cot", "cot+corrections"] = "cot+corrections",
    rows: int | None = None,
    max_steps: int | None = None,
    base_model: str | None = None,
    on_log: OnLog | None = None,
    accelerate_config: Path | None = None,
) -> TrainResult:
    """A LoRA student in ``out/adapter`` on a ``correct`` run's CoT rows, or on CoT + corrections, ``rows`` of them.

    With ``rows``, either set is the ablation's set of that name (``training.lema.ablation``, the same seeded draw), so
    the two modes train on the same number of rows; it is written to ``out/data``. Without, CoT is every CoT row
    and CoT + corrections is cut to that size.
    """
    if mode not in ("cot", "cot+corrections"):
        raise ConfigError(f"unknown --mode {mode!r}: choose cot or cot+corrections")
    adapter = out / "adapter"
    existed = claim_folder(out, {"data", adapter.name, scratch_folder(adapter).name})
    try:
        if mode == "cot+corrections":
            dataset = training_sets(data, out / "data", rows)[SETS[1]]
        elif rows is None:
            dataset = data / COT  # every CoT row, read in place
        else:  # corrections may be none: CoT only needs the draw, which is the same whatever their number
            cot_only, _ = equal_size(read_rows(data / COT), read_rows(data / CORRECTIONS), rows, seed=0)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cot_only)
            dataset = write_training_sets({SETS[0]: text}, out / "data")[SETS[0]]
        config = LoraSFTConfig(output_dir=str(adapter), base_model=base_model).with_steps(max_steps)
        return train_lora(dataset, config, on_log=on_log, accelerate_config=accelerate_config)
    except Exception:  # nothing half-made is left (a kill or Ctrl-C keeps the checkpoints, to resume from)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


async def ablate_corrections(
    data: Path,
    out: Path | None = None,
    *,
    rows: int | None = None,
    limit: int | None = None,
    max_steps: int | None = None,
    max_new_tokens: int = REASONING_MAX_NEW_TOKENS,
    base_model: str | None = None,
    concurrency: int = CONCURRENCY,
    data_dir: Path | None = None,
    on_train_log: Callable[[str], OnLog] | None = None,
    progress: Progress | None = None,
) -> Ablation:
    """``redpen ablate-corrections``: both training sets, their adapters, and the three conditions evaluated.

    The examine items are the ``correct`` run's task's examine split; the folder defaults to ``<data>-ablation``.
    """
    identity = RunConfig.read(data).identity
    if not isinstance(identity, CorrectIdentity):
        raise DataError(f"{data} holds a `redpen {identity.command}` run: give the --out of `redpen correct`")
    folder = out or data.with_name(data.name + "-ablation")
    texts = training_set_texts(data, rows)
    # What can be refused is refused before the folder is made: the base model, and the examine items (needed only
    # after both trainings, but a missing data folder then would waste them).
    LoraSFTConfig(base_model=base_model).with_steps(max_steps)
    examples = load_task(identity.task, "examine", resolve_data_dir(data_dir), limit)
    # The run directory first, so the folder is checked and locked before anything is written into it; the hashes
    # are the training sets' sha256, as the trainer records them.
    hashes = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}
    run = RunDir.create(
        folder, RunConfig(identity=AblateIdentity(data=str(data), rows=rows, limit=limit, hashes=hashes))
    )
    sets = write_training_sets(texts, folder)
    trained = train_sets(sets, folder, base_model, max_steps, on_log=on_train_log)

    def on_result(name: str) -> Callable[[Record], None]:
        return counter(progress, f"eval {name}", len(examples))

    figures = await evaluate_adapters(
        examples,
        base_model,
        {name: result.adapter_dir for name, result in trained.items()},
        run,
        GenerationSettings(max_new_tokens=max_new_tokens),
        concurrency,
        on_result=on_result,
    )
    run.write_json(FIGURES, {name: f.to_dict() for name, f in figures.items()})
    render_ablation(identity.task, figures, trained, sets).write(run.path)
    return Ablation(run.path, figures, trained)

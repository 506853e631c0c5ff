"""Train the study assistant on its own rewarded feedback (SALAM, part 2), then compare it with the general one.

1. export the filtered replay of the gathering run directories (``training.replay``);
2. fine-tune a LoRA adapter on it, from the runs' assistant model unless another base model is given; an adapter
   already trained the same way is reused (``trained_before``);
3. optionally examine the first run's examine items with the general and with the trained assistant: the same
   student, memory and retrieved mistakes, so the two differ only by the adapter. When the run's own assistant was
   another model (the teacher whose turns were replayed), its assisted exam on those items sits beside them.

Everything goes under ``out``: ``replay/``, ``adapter/`` (trained in ``adapter.training/``, which a killed
training resumes from) and ``compare/`` (a run directory, so a killed comparison resumes too). A call that fails
before the adapter is whole leaves no folder it made.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agents.team import RolesConfig, build_roles
from memory.store import MistakeMemory
from runtime.data.paths import resolve_data_dir
from runtime.data.records import BackendInfo, CompareIdentity, ItemResult, RunConfig, RunIdentity
from runtime.data.rundir import RunDir, read_records
from runtime.data.tasks import Example, load_task
from runtime.defaults import CONCURRENCY
from runtime.errors import ConfigError, DataError
from runtime.models.config import BackendConfig
from runtime.report import ComparisonFigures, render_comparison
from runtime.workflows.experiment import ASSISTED, Progress, compare_assistants
from runtime.workflows.experiment_settings import ExperimentSettings
from training.replay import SFT_JSONL, ReplayStats, export_replay
from training.sft_config import LoraSFTConfig
from training.sft_trainer import TrainResult, claim_folder, scratch_folder, train_lora, trained_before

log = logging.getLogger(__name__)

FIGURES = "figures.json"
ADAPTER, REPLAY, COMPARE = "adapter", "replay", "compare"  # the folders under --out


@dataclass(frozen=True)
class AssistantTraining:
    """What ``train_assistant`` did: the replay it exported, the adapter, and the comparison if one was run."""

    replay: ReplayStats
    replay_dir: Path
    trained: TrainResult
    reused: bool  # the adapter in ``out`` was already trained this way, and kept
    comparison: ComparisonFigures | None = None
    compare_dir: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The figures as one JSON object: replay counts, the adapter, and the accuracy of each assistant."""
        summary: dict[str, Any] = {
            "replay": self.replay.to_dict(),
            "adapter_dir": str(self.trained.adapter_dir),
            "steps": self.trained.steps,
            "final_loss": self.trained.final_loss,
            "reused": self.reused,
        }
        if self.comparison is not None:
            conditions = self.comparison.conditions
            summary["accuracy"] = {name: c.overall.accuracy for name, c in conditions.items()}
            summary["changed_answers"] = self.comparison.changed_answers
        return summary


def train_assistant(
    runs: Sequence[Path],
    out: Path,
    *,
    max_steps: int | None = None,
    base_model: str | None = None,
    compare: bool = True,
    limit: int | None = None,
    concurrency: int = CONCURRENCY,
    response_cache: bool = True,
    data_dir: Path | None = None,
    on_train_log: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress | None = None,
    accelerate_config: Path | None = None,
) -> AssistantTraining:
    """Replay ``runs`` into ``out/replay``, train the adapter into ``out/adapter``, then compare in ``out/compare``.

    ``base_model`` defaults to the local model that played the assistant in ``runs[0]``. The comparison needs
    ``runs[0]`` to be a ``redpen run`` directory (it reuses that run's examine split, memory and retrieval); for a
    gather directory it is skipped, with a warning.
    Call it outside an event loop: the comparison runs its own.
    """
    if not runs:
        raise ConfigError("no run directories given: pass the --out folder of `redpen gather` or `redpen run`")
    first = RunConfig.read(runs[0])
    adapter_dir, replay_dir = out / ADAPTER, out / REPLAY
    if compare and not isinstance(first.identity, RunIdentity):  # a gather directory: no examine split to compare on
        log.warning(
            "%s is not a `redpen run` directory, so the adapter is trained without the comparison; compare it with "
            "`redpen exam --assistant-adapter %s`",
            runs[0],
            adapter_dir,
        )
        compare = False
    existed = claim_folder(out, {REPLAY, ADAPTER, scratch_folder(adapter_dir).name, COMPARE})
    try:
        stats = export_replay(runs, replay_dir)
        if base_model is None:
            base_model = _local_model(first.assistant_backend)
        if base_model is None:
            raise ConfigError(f"{runs[0]}: its assistant was not a local model; pass --base-model FOLDER to train one")
        config = LoraSFTConfig(output_dir=str(adapter_dir), base_model=base_model).with_steps(max_steps)
        dataset = replay_dir / SFT_JSONL
        trained = trained_before(dataset, config)
        reused = trained is not None
        if trained is None:
            trained = train_lora(dataset, config, on_log=on_train_log, accelerate_config=accelerate_config)
        else:
            log.info("reusing %s: already trained on this replay with these settings", adapter_dir)
    except Exception:  # nothing half-made is left (a kill or Ctrl-C keeps the checkpoints, to resume from)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    result = AssistantTraining(stats, replay_dir, trained, reused)
    if not compare:
        return result
    compare_dir = RunDir.create(
        out / COMPARE,
        RunConfig(
            identity=CompareIdentity(
                run=str(runs[0]),
                adapter=str(trained.adapter_dir),
                dataset_hash=trained.dataset_hash,
                limit=limit or _run_identity(first, runs[0]).limit,
            )
        ),
    )
    figures = asyncio.run(
        _compare(
            first, runs[0], base_model, trained, compare_dir, limit, concurrency, response_cache, data_dir, progress
        )
    )
    compare_dir.write_json(FIGURES, figures.to_dict())
    training = {
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "dataset_hash": trained.dataset_hash,
        "adapter_dir": str(trained.adapter_dir),
    }
    render_comparison(figures, training, stats.to_dict()).write(compare_dir.path)
    return replace(result, comparison=figures, compare_dir=compare_dir.path)


async def _compare(
    first: RunConfig,
    run_dir: Path,
    base_model: str,
    trained: TrainResult,
    compare_dir: RunDir,
    limit: int | None,
    concurrency: int,
    response_cache: bool,
    data_dir: Path | None,
    progress: Progress | None,
) -> ComparisonFigures:
    """The run's student and memory, assisted by the base model with and without the trained adapter."""
    identity = _run_identity(first, run_dir)
    if first.memory is None:
        raise DataError(f"{run_dir}: no memory recorded in its config.json; re-run `redpen run` into a new --out")
    student_model = _local_model(first.student_backend)
    if student_model is None:
        raise ConfigError(
            f"{run_dir}: its student was not a local model, which the comparison needs; pass --no-compare"
        )
    student = BackendConfig(kind="local", model=student_model)
    assistant = None if student.model == base_model else BackendConfig(kind="local", model=base_model)
    examples = load_task(identity.task, "examine", resolve_data_dir(data_dir), limit or identity.limit)
    roles = build_roles(
        RolesConfig(
            student=student,
            assistant=assistant,
            assistant_adapter=str(trained.adapter_dir),
            student_max_new_tokens=identity.student_settings["max_new_tokens"],
            response_cache=response_cache,
        )
    )
    general = replace(roles, assistant_adapter=None)
    settings = ExperimentSettings(
        task=identity.task, k=identity.k, threshold=identity.threshold, concurrency=concurrency
    )
    where = first.memory or {}  # {"path": folder} or {"url": server}
    store = MistakeMemory(Path(where["path"]) if "path" in where else None, url=where.get("url"), create=False)
    reference = run_assistant_results(first, run_dir, examples, base_model)
    try:
        return await compare_assistants(
            examples, general, roles, store, compare_dir, settings, progress=progress, reference=reference
        )
    finally:
        store.close()


def run_assistant_results(
    config: RunConfig, run_dir: Path, examples: Sequence[Example], base_model: str
) -> tuple[str, list[ItemResult]] | None:
    """The run's own assisted exam on ``examples``, when its assistant was not ``base_model`` (e.g. the teacher).

    The same items, student, memory and retrieval as the comparison's, so it is a third assistant on equal terms;
    None when the assistant was ``base_model`` itself, or the run's exam does not cover every item (one warning).
    """
    info = config.assistant_backend
    if info is None or (info.kind == "local" and info.path == base_model):
        return None
    path = run_dir / ASSISTED
    by_id = {r.id: r for r in read_records(path, ItemResult)} if path.exists() else {}
    missing = sum(e.id not in by_id for e in examples)
    if missing:
        log.warning(
            "%s: %d of %d items have no assisted answer; the run's assistant is left out", path, missing, len(examples)
        )
        return None
    return info.model_id, [by_id[e.id] for e in examples]


def _run_identity(config: RunConfig, run_dir: Path) -> RunIdentity:
    if not isinstance(config.identity, RunIdentity):
        raise ConfigError(
            f"{run_dir} is not a `redpen run` directory; pass --no-compare, or compare with "
            "`redpen exam --assistant-adapter`"
        )
    return config.identity


def _local_model(info: BackendInfo | None) -> str | None:
    """The model folder of a recorded backend, if it was a local one."""
    return info.path if info is not None and info.kind == "local" else None

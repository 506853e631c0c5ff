"""``redpen instruct`` as one library call: load the plan, run the loop, write the ledger, figures and report."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory.embed import Embedder
from runtime.data.kinds import INSTRUCTOR_STRATEGIES, kind_of
from runtime.data.rundir import RunDir
from runtime.errors import ConfigError
from runtime.models.backend import Backend
from runtime.models.cache import CachedBackend
from runtime.models.config import BackendConfig
from runtime.models.default_model import DEFAULT_MODEL_NAME, cache_root, default_model_dir
from runtime.models.engines import served_model
from runtime.models.factory import make_backend
from runtime.models.local import LocalBackend
from runtime.report import InstructFigures, render_instruct
from training.instruct.benchmarks import check_disjoint, default_ood, is_jsonl, load_benchmark, load_target
from training.instruct.loop import InstructLoop, Outcome, Plan, Progress
from training.instruct.memory_rows import MemorySource
from training.instruct.report import figures, ledger, verdicts_of
from training.instruct.settings import InstructSettings


@dataclass(frozen=True)
class InstructResult:
    figures: InstructFigures
    report_md: Path
    report_html: Path


def plan(settings: InstructSettings, data_dir: Path) -> Plan:
    targets = [
        load_target(t, data_dir, settings.dev_fraction, settings.seed, settings.answer_kind) for t in settings.targets
    ]
    written = [s for s in (*settings.strategies, *settings.baselines) if s in INSTRUCTOR_STRATEGIES]
    # Code items allow none: their samples would need tests to grade them.
    refusing = [t.name for t in targets if any(not set(written) <= kind_of(e).instructor_strategies for e in t.pool)]
    if refusing:
        raise ConfigError(
            f"{', '.join(refusing)}: instructor-written samples ({', '.join(written)}) would need tests to grade them, "
            "which the instructor does not write; use --strategy replay or memory, and the plain baseline"
        )
    benchmarks = {}
    if settings.eval_split == "dev":
        for t in targets:
            benchmarks[f"{t.name} (dev)"] = t.dev[: settings.eval_limit]
        return Plan(targets, benchmarks, list(benchmarks))
    ood = settings.ood if settings.ood is not None else default_ood(settings.targets, data_dir)
    check_disjoint(settings.targets, ood)
    # A JSONL target is examined on its own examine file (ids apart from its train rows': another source name).
    examine_files = dict(zip([t for t in settings.targets if is_jsonl(t)], settings.examine_jsonl, strict=True))
    for name in [*settings.targets, *ood]:
        if name in examine_files:
            source = f"{Path(name).stem}-examine"
            benchmarks[name] = load_benchmark(
                examine_files[name], data_dir, settings.eval_limit, settings.answer_kind, source
            )
        else:
            benchmarks[name] = load_benchmark(name, data_dir, settings.eval_limit, settings.answer_kind)
    return Plan(targets, benchmarks, list(settings.targets))


class ModelPool:
    """Backends by model folder (None: the base), each behind the response cache unless it is off: local ones
    (transformers in this process), or with ``engine="vllm"`` each folder on a vLLM server of its own, started on
    first use and stopped on ``release``."""

    def __init__(self, base_model: Path | None, cache: Path | None, engine: str = "local") -> None:
        self.base_model, self.cache, self.engine = base_model, cache, engine
        self.loaded: dict[Path | None, Backend] = {}

    def __call__(self, model: Path | None) -> Backend:
        if model not in self.loaded:
            folder = model if model is not None else self.base_model
            backend = LocalBackend(folder) if self.engine == "local" else served_model(folder, self.engine)
            self.loaded[model] = backend if self.cache is None else CachedBackend(backend, self.cache)
        return self.loaded[model]

    async def release(self, model: Path | None) -> None:
        backend = self.loaded.pop(model, None)
        if backend is not None:
            await backend.aclose()

    async def aclose(self) -> None:
        for model in list(self.loaded):
            await self.release(model)


def run_instruct(
    settings: InstructSettings,
    data_dir: Path,
    out: Path,
    *,
    base_model: Path | None = None,
    instructor: BackendConfig | None = None,
    no_cache: bool = False,
    progress: Progress | None = None,
    on_train_log: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
    accelerate_config: Path | None = None,
    engine: str = "local",
) -> InstructResult:
    """Run (or resume) the instructor loop in ``out``; the student is ``base_model`` or the embedded default,
    run by ``engine`` (``runtime.models.engines``); ``accelerate_config`` launches each training under accelerate."""
    the_plan = plan(settings, data_dir)
    memory = None
    if settings.memory is not None:  # checked before the run folder is made
        student_id = base_model.name if base_model is not None else DEFAULT_MODEL_NAME
        memory = MemorySource(Path(settings.memory), student_id)
    run = RunDir(
        out,
        {
            "command": "instruct",
            **settings.to_dict(),
            "base_model": str(base_model) if base_model else None,
            "instructor": instructor.to_dict() if instructor else None,
        },
    )
    with run.removed_on_failure():  # a failure before the first record (the instructor unreachable) leaves nothing
        cache = cache_root() / "responses.sqlite"
        pool = ModelPool(base_model, None if no_cache else cache, engine)
        needs_instructor = any(s in ("le", "lec") for s in settings.strategies) or "augment" in settings.baselines
        instructor_backend = None
        if needs_instructor:
            instructor_backend = pool(None) if instructor is None else make_backend(instructor)
            if instructor is not None and not no_cache:
                instructor_backend = CachedBackend(instructor_backend, cache)
        loop = InstructLoop(
            settings,
            the_plan,
            run,
            pool,
            instructor_backend,
            Embedder(),
            base_model or default_model_dir(),
            progress=progress,
            on_train_log=on_train_log,
            memory=memory,
            accelerate_config=accelerate_config,
        )

        async def go() -> Outcome:
            try:
                return await loop.run_all()
            finally:
                await pool.aclose()
                if instructor_backend is not None and instructor is not None:
                    await instructor_backend.aclose()

        outcome = asyncio.run(go())
    open_answers = [b for b, items in the_plan.benchmarks.items() if any(not kind_of(e).multiple_choice for e in items)]
    figs = figures(outcome.results, outcome.supplies, outcome.stages, the_plan.in_domain, open_answers)
    run.write_text("ledger.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ledger(outcome.results)))
    run.write_json("figures.json", figs.to_dict())
    md, html = render_instruct(figs, verdicts_of(outcome.results), settings.to_dict()).write(run.path)
    return InstructResult(figs, md, html)

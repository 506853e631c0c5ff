"""The instructor loop (LLMs-as-Instructors, Algorithm 1), every stage resumable.

For iteration i = 1..n: select a fresh seeded sample of each target's train part; the current model answers it
(result collection); the strategy turns its wrong cases into training rows (data supply); a LoRA adapter is trained
on them; evaluated in and out of domain. Baselines (``plain``, ``augment``) get the same number of rows, steps and
learning rate at every iteration and run the same chain from the same base.

Iteration i starts from iteration i-1's model by *merging* i-1's adapter into its base and training a new adapter
on the merged folder: every condition is then a plain model folder that any backend (vLLM included) serves without
peft, and each iteration's adapter is small and only holds that iteration's change. Continuing one adapter would
tie every iteration to one rank and one set of target layers.

Each stage writes its output whole (or appends item by item) in the run directory, and a re-run skips what is done.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agents.instructor import Strategy, instructor_messages, parse_samples
from agents.student import student_messages
from memory.embed import TextEmbedder
from memory.record import MistakeRecord
from runtime.data.kinds import grade, kind_of
from runtime.data.records import ItemResult, Record
from runtime.data.rundir import RunDir, complete_pending, read_dataset
from runtime.data.tasks import Example
from runtime.defaults import CODE_MAX_NEW_TOKENS
from runtime.errors import ConfigError
from runtime.models.adapters import adapter_digest
from runtime.models.backend import Backend, GenerationSettings
from runtime.report import Stages
from runtime.workflows.evaluation import run_eval
from training.instruct import supply
from training.instruct.benchmarks import Target
from training.instruct.contamination import distinct, overlaps
from training.instruct.memory_rows import MemorySource, as_example, guided_reply
from training.instruct.settings import InstructSettings
from training.instruct.supply import Row
from training.merge import merge_adapter
from training.sft_config import LoraSFTConfig
from training.sft_trainer import train_lora

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class ModelBackends(Protocol):
    """A backend for a model folder (None: the base model), loaded on first use; ``release`` drops one the loop
    needs no more: each holds a model and up to its prefix-cache budget, and a run trains a model per condition."""

    def __call__(self, model: Path | None) -> Backend: ...

    async def release(self, model: Path | None) -> None: ...


@dataclass
class StageLog:
    """What a run measured, stage by stage: seconds and tokens (kept in ``stages.json``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, tokens: int = 0) -> None:
        """Seconds add up over a kill and its resume; ``tokens`` is the stage's total, counted from all its records
        (a resumed stage reads back what was done before the kill, so adding would count that twice)."""
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 2)
        self.tokens[stage] = tokens

    def figures(self) -> Stages:
        return Stages(seconds=dict(self.seconds), tokens=dict(self.tokens))


class InstructorReply(Record):
    """The instructor's samples for one case, as ``instructor.jsonl`` holds them."""

    reply: str
    tokens: int


class AnswerCheck(Record):
    """The instructor's own answer to a sample it wrote, asked cold (``answer_check.jsonl``)."""

    reply: str
    correct: bool


@dataclass(frozen=True)
class Outcome:
    """Every condition's evaluation results, the supply counts and the stages, as the loop left them."""

    results: dict[str, dict[str, list[ItemResult]]]  # condition -> benchmark -> records
    supplies: dict[str, dict[str, Any]]  # condition -> its supply.json
    stages: Stages


@dataclass
class Plan:
    """The inputs of a run, loaded by the caller."""

    targets: list[Target]
    benchmarks: dict[str, list[Example]]  # name -> evaluation items (in-domain first, then out-of-domain)
    in_domain: list[str]


class InstructLoop:
    def __init__(
        self,
        settings: InstructSettings,
        plan: Plan,
        run: RunDir,
        backends: ModelBackends,
        instructor: Backend | None,
        embedder: TextEmbedder,
        base_model: Path,
        progress: Progress | None = None,
        on_train_log: Callable[[str], Callable[[dict[str, Any]], None]] | None = None,
        memory: MemorySource | None = None,
        accelerate_config: Path | None = None,
    ) -> None:
        self.s, self.plan, self.run = settings, plan, run
        self.backends, self.instructor, self.embedder = backends, instructor, embedder
        self.base_model = base_model
        self.progress = progress
        self.on_train_log = on_train_log
        self.memory = memory
        self.accelerate_config = accelerate_config
        self._records: dict[str, MistakeRecord] = {}
        self.stages = StageLog(**_read_json(run.file("stages.json"), {}))
        self.eval_settings = GenerationSettings(max_new_tokens=settings.max_new_tokens)
        self.style = supply.RowStyle(settings.name_option, settings.shuffle_options)
        # Code replies need room for a whole function (runtime.defaults); other tasks keep the configured length.
        self.code_settings = GenerationSettings(max_new_tokens=max(settings.max_new_tokens, CODE_MAX_NEW_TOKENS))

    # ---- the loop --------------------------------------------------------------------------------------------

    async def run_all(self) -> Outcome:
        """Every condition's evaluation results: ``{condition: {benchmark: [record, ...]}}``, plus the supply counts."""
        results: dict[str, dict[str, list[ItemResult]]] = {"base": await self.evaluate("base", None)}
        supplies: dict[str, dict[str, Any]] = {}
        models: dict[str, Path | None] = {"base": None}
        previous = {"iter": "base", **{b: "base" for b in self.s.baselines}}
        used: set[str] = set()
        for i, strategy in enumerate(self.s.strategies, 1):
            condition = f"iter{i}"
            targets_selection = self.select(i, used)
            used |= {e.id for e in targets_selection}
            selection = self.memory_selection(i) if strategy == "memory" else targets_selection
            model_before = models[previous["iter"]]
            verdicts = await self.collect(condition, selection, model_before)
            if model_before is not None:  # the chain's previous model has answered its last question
                await self.backends.release(model_before)
            rows, counts = await self.supply(condition, strategy, selection, verdicts, i)
            counts["strategy"] = strategy
            supplies[condition] = counts
            models[condition] = self.train(condition, rows, model_before, i)
            results[condition] = await self.evaluate(condition, models[condition])
            if strategy == "memory":
                counts.update(await self.absorb(condition, selection, models[condition]))
                self.run.write_json(f"{condition}/supply.json", counts)
            previous["iter"] = condition
            for baseline in self.s.baselines:
                name = f"{baseline}{i}"
                base_rows, base_counts = await self.baseline_rows(name, baseline, targets_selection, counts["rows"], i)
                supplies[name] = base_counts
                models[name] = self.train(name, base_rows, models[previous[baseline]], i)
                results[name] = await self.evaluate(name, models[name])
                if models[name] is not None:  # a baseline's model is only trained from, never asked again
                    await self.backends.release(models[name])
                previous[baseline] = name
        return Outcome(results, supplies, self.stages.figures())

    # ---- stages ----------------------------------------------------------------------------------------------

    def select(self, iteration: int, used: set[str]) -> list[Example]:
        """A fresh seeded sample of each target's pool, disjoint from earlier iterations' while the pool lasts."""
        path = self.run.file(f"iter{iteration}/selection.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        by_id = {e.id: e for t in self.plan.targets for e in t.pool}
        saved = _read_json(path, None)
        if saved is not None:
            return [by_id[i] for i in saved]
        chosen: list[Example] = []
        for target in self.plan.targets:
            rng = random.Random(f"{self.s.seed}/{iteration}/{target.name}")
            fresh = [e for e in target.pool if e.id not in used]
            if len(fresh) < self.s.select:
                fresh = list(target.pool)  # pool spent: draw again from all of it
            chosen += rng.sample(fresh, min(self.s.select, len(fresh)))
        self.run.write_json(f"iter{iteration}/selection.json", [e.id for e in chosen])
        return chosen

    def memory_selection(self, iteration: int) -> list[Example]:
        """The memory's unabsorbed records of this student, as items (the saved ids on a resume)."""
        assert self.memory is not None
        records = {r.id: r for r in self.memory.records(include_absorbed=True)}
        path = self.run.file(f"iter{iteration}/memory_selection.json")
        saved = _read_json(path, None)
        if saved is None:
            saved = [i for i, r in records.items() if r.absorbed_into is None]
            if not saved:
                raise ConfigError(f"{self.memory.path}: every mistake is already absorbed; nothing to learn from")
            self.run.write_json(f"iter{iteration}/memory_selection.json", saved)
        self._records = records
        return [as_example(records[i]) for i in saved]

    async def absorb(self, condition: str, selection: Sequence[Example], model: Path | None) -> dict[str, Any]:
        """The trained model on the memory's questions without guidance; the ones it gets right are absorbed."""
        assert self.memory is not None and model is not None
        before = {r.id: r.verdict for r in self.run.records(f"{condition}/collect.jsonl", ItemResult)}
        results_file = f"{condition}/memory_after.jsonl"
        after = await run_eval(
            selection,
            self.backends(model),
            self.run,
            self._settings(selection),
            concurrency=self.s.concurrency,
            on_result=self._tick(f"{condition} memory check", selection, results_file),
            results_file=results_file,
        )
        right = [r.id for r in after if r.verdict == "correct"]
        marked = self.memory.mark_absorbed(right, model.name)
        n = len(selection)
        return {
            "memory_records": n,
            "memory_accuracy_before": round(sum(v == "correct" for v in before.values()) / n, 4),
            "memory_accuracy_after": round(len(right) / n, 4),
            "absorbed": marked,
            "absorbed_into": model.name,
        }

    async def collect(self, condition: str, selection: Sequence[Example], model: Path | None) -> dict[str, str]:
        """The current model's verdict on every selected item."""
        started = time.perf_counter()
        backend = self.backends(model)
        results_file = f"{condition}/collect.jsonl"
        records = await run_eval(
            selection,
            backend,
            self.run,
            self._settings(selection),
            concurrency=self.s.concurrency,
            on_result=self._tick(f"{condition} collect", selection, results_file),
            results_file=results_file,
        )
        self.stages.add(f"{condition} collect", time.perf_counter() - started, _tokens(records))
        self._save_stages()
        return {r.id: r.verdict for r in records}

    async def supply(
        self, condition: str, strategy: str, selection: Sequence[Example], verdicts: dict[str, str], iteration: int
    ) -> tuple[Path, dict[str, Any]]:
        """The iteration's training rows (``rows.jsonl``) and how they were made (``supply.json``)."""
        rows_path, counts_path = self.run.file(f"{condition}/rows.jsonl"), f"{condition}/supply.json"
        saved = _read_json(self.run.file(counts_path), None)
        if saved is not None and rows_path.exists():
            return rows_path, saved
        started = time.perf_counter()
        rng = random.Random(f"{self.s.seed}/{iteration}/{strategy}")
        if strategy == "replay":
            rows, counts = supply.replay_rows(
                selection,
                verdicts,
                contrast=self.s.contrast,
                balance=self.s.balance,
                k=self.s.k,
                budget=self.s.budget * len(self.plan.targets),
                embedder=self.embedder,
                rng=rng,
                style=self.style,
            )
        elif strategy == "memory":
            wrong = [e for e in selection if verdicts[e.id] != "correct"]
            rows = [
                supply.training_row(e, guided_reply(self._records[e.id]), "memory")
                for e in wrong[: self.s.budget * len(self.plan.targets)]
            ]
            counts = {"wrong_cases": len(wrong), "rows": len(rows)}
        elif strategy in ("le", "lec"):
            wrong = [e for e in selection if verdicts[e.id] != "correct"]
            correct = [e for e in selection if verdicts[e.id] == "correct"]
            rows, counts = await self.instructed(condition, strategy, wrong, correct, rng)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        counts["overlap"] = self._overlap_summary([r["messages"][1]["content"] for r in rows])
        if any(kind_of(e).multiple_choice for e in selection):
            counts["gold_of_rows"] = self._choice_golds(rows)
            counts["gold_of_selection"] = _distribution(e.target for e in selection if kind_of(e).multiple_choice)
        counts["accuracy_on_selection"] = round(sum(v == "correct" for v in verdicts.values()) / len(verdicts), 4)
        counts["items"] = supply.source_items(rows)
        self._write_rows(rows_path, rows)
        self.run.write_json(counts_path, counts)
        self.stages.add(f"{condition} supply", time.perf_counter() - started, counts.get("instructor_tokens", 0))
        self._save_stages()
        return rows_path, counts

    async def baseline_rows(
        self, name: str, baseline: str, selection: Sequence[Example], n_rows: int, iteration: int
    ) -> tuple[Path, dict[str, Any]]:
        rows_path, counts_path = self.run.file(f"{name}/rows.jsonl"), f"{name}/supply.json"
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        saved = _read_json(self.run.file(counts_path), None)
        if saved is not None and rows_path.exists():
            return rows_path, saved
        rng = random.Random(f"{self.s.seed}/{iteration}/{baseline}")
        if baseline == "plain":
            rows = supply.plain_rows(selection, n_rows, rng, self.style)
            counts: dict[str, Any] = {"rows": len(rows)}
        elif baseline == "replay":  # the iteration's own verdicts, so replay answers the same errors at equal rows
            verdicts: dict[str, str] = {
                r.id: r.verdict for r in self.run.records(f"iter{iteration}/collect.jsonl", ItemResult)
            }
            rows, counts = supply.replay_rows(
                selection,
                verdicts,
                contrast=self.s.contrast,
                balance=self.s.balance,
                k=self.s.k,
                budget=n_rows,
                embedder=self.embedder,
                rng=rng,
                style=self.style,
            )
        else:
            cases = rng.sample(list(selection), min(self.s.max_cases, len(selection)))
            rows, counts = await self.instructed(name, "augment", cases, [], rng, budget=n_rows)
        counts["strategy"] = baseline
        if any(kind_of(e).multiple_choice for e in selection):
            counts["gold_of_rows"] = self._choice_golds(rows)
        counts["overlap"] = self._overlap_summary([r["messages"][1]["content"] for r in rows])
        counts["items"] = supply.source_items(rows)
        self._write_rows(rows_path, rows)
        self.run.write_json(counts_path, counts)
        return rows_path, counts

    async def instructed(
        self,
        condition: str,
        strategy: Strategy,
        cases: Sequence[Example],
        correct: Sequence[Example],
        rng: random.Random,
        budget: int | None = None,
    ) -> tuple[list[Row], dict[str, Any]]:
        """Samples the instructor writes for each case; parsed, deduplicated, checked against the evaluation sets."""
        if self.instructor is None:
            raise RuntimeError("an instructor backend is needed for le, lec and augment")
        budget = budget or self.s.budget * len(self.plan.targets)
        cases = rng.sample(list(cases), min(self.s.max_cases, len(cases)))
        n = supply.samples_per_case(budget, len(cases))
        contrast = supply.nearest_correct(cases, correct, self.embedder, self.s.k) if strategy == "lec" else {}
        settings = GenerationSettings(max_new_tokens=self.s.instructor_tokens)
        instructor = self.instructor
        replies_of = (
            {r.id: r.reply for r in self.run.records(f"{condition}/collect.jsonl", ItemResult)}
            if strategy != "augment"
            else {}
        )

        async def ask(case: Example) -> InstructorReply:
            response = replies_of.get(case.id, "")
            messages = instructor_messages(strategy, case, response, n, contrast.get(case.id, ()))
            generation = await instructor.generate(messages, settings)
            return InstructorReply(
                id=case.id,
                reply=generation.text,
                tokens=generation.usage.prompt_tokens + generation.usage.completion_tokens,
            )

        results_file = f"{condition}/instructor.jsonl"
        records = await complete_pending(
            self.run,
            results_file,
            InstructorReply,
            cases,
            ask,
            concurrency=self.s.concurrency,
            on_record=self._tick(f"{condition} instructor", cases, results_file, InstructorReply),
        )
        by_id = {c.id: c for c in cases}
        generated: list[Example] = []
        rejected: dict[str, int] = {}
        for record in records:
            case = by_id[record.id]
            parsed = parse_samples(record.reply, case.answer_kind, len(case.options))
            for reason, count in parsed.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + count
            for j, sample in enumerate(parsed.samples):
                options = kind_of(case).options_of(sample.question)
                generated.append(
                    Example(
                        f"{case.id}/gen{j}",
                        case.source,
                        sample.question,
                        sample.target,
                        case.answer_kind,
                        options,
                        {"response": sample.response},
                    )
                )
        keep, exact, near = distinct([g.input for g in generated], self.embedder, self.s.near_duplicate)
        unique = [generated[i] for i in keep]
        scores = self._overlaps([g.input for g in unique])
        clean = [g for g, o in zip(unique, scores, strict=True) if o <= self.s.contamination]
        checked = await self.answer_check(condition, clean) if self.s.check_answers else clean
        rows = [supply.training_row(g, g.metadata["response"], strategy) for g in checked][:budget]
        counts = {
            "cases": len(cases),
            "samples_per_case": n,
            "asked": n * len(cases),
            "parsed": len(generated),
            "rejected": rejected,
            "exact_duplicates": exact,
            "near_duplicates": near,
            "contaminated": len(unique) - len(clean),
            "answer_check_failed": len(clean) - len(checked),
            "kept": len(checked),
            "rows": len(rows),
            "instructor_tokens": sum(r.tokens for r in records),
            "rouge_l": scores,
        }
        return rows, counts

    async def answer_check(self, condition: str, samples: Sequence[Example]) -> list[Example]:
        """The samples whose stated answer the instructor gives again when asked each one cold, as a student."""
        assert self.instructor is not None
        instructor = self.instructor
        settings = GenerationSettings(max_new_tokens=self.s.instructor_tokens)

        async def ask(sample: Example) -> AnswerCheck:
            reply = (await instructor.generate(student_messages(sample), settings)).text
            return AnswerCheck(id=sample.id, reply=reply, correct=grade(sample, reply).verdict == "correct")

        results_file = f"{condition}/answer_check.jsonl"
        records = await complete_pending(
            self.run,
            results_file,
            AnswerCheck,
            samples,
            ask,
            concurrency=self.s.concurrency,
            on_record=self._tick(f"{condition} answer check", samples, results_file, AnswerCheck),
        )
        agreed = {r.id for r in records if r.correct}
        return [s for s in samples if s.id in agreed]

    def train(self, condition: str, rows_path: Path, model_before: Path | None, iteration: int) -> Path | None:
        """Fine-tune a new adapter on ``model_before`` and merge it into a model folder named by its content."""
        rows = len(read_dataset(rows_path))
        if rows == 0:
            log.warning("%s: no training rows; the model stays as it was", condition)
            return model_before
        started = time.perf_counter()
        config = LoraSFTConfig(
            output_dir=str(self.run.file(f"{condition}/adapter")),
            base_model=str(model_before or self.base_model),
            learning_rate=self.s.lr(iteration),
        )
        config.max_steps = max(1, math.ceil(rows * self.s.epochs / config.per_device_train_batch_size))
        adapter = self.run.file(f"{condition}/adapter")
        if not (adapter / "adapter_model.safetensors").exists():
            on_log = self.on_train_log(condition) if self.on_train_log else None
            train_lora(rows_path, config, on_log=on_log, accelerate_config=self.accelerate_config)
        digest = adapter_digest(adapter)[:12]
        merged = merge_adapter(
            model_before or self.base_model, adapter, self.run.file(f"{condition}/{condition}-{digest}")
        )
        self.stages.add(f"{condition} train", time.perf_counter() - started)
        self._save_stages()
        return merged

    async def evaluate(self, condition: str, model: Path | None) -> dict[str, list[ItemResult]]:
        """The condition's model on every benchmark; one results file per benchmark."""
        backend = self.backends(model)
        results = {}
        started = time.perf_counter()
        for name, items in self.plan.benchmarks.items():
            results_file = f"{condition}/eval_{_slug(name)}.jsonl"
            results[name] = await run_eval(
                items,
                backend,
                self.run,
                self._settings(items),
                concurrency=self.s.concurrency,
                on_result=self._tick(f"{condition} eval {name}", items, results_file),
                results_file=results_file,
            )
        self.stages.add(f"{condition} eval", time.perf_counter() - started, sum(_tokens(r) for r in results.values()))
        self._save_stages()
        return results

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _settings(self, items: Sequence[Example]) -> GenerationSettings:
        return self.code_settings if _programs(items) else self.eval_settings

    def _choice_golds(self, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        """The gold letters of the multiple-choice rows, what a letter prior is read against (a number, text or
        program gold has no such distribution; a mixed target such as gsm8k,mmlu counts only its choice rows)."""
        lettered = {e.source: kind_of(e).multiple_choice for t in self.plan.targets for e in t.pool}
        return _distribution(r["target"] for r in rows if lettered.get(r["source"]))

    def _overlaps(self, texts: Sequence[str]) -> list[float]:
        items = [e for b in self.plan.benchmarks.values() for e in b]
        return [o.rouge_l for o in overlaps(texts, [e.input for e in items], [e.id for e in items], self.embedder)]

    def _overlap_summary(self, texts: Sequence[str]) -> dict[str, Any]:
        scores = sorted(self._overlaps(texts))
        if not scores:
            return {"n": 0}
        return {
            "n": len(scores),
            "mean": round(sum(scores) / len(scores), 4),
            "median": scores[len(scores) // 2],
            "max": scores[-1],
            "above_threshold": sum(s > self.s.contamination for s in scores),
        }

    def _write_rows(self, path: Path, rows: Sequence[Row]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run.write_text(
            str(path.relative_to(self.run.path)), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )

    def _tick(
        self, phase: str, items: Sequence[Example], results_file: str, model: type[Record] = ItemResult
    ) -> Callable[[Record], None]:
        """Progress of a stage over ``items``, counted from those ``results_file`` already holds: a resumed stage
        shows what it really has left (a finished one N/N), not 0/N."""
        (self.run.path / phase.split()[0]).mkdir(parents=True, exist_ok=True)
        total = len(items)
        done = len(self.run.done_ids(results_file, model) & {e.id for e in items})
        if self.progress is not None:
            self.progress(phase, done, total)

        step = max(1, total // 10)  # ten log lines a stage: visible in the log file, and when piped

        def tick(_: Record) -> None:
            nonlocal done
            done += 1
            if done % step == 0 or done == total:
                log.info("%s %d/%d", phase, done, total)
            if self.progress is not None:
                self.progress(phase, done, total)

        return tick

    def _save_stages(self) -> None:
        self.run.write_json("stages.json", {"seconds": self.stages.seconds, "tokens": self.stages.tokens})


def _tokens(records: Sequence[ItemResult]) -> int:
    return sum(r.prompt_tokens + r.completion_tokens for r in records)


def _programs(items: Sequence[Example]) -> bool:
    """Code items: each gold is a program of its own, with no answer distribution to report."""
    return any(kind_of(e).code for e in items)


def _distribution(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items()))


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def _slug(name: str) -> str:
    return name.replace("/", "_").replace("+", "_")[:80]

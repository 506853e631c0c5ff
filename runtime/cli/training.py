"""Training commands: the study assistant, LEMA correction data, the student."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.cli.common import (
    Backend,
    BaseUrl,
    Concurrency,
    DataDir,
    JsonOut,
    Model,
    NoCache,
    console,
    load_examples,
    load_roles,
    open_store,
    phase_bar,
    progress_bar,
    quiet_transformers,
    run_config,
    slug,
    train_bar,
)


def train_assistant(
    runs: Annotated[list[Path], typer.Option("--runs", help="run directories with episodes.jsonl; repeatable")],
    out: Annotated[Path, typer.Option(help="adapter folder to write")],
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps [default: the config's, 30]")] = None,
    base_model: Annotated[str | None, typer.Option(help="model folder to train [default: the runs' assistant]")] = None,
    compare: Annotated[bool, typer.Option(help="then examine with the general and the trained assistant")] = True,
    limit: Annotated[int | None, typer.Option(help="examine items for the comparison [default: the run's]")] = None,
    concurrency: Concurrency = 32,
    no_cache: NoCache = False,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Fine-tune the study assistant (LoRA) on its rewarded feedback, then compare it with the general one."""
    from agents.experiment import ExperimentSettings, compare_assistants
    from runtime.data.rundir import RunDir
    from runtime.errors import ConfigError
    from runtime.report.experiment import render_comparison
    from training import LoraSFTConfig, export_replay, train_lora, trained_before

    first = run_config(runs[0])
    replay_dir = out.with_name(out.name + "-replay")
    with console.status("exporting the replay ..."):
        stats = export_replay(runs, replay_dir)
    backend_info = first.get("assistant_backend", {})
    if base_model is None:
        if backend_info.get("kind") != "local":
            raise ConfigError(f"{runs[0]}: its assistant was not a local model; pass --base-model FOLDER to train one")
        base_model = backend_info["path"]
    console.print(f"replay: {stats.steps} feedback steps, {stats.kept} rewarded kept -> {replay_dir}")
    for task_name, counts in stats.by_task.items():
        console.print(f"  {task_name}: kept {counts['kept']} of {counts['steps']}")
    steps = {"max_steps": max_steps} if max_steps is not None else {}
    config = LoraSFTConfig(output_dir=str(out), base_model=base_model, **steps)
    quiet_transformers()
    result = trained_before(replay_dir / "sft.jsonl", out, config.max_steps)
    if result is not None:
        console.print(f"{out} was already trained on this replay for {config.max_steps} steps; reusing it")
    else:
        with progress_bar() as bar:
            result = train_lora(replay_dir / "sft.jsonl", config, on_log=train_bar(bar, config.max_steps))
    console.print(f"adapter: {result.adapter_dir}  ({result.steps} steps, final loss {result.final_loss:.4f})")
    summary: dict[str, Any] = {
        "replay": stats.to_dict(),
        "adapter_dir": str(result.adapter_dir),
        "steps": result.steps,
        "final_loss": result.final_loss,
    }
    if compare:
        identity = first["identity"]
        if identity.get("command") != "run":
            raise ConfigError(
                f"{runs[0]} is not a `redpen run` directory; pass --no-compare, or compare with "
                "`redpen exam --assistant-adapter`"
            )
        name = identity["task"]
        _, examples = load_examples(name, None, "choice", "examine", limit or identity["limit"], data_dir)
        roles = load_roles(
            None,
            "local",
            base_model,
            None,
            None,
            None,
            None,
            no_cache=no_cache,
            assistant_adapter=str(result.adapter_dir),
        )
        general = replace(roles, assistant_adapter=None)
        settings = ExperimentSettings(
            task=name, k=identity["k"], threshold=identity["threshold"], concurrency=concurrency
        )
        compare_dir = RunDir(
            out.with_name(out.name + "-compare"),
            {
                "command": "compare-assistants",
                "run": str(runs[0]),
                "adapter": str(result.adapter_dir),
                "dataset_hash": result.dataset_hash,
                "limit": limit or identity["limit"],
            },
        )
        store = open_store({k: Path(v) if k == "path" else v for k, v in first["memory"].items()})
        try:
            with progress_bar() as bar:
                figures = asyncio.run(
                    compare_assistants(examples, general, roles, store, compare_dir, settings, progress=phase_bar(bar))
                )
        finally:
            store.close()
        training_info = {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "dataset_hash": result.dataset_hash,
            "adapter_dir": str(result.adapter_dir),
        }
        compare_dir.write_json("figures.json", figures)
        compare_dir.write_text("report.md", render_comparison(figures, training_info, stats.to_dict()))
        c = figures["conditions"]
        console.print(
            f"examine accuracy on {figures['n_examine']} items: general {c['general']['overall']['accuracy']:.3f}, "
            f"trained {c['trained']['overall']['accuracy']:.3f}, retrieval-only "
            f"{c['retrieval_only']['overall']['accuracy']:.3f}; report: {compare_dir.file('report.md')}"
        )
        summary["accuracy"] = {k: v["overall"]["accuracy"] for k, v in c.items()}
        summary["changed_answers"] = figures["changed_answers"]
    if json_out:
        print(json.dumps(summary))


def correct(
    task: Annotated[str, typer.Option(help="numeric or multiple-choice task to gather on")] = "gsm8k",
    limit: Annotated[int | None, typer.Option(help="gather problems")] = None,
    samples: Annotated[int, typer.Option(help="reasoning paths sampled per problem (temperature 0.8)")] = 4,
    out: Annotated[Path | None, typer.Option(help="run directory [default: runs/correct-<task>]")] = None,
    corrector_backend: Annotated[str | None, typer.Option(help="corrector's backend [default: the student's]")] = None,
    corrector_model: Annotated[str | None, typer.Option(help="corrector's model (a stronger one in real use)")] = None,
    corrector_base_url: Annotated[str | None, typer.Option(help="corrector's server URL")] = None,
    concurrency: Concurrency = 32,
    no_cache: NoCache = False,
    backend: Backend = "local",
    model: Model = None,
    base_url: BaseUrl = None,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Sample the student's reasoning, have a corrector fix the wrong paths, and write CoT + correction datasets."""
    from runtime.data.rundir import RunDir
    from training.lema import run_correction

    name, examples = load_examples(task, None, "choice", "gather", limit, data_dir)
    roles = load_roles(
        None, backend, model, base_url, corrector_backend, corrector_model, corrector_base_url, no_cache=no_cache
    )
    identity = {
        "command": "correct",
        "task": name,
        "limit": limit,
        "samples": samples,
        "student": roles.student_id,
        "corrector": roles.assistant_id,
    }
    run = RunDir(
        out or Path("runs") / slug(f"correct-{name}"),
        identity,
        {"student_backend": roles.student.describe(), "corrector_backend": roles.assistant.describe()},
    )
    with progress_bar() as bar:
        task_id = bar.add_task("correcting", total=len(examples), info="")
        counts = asyncio.run(
            run_correction(
                examples,
                roles.student,
                roles.assistant,
                run,
                samples=samples,
                concurrency=concurrency,
                on_progress=lambda _: bar.update(task_id, advance=1),
            )
        )
    console.print(
        f"{counts['problems']} problems, {counts['paths_sampled']} paths ({counts['paths_correct']} correct); "
        f"{counts['corrections_requested']} corrections asked, {counts['kept']} kept; CoT rows {counts['cot_rows']}, "
        f"correction rows {counts['correction_rows']}  -> {run.path}/report.md"
    )
    if json_out:
        print(json.dumps(counts))


def train_student(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path, typer.Option(help="adapter folder to write")],
    mode: Annotated[str, typer.Option(help="cot (chain-of-thought only) or cot+corrections")] = "cot+corrections",
    rows: Annotated[int | None, typer.Option(help="training rows [default: all CoT rows]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps [default: the config's, 30]")] = None,
    base_model: Annotated[str | None, typer.Option(help="model folder [default: the embedded default]")] = None,
) -> None:
    """Fine-tune the student (LoRA) on CoT data, or CoT + corrections at the same size."""
    from runtime.errors import ConfigError
    from training.ablation import SETS, training_sets
    from training.lema import COT
    from training.sft_config import LoraSFTConfig
    from training.sft_trainer import train_lora

    if mode not in ("cot", "cot+corrections"):
        raise ConfigError(f"unknown --mode {mode!r}: choose cot or cot+corrections")
    sets_dir = out.with_name(out.name + "-data")
    if mode == "cot":
        dataset = data / COT
    else:
        dataset = training_sets(data, sets_dir, rows)[SETS[1]]
    steps = {"max_steps": max_steps} if max_steps is not None else {}
    config = LoraSFTConfig(output_dir=str(out), base_model=base_model, **steps)
    quiet_transformers()
    with progress_bar() as bar:
        result = train_lora(dataset, config, on_log=train_bar(bar, config.max_steps))
    console.print(
        f"adapter: {result.adapter_dir}  ({result.steps} steps, final loss {result.final_loss:.4f}); "
        f"evaluate it with `redpen eval --adapter {result.adapter_dir}`"
    )


def ablate_corrections(
    data: Annotated[Path, typer.Option(help="a `redpen correct` run directory")],
    out: Annotated[Path | None, typer.Option(help="ablation folder [default: <data>-ablation]")] = None,
    rows: Annotated[int | None, typer.Option(help="rows in each training set [default: all CoT rows]")] = None,
    limit: Annotated[int | None, typer.Option(help="examine items")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimisation steps per adapter")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="reply length limit at evaluation")] = 256,
    base_model: Annotated[str | None, typer.Option(help="model folder [default: the embedded default]")] = None,
    concurrency: Concurrency = 32,
    data_dir: DataDir = None,
    json_out: JsonOut = False,
) -> None:
    """Train on CoT only and on CoT + corrections at equal size; evaluate both and the base on the examine split."""
    from agents.experiment import counter
    from runtime.data.rundir import RunDir
    from runtime.models.backend import GenerationSettings
    from training.ablation import evaluate_adapters, render_ablation, train_sets, training_sets

    task = run_config(data)["identity"]["task"]
    folder = out or data.with_name(data.name + "-ablation")
    sets = training_sets(data, folder, rows)
    quiet_transformers()
    with progress_bar() as bar:

        def on_log(name: str) -> Any:
            return train_bar(bar, max_steps or 30)

        trained = train_sets(sets, folder, base_model, max_steps, on_log=on_log)
    _, examples = load_examples(task, None, "choice", "examine", limit, data_dir)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    run = RunDir(
        folder,
        {
            "command": "ablate-corrections",
            "data": str(data),
            "rows": rows,
            "limit": limit,
            "hashes": {k: v.dataset_hash for k, v in trained.items()},
        },
    )
    with progress_bar() as bar:
        update = phase_bar(bar)

        def on_result(name: str) -> Any:
            return counter(update, f"eval {name}", len(examples))

        adapters = {name: result.adapter_dir for name, result in trained.items()}
        figures = asyncio.run(
            evaluate_adapters(examples, base_model, adapters, run, settings, concurrency, on_result=on_result)
        )
    run.write_json("figures.json", figures)
    run.write_text("report.md", render_ablation(task, figures, trained, sets))
    console.print(
        " | ".join(f"{k} {v['overall']['accuracy']:.3f}" for k, v in figures.items()) + f"  -> {run.file('report.md')}"
    )
    if json_out:
        print(json.dumps({k: v["overall"] for k, v in figures.items()}))

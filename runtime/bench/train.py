"""`redpen bench train`: redpen's LoRA trainer against a bare TRL ``SFTTrainer`` script on the same rows and
settings, and padding-free batches against padded ones, interleaved in one run (machines are shared and noisy).

Each side is timed from loading the model to the adapter saved (``total_s``: what a user waits for) and over
``trainer.train()`` alone (``train_s``). Tokens are TRL's own count of the tokens trained on, padding left out
(the attention mask's sum, or the flattened batch's length when padding-free), so padded and padding-free sides
are compared on real tokens. The loss is logged every step, so ``final_loss`` is the last step's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.data.kinds import kind_of
from runtime.data.tasks import load_task
from training.instruct.supply import training_row
from training.sft_config import LoraSFTConfig
from training.sft_trainer import Message, no_progress_bars, to_prompt_completion, train_lora

Row = dict[str, list[Message]]


@dataclass(frozen=True)
class Timed:
    total_s: float  # from loading the model to the adapter saved
    train_s: float  # trainer.train() alone
    tokens: int  # tokens trained on, padding left out
    final_loss: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.train_s


def bench_rows(data_dir: Path, n: int) -> list[Row]:
    """``n`` BBQ gather items as chat rows ending with their gold reply, as the instruct loop's plain supply
    builds them (the student's prompt, then "The answer is (X).")."""
    examples = load_task("bbq", "gather", data_dir, n)
    return [{"messages": training_row(e, kind_of(e).gold_reply(e), "plain")["messages"]} for e in examples]


def redpen_side(rows: Sequence[Row], config: LoraSFTConfig, work: Path) -> Timed:
    """``train_lora`` as redpen's commands call it, on ``rows`` written out as its JSONL dataset."""
    dataset = work / "rows.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logs: list[dict[str, Any]] = []
    started = time.perf_counter()
    result = train_lora(dataset, dataclasses.replace(config, output_dir=str(work / "redpen")), on_log=logs.append)
    total = time.perf_counter() - started
    meta = json.loads((result.adapter_dir / "redpen_adapter.json").read_text(encoding="utf-8"))
    shutil.rmtree(result.adapter_dir)
    return Timed(total, meta["train_seconds"], _tokens(logs), result.final_loss)


def bare_side(rows: Sequence[Row], config: LoraSFTConfig, work: Path, padding_free: bool | None = None) -> Timed:
    """What a user writes with TRL alone: load, ``SFTTrainer(...)``, ``.train()``, save; the same hyperparameters,
    batching (``config.padding_free`` unless ``padding_free`` says otherwise) and precision as ``config``, TRL's
    defaults for the rest (so no checkpoint in a short run: ``save_steps`` is 500, where redpen checkpoints every
    ``config.save_steps`` for a killed training to resume)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    _, model_dir = config.base_model_dir()
    padding_free = config.padding_free if padding_free is None else padding_free
    started = time.perf_counter()
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(work / "bare"),
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=config.max_steps,
        # TRL refuses max_length without packing when padding-free; the rows are short enough either way.
        max_length=None if padding_free else config.max_length,
        padding_free=padding_free,
        logging_steps=config.logging_steps,
        seed=config.seed,
        # TRL's default recomputes activations (~1.1x slower here); redpen does only for QLoRA: the same work each side.
        activation_checkpointing=config.use_qlora,
        # TRL's default autocasts a CPU to bf16; redpen trains in fp32 there and in bf16 on GPUs that have it.
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = config.to_lora_config()  # the same adapter as redpen's side: r, alpha, dropout declared once
    with no_progress_bars():  # as in redpen's trainer: library code draws no bars on the terminal
        model = AutoModelForCausalLM.from_pretrained(model_dir, **config.model_init_kwargs())
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([to_prompt_completion(r) for r in rows]),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    trainer.remove_callback(PrinterCallback)  # it prints every log line; the bench reports instead
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started
    trainer.save_model(str(work / "bare-adapter"))
    total = time.perf_counter() - started
    shutil.rmtree(work / "bare", ignore_errors=True)
    shutil.rmtree(work / "bare-adapter")
    logs = trainer.state.log_history
    return Timed(total, train_s, _tokens(logs), [float(e["loss"]) for e in logs if "loss" in e][-1])


def _tokens(logs: Sequence[dict[str, Any]]) -> int:
    """TRL's running count of the tokens trained on, from the last step's log (logging_steps=1)."""
    return int([e["num_tokens"] for e in logs if "num_tokens" in e][-1])


def train_rate(
    rows: Sequence[Row],
    config: LoraSFTConfig,
    work: Path,
    *,
    repeats: int = 2,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """redpen's trainer vs a bare TRL script with the same settings (padding-free: redpen's default), and that
    script with padded batches, interleaved; medians over ``repeats``.

    Every side trains on ``rows`` for ``config.max_steps`` steps from the same seed, logging the loss each step.
    """
    import datasets  # noqa: F401  (imported before the first timer, so no side pays for the imports)
    import peft  # noqa: F401
    import trl  # noqa: F401

    config = dataclasses.replace(config, logging_steps=1)
    work.mkdir(parents=True, exist_ok=True)
    sides: dict[str, Callable[[], Timed]] = {
        "redpen": lambda: redpen_side(rows, config, work),
        "bare_trl": lambda: bare_side(rows, config, work),
        "bare_trl_padded": lambda: bare_side(rows, config, work, padding_free=False),
    }
    runs: dict[str, list[Timed]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name, side in sides.items():  # interleaved, so drift in machine load hits every side alike
            runs[name].append(side())
            if on_step is not None:
                t = runs[name][-1]
                on_step(
                    f"repeat {repeat + 1}/{repeats} {name}: train {t.train_s:.1f} s, total {t.total_s:.1f} s, "
                    f"{t.tok_s:.1f} tok/s, final loss {t.final_loss:.4f}"
                )
    medians = {name: _medians(timed) for name, timed in runs.items()}
    redpen, bare, padded = medians["redpen"], medians["bare_trl"], medians["bare_trl_padded"]
    return {
        "rows": len(rows),
        "steps": config.max_steps,
        "batch_size": config.per_device_train_batch_size,
        "repeats": repeats,
        **medians,
        "redpen_over_bare_train_s": round(redpen["train_s"] / bare["train_s"], 3),
        "redpen_over_bare_total_s": round(redpen["total_s"] / bare["total_s"], 3),
        "padding_free_over_padded_tok_s": round(bare["tok_s"] / padded["tok_s"], 3),
    }


def _medians(timed: Sequence[Timed]) -> dict[str, Any]:
    return {
        "total_s": round(statistics.median(t.total_s for t in timed), 2),
        "train_s": round(statistics.median(t.train_s for t in timed), 2),
        "tok_s": round(statistics.median(t.tok_s for t in timed), 1),
        "tokens": timed[0].tokens,  # the same every run: same rows, same seed, same order
        "final_loss": round(statistics.median(t.final_loss for t in timed), 4),
        "runs": [dataclasses.asdict(t) | {"tok_s": round(t.tok_s, 1)} for t in timed],
    }

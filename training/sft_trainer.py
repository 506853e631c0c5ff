"""LoRA fine-tuning with TRL's ``SFTTrainer`` on any chat dataset, the loss on the last assistant reply only.

One trainer for every fine-tune in redpen: the study assistant on replayed feedback (``training.replay``) and the
student on correction data. A dataset is JSON lines of ``{"messages": [...]}`` ending with the assistant's reply.
Each row is split into a ``prompt`` (every message before that reply) and a ``completion`` (the reply): for
conversational prompt-completion rows TRL masks the prompt's labels with -100, so the model learns to write the
reply, not to recite the question. (TRL's ``assistant_only_loss`` would need a chat template with
``{% generation %}`` markers, which the default model's template lacks.)

Training happens in a scratch folder beside ``output_dir``, ``<output_dir>.training``: the trainer checkpoints there
every ``save_steps``, so a killed training (SIGKILL, Ctrl-C) run again with the same dataset and settings resumes
from its last whole checkpoint (TRL's ``resume_from_checkpoint``) instead of step 0. The adapter is saved there and
renamed into place when whole, so a crash never leaves half an adapter; ``redpen_adapter.json`` beside the weights
says what it was trained from and how. The scratch folder is removed when training ends, whether it succeeded or
failed with an error; only a killed training leaves it, to resume.

With an accelerate config the training step (``train_in_scratch``) runs in the processes ``accelerate launch``
starts (``training.distributed``): the same trainer in each, one adapter, saved by the main process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.data.rundir import read_dataset, write_atomic
from runtime.errors import ConfigError, DataError
from runtime.models.adapters import adapter_digest
from training.distributed import launch
from training.sft_config import LoraSFTConfig

if TYPE_CHECKING:
    from transformers import TrainerCallback
    from trl import SFTTrainer

log = logging.getLogger(__name__)

METADATA = "redpen_adapter.json"
Message = dict[str, str]


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    final_loss: float
    steps: int
    dataset_hash: str  # sha256 of the dataset file's bytes
    losses: list[float]  # every logged training loss, in step order
    resumed_from_step: int | None = None  # the checkpoint a killed training resumed from; None: from step 0


def to_prompt_completion(row: dict[str, list[Message]]) -> dict[str, list[Message]]:
    """Split a chat at its last message, the assistant reply that is trained on.

    >>> to_prompt_completion({"messages": [
    ...     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    {'prompt': [{'role': 'user', 'content': '2+2?'}], 'completion': [{'role': 'assistant', 'content': '4'}]}
    """
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def read_messages(dataset: Path) -> list[dict[str, list[Message]]]:
    """The rows of a ``{"messages": [...]}`` JSONL file, each checked to end with an assistant reply."""
    if not dataset.is_file():
        raise DataError(
            f"dataset {dataset} does not exist; `redpen train-assistant` exports one from gathering runs, "
            "`redpen correct` writes CoT and correction sets"
        )
    rows = []
    for number, row in read_dataset(dataset):  # strict: a torn or bad line is an error, never skipped
        messages = row.get("messages")
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"
        ):
            raise DataError(
                f"{dataset}:{number}: not a chat ending with the assistant's reply: "
                'want {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}'
            )
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    if not rows:
        raise DataError(f"dataset {dataset} has no rows: nothing to train on")
    return rows


def build_trainer(
    rows: Sequence[dict[str, list[Message]]],
    config: LoraSFTConfig,
    model_dir: Path,
    work_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> SFTTrainer:
    """An ``SFTTrainer`` with the LoRA adapter attached and the rows tokenized (prompt labels masked)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTTrainer

    set_seed(config.seed)  # before the model exists, so the LoRA init is the same on every run
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ConfigError(f"the tokenizer in {model_dir} has no chat template; give a chat (instruct) model")
    # A row cut at max_length would lose its end, the reply: the only part trained on. Such rows are left out.
    fits = [r for r in rows if _length(tokenizer, r["messages"]) <= config.max_length]
    if len(fits) < len(rows):
        log.warning(
            "left out %d of %d rows longer than max_length=%d", len(rows) - len(fits), len(rows), config.max_length
        )
    if not fits:
        raise DataError(f"every row is longer than max_length={config.max_length} tokens; raise max_length")
    with no_progress_bars():  # loading weights and TRL's tokenizing datasets.map draw bars on the terminal
        model = AutoModelForCausalLM.from_pretrained(model_dir, **config.model_init_kwargs())
        trainer = SFTTrainer(
            model=model,
            args=config.to_sft_config(work_dir),
            train_dataset=Dataset.from_list([to_prompt_completion(r) for r in fits]),
            processing_class=tokenizer,
            peft_config=config.to_lora_config(),
            callbacks=list(callbacks),
        )
    trainer.remove_callback(PrinterCallback)  # library code never prints; _progress logs and relays instead
    return trainer


def trained_before(dataset: Path, config: LoraSFTConfig) -> TrainResult | None:
    """The adapter already in ``config.output_dir`` if training again would make the same one, else None.

    The same one: trained on these very bytes from the same base model with the same settings (every field of
    ``config`` but ``output_dir``), and its weights still hash as they did after training (not replaced since).
    """
    folder = Path(config.output_dir).expanduser()
    if not (folder / METADATA).is_file():
        return None
    meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    model_id, model_dir = config.base_model_dir()
    wanted = {
        "dataset": digest,
        "base model": {"id": model_id, "path": str(model_dir)},
        "settings": _settings(config.to_dict()),
        "weights": adapter_digest(folder),
    }
    recorded = {
        "dataset": meta["dataset"]["sha256"],
        "base model": meta["base_model"],
        "settings": _settings(meta.get("config", {})),  # absent from metadata older than this check
        "weights": meta.get("adapter_sha256"),
    }
    changed = [name for name in wanted if wanted[name] != recorded[name]]
    if changed:
        log.info("not reusing the adapter in %s: its %s differ", folder, ", ".join(changed))
        return None
    # A training killed after its adapter was in place, before it removed its scratch folder: nothing to resume.
    shutil.rmtree(scratch_folder(folder), ignore_errors=True)
    return TrainResult(folder, meta["final_loss"], meta["steps"], digest, meta["losses"], meta.get("resumed_from_step"))


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The training settings that shape an adapter: all of ``LoraSFTConfig`` but where it is saved and how often
    it is checkpointed on the way."""
    return {name: value for name, value in config.items() if name not in ("output_dir", "save_steps")}


TRAINING = "redpen_training.json"  # in the scratch folder: what is being trained, so only that training resumes


def claim_folder(out: Path, ours: Collection[str]) -> bool:
    """Check a command's ``--out`` before writing: new, empty, or holding only ``ours`` (the names the command
    writes there); whether it existed. A folder with anything else in it is someone else's and is refused."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (new, or one this command wrote)")
    if not out.exists():
        return False
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise ConfigError(
            f"--out {out} holds files this command did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder"
        )
    return True


def scratch_folder(target: Path) -> Path:
    """Where the adapter for ``target`` is trained and checkpointed: beside it, so the final rename stays on one
    file system, and inside whatever folder the command was given."""
    return target.with_name(target.name + ".training")


def _resume_point(scratch: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The last whole checkpoint in ``scratch`` of this very training, or None; a scratch folder of another
    training (other data, base model or settings) is removed.

    Whole: its ``trainer_state.json``, which the trainer writes last, parses. A checkpoint cut by a kill is not.
    """
    if not scratch.exists():
        return None
    try:
        recorded = json.loads((scratch / TRAINING).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if recorded != fingerprint:
        log.info("removing %s: it holds checkpoints of another training", scratch)
        shutil.rmtree(scratch)
        return None
    checkpoints = sorted(
        (p for p in (scratch / "trainer").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for checkpoint in reversed(checkpoints):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(checkpoint)  # cut while being written: the trainer would try to load it
            continue
        return checkpoint
    return None


def train_lora(
    dataset: Path,
    config: LoraSFTConfig,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    accelerate_config: Path | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on a ``{"messages": [...]}`` JSONL file and save it to ``config.output_dir``.

    ``on_log`` is called after every step with ``{"step", "max_steps"}`` and, at each logging step, with the
    trainer's logs (``loss``, ``learning_rate``, ``grad_norm``...) added: enough to draw a progress bar.
    With ``accelerate_config`` the training step runs under ``accelerate launch`` with that config
    (``training.distributed``): one process per GPU, or FSDP, each training its share of every batch.
    """
    rows = read_messages(dataset)
    target = Path(config.output_dir).expanduser()
    if target.exists() and not (target / METADATA).is_file() and any(target.iterdir()):
        raise ConfigError(f"output_dir {target} exists and holds no redpen adapter; choose an empty or new folder")
    model_id, model_dir = config.base_model_dir()
    digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    fingerprint = {
        "dataset": digest,
        "base_model": {"id": model_id, "path": str(model_dir)},
        "settings": _settings(config.to_dict()),
    }
    scratch = scratch_folder(target)
    checkpoint = _resume_point(scratch, fingerprint)
    scratch.mkdir(parents=True, exist_ok=True)
    write_atomic(scratch / TRAINING, json.dumps(fingerprint, indent=2) + "\n")
    log.info("train  %d rows  base %s  %d steps  -> %s", len(rows), model_id, config.max_steps, target)
    try:
        if accelerate_config is None:
            train_in_scratch(dataset, config, scratch, checkpoint, on_log)
        else:
            spec = {
                "dataset": str(dataset),
                "config": config.to_dict(),
                "scratch": str(scratch),
                "checkpoint": str(checkpoint) if checkpoint is not None else None,
            }
            launch(accelerate_config, spec, scratch, on_log)
        metadata = json.loads((scratch / "adapter" / METADATA).read_text(encoding="utf-8"))
        _replace_folder(scratch / "adapter", target, scratch)
    except Exception:  # a failed training leaves nothing; only a kill (or Ctrl-C) keeps checkpoints to resume from
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(scratch)
    resumed = metadata["resumed_from_step"]
    log.info(
        "trained  %d steps  loss %.4f  %.2f steps/s  %d process(es)  -> %s",
        metadata["steps"],
        metadata["final_loss"],
        (metadata["steps"] - (resumed or 0)) / metadata["train_seconds"],
        metadata["processes"],
        target,
    )
    return TrainResult(target, metadata["final_loss"], metadata["steps"], digest, metadata["losses"], resumed)


def train_in_scratch(
    dataset: Path,
    config: LoraSFTConfig,
    scratch: Path,
    checkpoint: Path | None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """The training step of ``train_lora``: train (from ``checkpoint`` if given) and save the adapter with its
    metadata to ``scratch/adapter``.

    Run by one process, or by every process of an accelerate launch: each trains its share of every batch, the
    main one saves and reports progress, and every process's adapter must be the same one (DDP keeps the copies
    equal; FSDP shards one copy, so there it is gathered to be saved).
    """
    from accelerate.utils import gather_object

    rows = read_messages(dataset)
    model_id, model_dir = config.base_model_dir()
    resumed = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else None
    trainer = build_trainer(rows, config, model_dir, scratch / "trainer", [_progress(on_log)])
    if checkpoint is not None:
        log.info("resuming from checkpoint step %d of %d in %s", resumed, config.max_steps, scratch)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    elapsed = time.perf_counter() - started
    # From the trainer's log history, which a resumed run restores from its checkpoint: every step's loss.
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    final_loss = losses[-1]  # logging_first_step: there is always one
    if not math.isfinite(final_loss):
        raise DataError(f"training on {dataset} diverged (loss {final_loss}); lower learning_rate")
    model: Any = trainer.model  # a PeftModel (typed by transformers as a plain module)
    # Every process takes part: under FSDP this gathers the shards, elsewhere it is the process's own copy.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    copies = None if trainer.is_fsdp_enabled else gather_object([_lora_digest(model)])
    if copies is not None and len(set(copies)) > 1:
        raise DataError(f"the {len(copies)} training processes ended with different adapters; the launch is broken")
    if not trainer.is_world_process_zero():
        return
    adapter = scratch / "adapter"
    model.save_pretrained(adapter, state_dict=state)
    metadata: dict[str, Any] = {
        "adapter_sha256": adapter_digest(adapter),  # trained_before reuses only these very weights
        "base_model": {"id": model_id, "path": str(model_dir)},
        "dataset": {"path": str(dataset), "sha256": _sha256(dataset), "rows": len(rows)},
        "steps": trainer.state.global_step,
        "final_loss": final_loss,
        "losses": losses,
        "resumed_from_step": resumed,
        "train_seconds": round(elapsed, 3),
        "device": str(trainer.args.device),
        "processes": trainer.args.world_size,
        "process_adapters": copies,  # each process's LoRA weights' sha256 (None under FSDP: each holds a shard)
        "lora": {k: config.to_dict()[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")},
        "config": config.to_dict(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(adapter / METADATA, json.dumps(metadata, indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lora_digest(model: Any) -> str:
    """sha256 over a model's LoRA weights as this process holds them, in name order."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda named: named[0]):
        if "lora_" in name:
            digest.update(name.encode() + parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _length(tokenizer: Any, messages: list[Message]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence the progress bars that loading weights and datasets.map draw (library code draws none)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    datasets_bars, transformers_bars = not are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            enable_progress_bars()
        if transformers_bars:
            hf_logging.enable_progress_bar()


def _replace_folder(new: Path, target: Path, scratch: Path) -> None:
    """Rename ``new`` to ``target``; an adapter already there is moved aside into ``scratch`` first (and goes
    with it)."""
    if target.exists():
        shutil.rmtree(scratch / "previous", ignore_errors=True)  # left by a run killed between the two renames
        target.rename(scratch / "previous")
    new.rename(target)


def _progress(on_log: Callable[[dict[str, Any]], None] | None) -> TrainerCallback:
    """A callback that logs one line per logging step and relays progress to ``on_log`` (built here so that
    importing this module does not import transformers)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        started = time.perf_counter()
        first_step = 0  # where this run began: a resumed one at its checkpoint's step

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self.first_step = state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_log is not None and state.is_world_process_zero:  # one report per step, however many processes
                on_log({"step": state.global_step, "max_steps": state.max_steps})

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs: dict[str, Any] = kwargs.get("logs") or {}
            if not state.is_world_process_zero:
                return
            if "loss" in logs:
                per_step = (time.perf_counter() - self.started) / max(1, state.global_step - self.first_step)
                eta = timedelta(seconds=round(per_step * (state.max_steps - state.global_step)))
                log.info(
                    "train step %d/%d  loss %.4f  lr %.2e  %.1f s/step  eta %s",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    logs["learning_rate"],
                    per_step,
                    eta,
                )
            if on_log is not None:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    return Progress()

"""LoRA fine-tuning with TRL: a tiny random model trains for a few steps; the adapter is saved whole and loads."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.errors import ConfigError, DataError
from runtime.models.backend import GenerationSettings
from runtime.models.local import LocalBackend
from tests.helpers import build_tiny_model, make_episode, make_run_dir
from training.replay import SFT_JSONL, export_replay
from training.sft_config import LoraSFTConfig
from training.sft_trainer import METADATA, TrainResult, build_trainer, read_messages, train_lora

REPLY = '{"reason": "You guessed.", "guideline": "Check the facts."}'
STEPS = 5


def chat_rows(n: int = 10) -> list[dict[str, Any]]:
    """Short chats (the tiny model has 2048 positions): system, user, then the assistant reply trained on."""
    return [
        {
            "messages": [
                {"role": "system", "content": "Reply with JSON."},
                {"role": "user", "content": f"Why is ({'ABC'[i % 3]}) wrong in question {i}?"},
                {"role": "assistant", "content": REPLY},
            ]
        }
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tiny_model: Path, output_dir: Path, **overrides: Any) -> LoraSFTConfig:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "base_model": str(tiny_model),
        "max_steps": STEPS,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "max_length": 256,
    }
    return LoraSFTConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path, list[dict]]:
    """One short training run that the tests below inspect."""
    folder = tmp_path_factory.mktemp("train")
    dataset = write_rows(folder / "sft.jsonl", chat_rows())
    events: list[dict] = []
    result = train_lora(dataset, tiny_config(tiny_model, folder / "adapters" / "assistant"), on_log=events.append)
    return result, dataset, events


def test_the_loss_is_logged_every_step_and_relayed(trained: tuple[TrainResult, Path, list[dict]]) -> None:
    result, _, events = trained
    assert result.steps == STEPS
    assert len(result.losses) == STEPS and all(math.isfinite(x) and x > 0 for x in result.losses)
    assert result.final_loss == result.losses[-1]
    assert [e["step"] for e in events if set(e) == {"step", "max_steps"}] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in events if "loss" in e] == result.losses
    assert all(e["max_steps"] == STEPS for e in events)


def test_the_adapter_is_saved_whole_with_its_metadata(
    trained: tuple[TrainResult, Path, list[dict]], tiny_model: Path
) -> None:
    result, dataset, _ = trained
    adapter = result.adapter_dir
    assert {"adapter_config.json", "adapter_model.safetensors", METADATA} <= {p.name for p in adapter.iterdir()}
    assert [p.name for p in adapter.parent.iterdir()] == ["assistant"]  # no scratch folder left beside it
    meta = json.loads((adapter / METADATA).read_text())
    assert meta["base_model"] == {"id": "tiny-llama", "path": str(tiny_model)}
    assert meta["dataset"] == {"path": str(dataset), "sha256": result.dataset_hash, "rows": 10}
    assert result.dataset_hash == hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert (meta["steps"], meta["final_loss"], meta["losses"]) == (STEPS, result.final_loss, result.losses)
    assert meta["lora"] == {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    assert meta["config"]["max_steps"] == STEPS and meta["created_at"].endswith("+00:00")


def test_training_moved_the_lora_weights(trained: tuple[TrainResult, Path, list[dict]]) -> None:
    weights = load_file(trained[0].adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    # peft starts every lora_B at zero, so the adapter is a no-op until training moves it.
    assert len(lora_b) == 2 * 4  # 2 layers x q, k, v, o
    assert all(v.abs().max() > 0 for v in lora_b.values())


def collated_rows(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of each row of a collated batch: padded rows (right padding) or padding-free ones (one
    sequence whose position ids restart at 0 at each row)."""
    if "attention_mask" in batch:
        return [
            (ids[: int(mask.sum())], labels[: int(mask.sum())])
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)
        ]
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    return [(batch["input_ids"][0, a:b], batch["labels"][0, a:b]) for a, b in zip(starts, starts[1:], strict=False)]


def assert_loss_on_the_reply_only(trainer: Any, rows: list[dict[str, Any]], end_of_turn: str) -> None:
    """Collate the rows as training does: every prompt label is -100; the reply and its end of turn are trained."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    tokenizer = trainer.processing_class
    for row, (input_ids, labels) in zip(rows, collated_rows(batch), strict=True):
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == -100).all()
        trained_ids = labels[labels != -100]
        assert tokenizer.decode(trained_ids) == row["messages"][-1]["content"] + end_of_turn
        assert torch.equal(trained_ids, input_ids[n_prompt:])


def test_the_loss_is_on_the_assistant_reply_only(tiny_model: Path, tmp_path: Path) -> None:
    rows = chat_rows(2)
    trainer = build_trainer(rows, tiny_config(tiny_model, tmp_path / "a"), tiny_model, tmp_path / "work")
    assert_loss_on_the_reply_only(trainer, rows, "<|end|>")


def test_padding_free_rows_do_not_see_each_other(tiny_model: Path, tmp_path: Path) -> None:
    """Joined into one sequence, each row still attends only to itself: the first step's loss (taken before any
    update) is the padded batch's. Were the rows to see each other, every row after the first would change it."""
    rows = [
        {"messages": [{"role": "user", "content": "Why? " * (1 + 5 * i)}, {"role": "assistant", "content": REPLY}]}
        for i in range(4)
    ]
    dataset = write_rows(tmp_path / "rows.jsonl", rows)
    first = {
        padding_free: train_lora(
            dataset, tiny_config(tiny_model, tmp_path / f"pf-{padding_free}", max_steps=1, padding_free=padding_free)
        ).losses[0]
        for padding_free in (True, False)
    }
    assert first[True] == pytest.approx(first[False], rel=1e-4)


@pytest.mark.slow
def test_with_the_default_model_the_loss_is_on_the_reply_only(tmp_path: Path) -> None:
    """The packaged model's ChatML template splits cleanly into prompt and reply (no generation markers needed)."""
    run = make_run_dir(tmp_path / "run", "s", [make_episode("bbq/Age/1", [(0, False), (1, False)])])
    export_replay([run], tmp_path / "replay")
    rows = read_messages(tmp_path / "replay" / SFT_JSONL)
    config = LoraSFTConfig(output_dir=str(tmp_path / "adapter"))
    _, model_dir = config.base_model_dir()
    trainer = build_trainer(rows, config, model_dir, tmp_path / "work")
    assert_loss_on_the_reply_only(trainer, rows, "<|im_end|>\n")


async def test_the_adapter_loads_in_the_local_backend(
    trained: tuple[TrainResult, Path, list[dict]], tiny_model: Path
) -> None:
    backend = LocalBackend(tiny_model, adapters={"assistant": trained[0].adapter_dir}, device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Why is (C) wrong?"}]
    reply = await backend.generate(messages, GenerationSettings(max_new_tokens=8), adapter="assistant")
    assert reply.usage.completion_tokens > 0
    tuned = await backend.score_options(messages, ['{"reason"', "The answer"], adapter="assistant")
    base = await backend.score_options(messages, ['{"reason"', "The answer"])
    assert tuned != pytest.approx(base, abs=1e-5)  # the adapter changes the model
    await backend.aclose()


def test_training_again_replaces_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    first = write_rows(tmp_path / "first.jsonl", chat_rows(4))
    second = write_rows(tmp_path / "second.jsonl", chat_rows(6))
    config = tiny_config(tiny_model, tmp_path / "adapter", max_steps=1)
    train_lora(first, config)
    result = train_lora(second, config)
    assert json.loads((result.adapter_dir / METADATA).read_text())["dataset"]["rows"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "first.jsonl", "second.jsonl"]


def test_replayed_feedback_trains_as_it_is_exported(tiny_model: Path, tmp_path: Path) -> None:
    """The replay's SFT file goes straight into train_lora."""
    run = make_run_dir(tmp_path / "run", "s", [make_episode(f"bbq/Age/{i}", [(1, False)]) for i in range(3)])
    export_replay([run], tmp_path / "replay")
    assert len(read_messages(tmp_path / "replay" / SFT_JSONL)) == 3
    config = tiny_config(tiny_model, tmp_path / "adapter", max_steps=1, max_length=1024)
    result = train_lora(tmp_path / "replay" / SFT_JSONL, config)
    assert result.steps == 1 and math.isfinite(result.final_loss)


# ---- errors: caught before any training ----------------------------------------------------------------------


def test_a_row_without_a_final_assistant_reply_is_named(tmp_path: Path) -> None:
    rows = chat_rows(3)
    rows[1]["messages"] = rows[1]["messages"][:-1]
    dataset = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=f"{dataset}:2: not a chat ending with the assistant's reply"):
        read_messages(dataset)
    with pytest.raises(DataError, match="does not exist"):
        read_messages(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="has no rows"):
        read_messages(write_rows(tmp_path / "empty.jsonl", []))


def test_rows_longer_than_max_length_are_left_out(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = chat_rows(3)
    rows[1]["messages"][1]["content"] = "Why? " * 200
    trainer = build_trainer(rows, tiny_config(tiny_model, tmp_path / "a", max_length=128), tiny_model, tmp_path / "w")
    assert len(trainer.train_dataset) == 2
    assert "left out 1 of 3 rows longer than max_length=128" in caplog.text
    with pytest.raises(DataError, match="every row is longer than max_length=8"):
        build_trainer(rows, tiny_config(tiny_model, tmp_path / "a", max_length=8), tiny_model, tmp_path / "w")


def test_a_folder_that_is_no_adapter_is_never_overwritten(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    dataset = write_rows(tmp_path / "d.jsonl", chat_rows(2))
    with pytest.raises(ConfigError, match="holds no redpen adapter"):
        train_lora(dataset, tiny_config(tiny_model, tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"r": 0}, "r must be in the range 1<=x<=1024, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be in the range 0<x<=1, got 0.0"),
        ({"max_steps": -1}, "max_steps must be in the range 1<=x<=1000000, got -1"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in the range 0<=x<1, got 1.0"),
        # issue 25, item 6: no upper bounds before
        ({"max_steps": 10**12}, "max_steps must be in the range 1<=x<=1000000"),
        ({"per_device_train_batch_size": 10**9}, "per_device_train_batch_size must be in the range 1<=x<=4096"),
        ({"seed": 2**64}, "seed must be in the range 0<=x<=4294967295"),
        ({"learning_rate": float("nan")}, "learning_rate must be in the range 0<x<=1, got nan"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"base_model": "/nowhere"}, "/nowhere has no config.json"),
    ],
)
def test_bad_settings_are_config_errors(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraSFTConfig(**setting)


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed where CUDA is")
def test_qlora_without_a_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="use_qlora needs a CUDA GPU"):
        LoraSFTConfig(use_qlora=True)


def test_the_config_maps_onto_trl_and_peft(tmp_path: Path) -> None:
    config = LoraSFTConfig(r=8, lora_alpha=16, max_steps=3, max_length=128, padding_free=False)
    sft = config.to_sft_config(tmp_path)
    assert (sft.max_steps, sft.max_length, sft.learning_rate, sft.per_device_train_batch_size) == (3, 128, 2e-4, 4)
    # padding-free (the default): TRL cuts no rows; build_trainer leaves out those past max_length itself
    default = LoraSFTConfig(max_length=128).to_sft_config(tmp_path)
    assert (default.padding_free, default.max_length) == (True, None)
    assert sft.completion_only_loss is True and sft.assistant_only_loss is False
    assert (sft.save_strategy, sft.save_steps, sft.save_total_limit) == ("steps", 5, 2)  # checkpoints to resume from
    assert (sft.logging_first_step, sft.report_to) == (True, [])
    lora = config.to_lora_config()
    assert (lora.r, lora.lora_alpha, lora.task_type) == (8, 16, "CAUSAL_LM")
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_an_adapter_is_reused_only_if_trained_the_same_way(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reuse check covers the data, every training setting, the base model and the weights' hash."""
    from training import trained_before

    dataset = write_rows(tmp_path / "sft.jsonl", chat_rows(4))
    config = tiny_config(tiny_model, tmp_path / "adapter", max_steps=2)
    assert trained_before(dataset, config) is None  # nothing there yet
    caplog.set_level(logging.INFO, logger="training.sft_trainer")
    result = train_lora(dataset, config)
    # One line per logging step (logging_steps=1), for logs and for output that is not a terminal.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step ")]
    assert [line.split("  ")[0] for line in lines] == ["train step 1/2", "train step 2/2"]
    assert re.fullmatch(r"train step 2/2  loss \d+\.\d{4}  lr \S+  \d+\.\d s/step  eta 0:00:00", lines[-1])

    found = trained_before(dataset, config)
    assert found is not None and (found.losses, found.adapter_dir) == (result.losses, result.adapter_dir)
    other_model = build_tiny_model(tmp_path / "other-llama", seed=1)
    for changed in (
        {"learning_rate": 1e-3},
        {"base_model": str(other_model)},
        {"r": 8},
        {"lora_alpha": 16},
        {"target_modules": ["q_proj", "v_proj"]},
        {"max_steps": 3},
        {"max_length": 128},
        {"seed": 1},
    ):
        assert trained_before(dataset, replace(config, **changed)) is None, changed
    assert "not reusing" in caplog.text and "settings" in caplog.text

    other_data = write_rows(tmp_path / "other.jsonl", chat_rows(5))
    assert trained_before(other_data, config) is None

    weights = result.adapter_dir / "adapter_model.safetensors"
    trained_bytes = weights.read_bytes()
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)  # replaced after training
    assert trained_before(dataset, config) is None
    weights.write_bytes(trained_bytes)
    assert trained_before(dataset, config) is not None  # the same bytes again


def test_an_adapter_without_the_settings_on_record_is_trained_again(tiny_model: Path, tmp_path: Path) -> None:
    """Metadata written before the full settings were recorded cannot vouch for them."""
    from training import trained_before

    dataset = write_rows(tmp_path / "sft.jsonl", chat_rows(2))
    config = tiny_config(tiny_model, tmp_path / "adapter", max_steps=1)
    train_lora(dataset, config)
    meta_path = Path(config.output_dir) / METADATA
    meta = json.loads(meta_path.read_text())
    del meta["adapter_sha256"]
    meta_path.write_text(json.dumps(meta))
    assert trained_before(dataset, config) is None

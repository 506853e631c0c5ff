"""Training under accelerate: two CPU processes train one shared LoRA adapter on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from runtime.errors import ConfigError
from tests.helpers import build_tiny_model
from tests.test_sft_trainer import STEPS, chat_rows, tiny_config, write_rows
from training.distributed import SHIPPED, TrainingError, resolve_config
from training.sft_trainer import METADATA, train_lora


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a shared machine's cores


@pytest.mark.slow
def test_two_processes_train_one_shared_adapter(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "tiny")
    dataset = write_rows(tmp_path / "sft.jsonl", chat_rows())
    events: list[dict] = []
    result = train_lora(
        dataset, tiny_config(tiny, tmp_path / "adapter"), on_log=events.append, accelerate_config=resolve_config("ddp")
    )
    meta = json.loads((result.adapter_dir / METADATA).read_text())
    # The shipped DDP config's two processes (on CPU here, gloo), each holding the same adapter at the end.
    assert meta["processes"] == 2
    assert len(meta["process_adapters"]) == 2 and len(set(meta["process_adapters"])) == 1
    assert result.steps == STEPS and len(result.losses) == STEPS and all(math.isfinite(x) for x in result.losses)
    # The main process's progress came back through the launch, step by step with the logged losses.
    assert [e["step"] for e in events if set(e) == {"step", "max_steps"}] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in events if "loss" in e] == result.losses
    # A step is 2 processes x 4 rows, so an epoch of 10 rows takes 2 steps (one process: 3 steps of 4 rows).
    assert [e["epoch"] for e in events if "loss" in e] == [0.5, 1.0, 1.5, 2.0, 2.5]
    lora_b = [v for k, v in load_file(result.adapter_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 8 and all(v.abs().max() > 0 for v in lora_b)  # moved from peft's zero init
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("adapter")] == ["adapter"]  # no scratch left


def test_a_failed_launch_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "tiny")
    dataset = write_rows(tmp_path / "sft.jsonl", chat_rows())
    broken = tmp_path / "broken.yaml"
    broken.write_text((SHIPPED / "ddp.yaml").read_text().replace("num_processes: 2", "num_processes: -1"))
    with pytest.raises(TrainingError, match="num_processes"):
        train_lora(dataset, tiny_config(tiny, tmp_path / "adapter"), accelerate_config=broken)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.training").exists()


def test_configs_are_files_or_shipped_names(tmp_path: Path) -> None:
    assert {p.stem for p in SHIPPED.glob("*.yaml")} == {"one-gpu", "ddp", "fsdp"}
    assert resolve_config("fsdp") == SHIPPED / "fsdp.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("distributed_type: MULTI_GPU\n")
    assert resolve_config(mine) == mine
    with pytest.raises(ConfigError, match="ddp, fsdp, one-gpu"):
        resolve_config("eight-gpus")

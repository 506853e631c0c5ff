"""`redpen bench train` on a tiny random model: every side trains, and tokens are the real ones, padding left out."""

from __future__ import annotations

from pathlib import Path

from runtime.bench.train import train_rate
from tests.helpers import build_tiny_model
from training.sft_config import LoraSFTConfig

SIDES = ("redpen", "bare_trl", "bare_trl_padded")


def test_every_side_trains_on_the_real_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = build_tiny_model(tmp_path / "tiny")
    # Two rows of different lengths, so a padded batch of both holds padding that must not be counted.
    rows = [
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "The answer is (A)."}]}
        for question in ("Who?", "Who was late to the meeting? The older adult or the young man?")
    ]
    config = LoraSFTConfig(base_model=str(model), max_steps=2, per_device_train_batch_size=2, max_length=256)
    result = train_rate(rows, config, tmp_path / "work", repeats=1)

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
    assert lengths[0] < lengths[1]
    for side in SIDES:
        figures = result[side]
        assert figures["tokens"] == 2 * sum(lengths)  # 2 steps of both rows; a padded count would be 2 * 2 * max
        assert figures["train_s"] > 0 and figures["total_s"] >= figures["train_s"]
        assert figures["tok_s"] == round(figures["tokens"] / figures["runs"][0]["train_s"], 1)
        assert figures["final_loss"] > 0 and len(figures["runs"]) == 1
    assert result["redpen"]["final_loss"] == result["bare_trl"]["final_loss"]  # the same training, seed included
    assert (result["rows"], result["steps"], result["batch_size"], result["repeats"]) == (2, 2, 2, 1)
    assert result["redpen_over_bare_train_s"] > 0 and result["padding_free_over_padded_tok_s"] > 0
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["rows.jsonl"]  # no adapter or checkpoint left

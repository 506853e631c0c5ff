"""The rows of the arc_redpen lm-eval task: redpen's ARC examples, rendered as redpen's student sees them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def dataset(**_: Any) -> Any:
    import datasets
    from transformers import AutoTokenizer

    from agents.student import labelled_options, student_messages
    from runtime.data.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(os.environ["REDPEN_LM_EVAL_TOKENIZER"])
    limit = int(os.environ.get("REDPEN_LM_EVAL_LIMIT", "50"))
    examples = load_task("arc", "examine", Path(os.environ["REDPEN_DATA_DIR"]), limit)
    rows = [
        {
            "id": ex.id,
            "context": tokenizer.apply_chat_template(student_messages(ex), add_generation_prompt=True, tokenize=False),
            "choices": labelled_options(ex),
            "gold": ord(ex.target.strip("()")) - ord("A"),
        }
        for ex in examples
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

"""lm-evaluation-harness's ``local-completions`` through ``redpen serve`` scores as ``redpen eval --mc-mode loglik``.

lm-eval asks ``echo=true, max_tokens=1, logprobs=1`` with token-id prompts and sums ``token_logprobs[ctxlen:-1]``:
that holds only when the echoed prompt's log-probs are right and exactly one generated token follows. The task
(tests/lm_eval/arc_redpen.yaml) renders redpen's own ARC items and prompts, so the two accuracies must be equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.data.paths import resolve_data_dir
from runtime.models.default_model import DEFAULT_MODEL_NAME, default_model_dir
from runtime.models.local import LocalBackend
from runtime.server import ServeLimits, build_app
from tests.helpers import running

TASKS = Path(__file__).parent / "lm_eval"
ITEMS = int(os.environ.get("REDPEN_LM_EVAL_LIMIT", "50"))


@pytest.mark.slow
def test_lm_eval_local_completions_accuracy_equals_redpen_loglik(tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["REDPEN_LM_EVAL_TOKENIZER"] = str(default_model_dir())
    os.environ["REDPEN_LM_EVAL_LIMIT"] = str(ITEMS)
    os.environ["REDPEN_DATA_DIR"] = str(resolve_data_dir(None))
    # A scoring run sends prompts as fast as they are answered: on a loaded CPU one batch may take minutes.
    limits = ServeLimits(request_timeout_s=1800)
    with running(build_app(LocalBackend(None, max_batch_size=8), limits=limits)) as base_url:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": DEFAULT_MODEL_NAME,
                "base_url": f"{base_url}/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(default_model_dir()),
                "max_retries": 1,
                "batch_size": 8,  # 8 prompts a request, scored in one forward
            },
            tasks=["arc_redpen"],
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        )
    assert results is not None
    served = results["results"]["arc_redpen"]["acc,none"]
    print(f"lm-eval local-completions acc {served:.4f} on {ITEMS} items")

    out = tmp_path / "eval"
    command = [
        sys.executable,
        "-c",
        "from runtime.cli import main; main()",
        "eval",
        "--task",
        "arc",
        "--limit",
        str(ITEMS),
    ]
    command += ["--mc-mode", "loglik", "--no-cache", "--out", str(out), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    direct = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    assert len(direct) == ITEMS
    print(f"redpen eval --mc-mode loglik: {figures['overall']}")
    assert served == pytest.approx(sum(r["verdict"] == "correct" for r in direct) / ITEMS)

"""Merge a LoRA adapter into its base model, into a new model folder (written whole, or not at all)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def merge_adapter(base_dir: Path, adapter_dir: Path, target: Path) -> Path:
    """Save base + adapter as a plain model folder at ``target``; an existing ``target`` is kept (already merged).

    The folder name should identify its content (the caller puts the adapter's digest in it): the local backend
    names a model by its folder, and the response cache keys replies by that name.
    """
    if (target / "config.json").is_file():
        return target
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(work)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(work)
        work.replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("merged %s into %s -> %s", adapter_dir, base_dir, target)
    return target

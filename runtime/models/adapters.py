"""A LoRA adapter folder named by what it holds, not where it is.

An adapter retrained in place keeps its path but not its answers, so the response cache and the trainer's reuse
check go by this hash instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"


def adapter_digest(folder: Path) -> str:
    """sha256 over the files peft loads from ``folder``: ``adapter_config.json`` and the weights.

    Hashing the weights' bytes is cheap next to loading them (a few MB for a LoRA adapter); other files (the
    trainer's metadata, a README) are left out, since they change no answer.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == ADAPTER_CONFIG or path.suffix in (".safetensors", ".bin"):
            with path.open("rb") as file:
                digest.update(f"{path.name}\0{hashlib.file_digest(file, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()

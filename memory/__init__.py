"""The mistake memory: past mistakes, embedded and stored in Qdrant, retrieved by similarity and filtered by model.

``MistakeMemory(path=...)`` keeps it in a folder (embedded Qdrant Edge, the default); ``MistakeMemory(url=...)`` on a
Qdrant server. ``MistakeMemoryAdapter`` plugs it into any AutoGen agent as an ``autogen_core.memory.Memory``.
"""

from memory.autogen_memory import MistakeMemoryAdapter, format_mistakes
from memory.embed import Embedder, HashingEmbedder, TextEmbedder, packaged_model_path
from memory.record import MistakeRecord, Outcome, make_record, normalise_query, record_id
from memory.store import FILTER_FIELDS, Hit, MistakeMemory, RecordFilter

__all__ = [
    "FILTER_FIELDS",
    "Embedder",
    "HashingEmbedder",
    "Hit",
    "MistakeMemory",
    "MistakeMemoryAdapter",
    "MistakeRecord",
    "RecordFilter",
    "Outcome",
    "TextEmbedder",
    "format_mistakes",
    "make_record",
    "normalise_query",
    "packaged_model_path",
    "record_id",
]

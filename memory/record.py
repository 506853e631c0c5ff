"""The mistake record: one wrong answer, why it was wrong, and the guideline that should prevent it next time."""

import json
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Outcome = Literal["corrected", "uncorrected"]

# Fixed namespace, so the same mistake gets the same id on every machine and in every run.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "redpen/mistake-memory")


def normalise_query(text: str) -> str:
    """Lowercase, collapse runs of whitespace to one space, strip.

    >>> normalise_query("  What is\\n  2 + 2?\\t")
    'what is 2 + 2?'
    """
    return " ".join(text.lower().split())


def record_id(model_id: str, source: str, task: str, query: str, gold: str, tenant: str | None = None) -> str:
    """Deterministic UUID5 of what makes a mistake distinct: the student, the source, the task it was gathered
    under, the normalised query and the gold answer. Re-gathering the same item never duplicates a mistake, and
    the same item under another task (``bbq`` and ``bbq/Age``), or the same input with another gold, is another.

    >>> a = record_id("qwen", "gsm8k", "gsm8k", "What is 2+2?", "4")
    >>> a == record_id("qwen", "gsm8k", "gsm8k", "  what IS 2+2? ", "4")
    True
    >>> a == record_id("llama", "gsm8k", "gsm8k", "What is 2+2?", "4")
    False
    >>> record_id("q", "bbq/Age", "bbq", "Who?", "(B)") == record_id("q", "bbq/Age", "bbq/Age", "Who?", "(B)")
    False
    >>> record_id("q", "s", "t", "Pick one.", "(A)") == record_id("q", "s", "t", "Pick one.", "(B)")
    False
    >>> a
    '4d8a0d41-2776-5228-996f-a1b4c181d701'

    A served tenant's mistake is its own: two tenants missing the same question make two records.

    >>> record_id("q", "s", "t", "Who?", "(B)", tenant="acme") == record_id("q", "s", "t", "Who?", "(B)", tenant="zeta")
    False
    """
    # JSON of a list keeps the parts apart: ("a b", "c") and ("a", "b c") must not collide.
    parts = [model_id, source, task, normalise_query(query), gold.strip()]
    if tenant is not None:  # appended only when set, so every record gathered without tenants keeps its id
        parts.append(tenant)
    key = json.dumps(parts, ensure_ascii=False)
    return str(uuid.uuid5(_NAMESPACE, key))


class MistakeRecord(BaseModel):
    """One gathered mistake, as stored in the mistake memory (the payload of one Qdrant point)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="record_id(model_id, source, task, query, gold); build records with make_record",
    )
    model_id: str = Field(description="the student model that made the mistake")
    source: str = Field(description="benchmark / dataset the question came from, e.g. 'bbh/date_understanding'")
    task: str = Field(
        description="the task it was gathered under, as given to --task (e.g. 'bbq', 'bbh/salam16', 'gsm8k') or "
        "the stem of a bring-your-own JSONL file"
    )
    query: str = Field(description="the question as the student saw it")
    wrong_answer: str = Field(description="the student's wrong answer")
    gold: str = Field(description="the gold answer; never shown to the student")
    reason: str = Field(description="the study assistant's explanation of the error")
    guideline: str = Field(description="advice for similar questions; must not reveal the answer")
    outcome: Outcome = Field(description="whether the student got it right within the round limit")
    rounds: int = Field(ge=0, description="feedback rounds used")
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    absorbed_into: str | None = Field(
        None,
        description="the fine-tuned model that now answers this right without guidance (`redpen instruct "
        "--strategy memory`); retrieval can skip such records",
    )
    tenant: str | None = Field(
        None,
        description="the served tenant (an API key's owner, `redpen serve`) whose mistake this is; a tenant's "
        "searches see only its own records; None for mistakes gathered outside a server",
    )

    @classmethod
    def make(
        cls,
        *,
        model_id: str,
        source: str,
        task: str,
        query: str,
        wrong_answer: str,
        gold: str,
        reason: str,
        guideline: str,
        outcome: Outcome,
        rounds: int,
        created_at: datetime | None = None,
        absorbed_into: str | None = None,
        tenant: str | None = None,
    ) -> "MistakeRecord":
        """Build a record whose id is computed from model_id, source, task, query, gold (and tenant)."""
        return cls(
            id=record_id(model_id, source, task, query, gold, tenant),
            model_id=model_id,
            source=source,
            task=task,
            query=query,
            wrong_answer=wrong_answer,
            gold=gold,
            reason=reason,
            guideline=guideline,
            outcome=outcome,
            rounds=rounds,
            created_at=created_at or datetime.now(UTC),
            absorbed_into=absorbed_into,
            tenant=tenant,
        )


make_record = MistakeRecord.make

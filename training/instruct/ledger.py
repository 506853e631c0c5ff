"""The per-item ledger: each evaluation item's verdict under every condition, and who learned and forgot what.

The paper's rates (LLMs-as-Instructors, Figure 5): *learned* = items right now that were wrong before, over
|D_eval|; *forgotten* = items wrong now that were right before, over |D_eval|. "Before" is the condition a model
was trained from: the base for iteration 1, iteration i-1 for iteration i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runtime.data.records import ItemResult
from runtime.report import Change


def change(before: Mapping[str, bool], after: Mapping[str, bool]) -> Change:
    """Learned and forgotten items between two conditions, paired by item id (both must cover the same items).

    >>> c = change({"a": False, "b": True, "c": True}, {"a": True, "b": False, "c": True})
    >>> (c.learned, c.forgotten, round(c.learned_rate, 3))
    (1, 1, 0.333)
    """
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))[:3]
        raise ValueError(f"the two conditions cover different items (e.g. {missing})")
    learned = sum(after[i] and not before[i] for i in before)
    forgotten = sum(before[i] and not after[i] for i in before)
    return Change(len(before), learned, forgotten)


def ledger_rows(
    verdicts: Mapping[str, Mapping[str, Mapping[str, ItemResult]]], order: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (benchmark, item): its gold and, per condition in ``order``, the verdict and predicted answer.

    ``verdicts[benchmark][condition][item_id]`` is that condition's result record for the item.
    """
    rows = []
    for benchmark, by_condition in verdicts.items():
        first = next(iter(by_condition.values()))
        for item_id, record in first.items():
            row: dict[str, Any] = {"benchmark": benchmark, "id": item_id, "gold": record.target}
            for condition in order:
                if condition in by_condition:
                    r = by_condition[condition][item_id]
                    row[condition] = {"verdict": r.verdict, "predicted": r.predicted}
            rows.append(row)
    return rows

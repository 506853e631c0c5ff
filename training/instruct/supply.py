"""Data supply for one iteration: training rows from the current model's results on the selection.

- ``replay``: the wrong cases themselves with their gold (GSM8K's worked solution, the gold option otherwise), with
  two remedies for the answer-prior shift that error-only rows cause (a model that answers (C) most of the time is
  wrong mostly on items whose gold is not (C), so error rows teach "not (C)"): ``contrast`` adds each wrong case's k
  nearest correct cases of the same source, and ``balance`` draws the rows so their golds follow the selection's
  gold distribution.
- ``plain``: random rows of the selection with their gold (the fine-tuning baseline).
- ``le`` / ``lec`` / ``augment``: samples written by the instructor (agents/instructor.py).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.student import student_messages
from memory.embed import TextEmbedder
from runtime.data.kinds import kind_of
from runtime.data.tasks import Example

Row = dict[str, Any]


@dataclass(frozen=True)
class RowStyle:
    """How a gold row is written. One style serves every condition of a run (the strategy and its baselines), so
    that conditions differ only in which items they train on.

    A reply that is only a letter gives the model one token to learn from, and that token is where a letter prior
    lives: ``name_option`` has the reply name the chosen option's text first, so the decision is made on the content
    and the letter is copied from the options after it. ``shuffle_options`` writes each multiple-choice row with its
    options in a random order (the gold relettered): the rows' letters are then uniform whatever items were chosen,
    so training on a model's errors cannot teach "not the letter it favours".
    """

    name_option: bool = False
    shuffle_options: bool = False

    def row(self, example: Example, origin: str, rng: random.Random) -> Row:
        kind = kind_of(example)
        if self.shuffle_options:
            example = kind.shuffled(example, rng)
        return training_row(example, kind.gold_reply(example, self.name_option), origin)


def training_row(example: Example, reply: str, origin: str) -> Row:
    """A chat row in the student's own prompt format; ``origin`` says where the row came from (kept for reports)."""
    return {
        "messages": [*student_messages(example), {"role": "assistant", "content": reply}],
        "id": example.id,
        "source": example.source,
        "target": example.target,
        "origin": origin,
    }


def nearest_correct(
    wrong: Sequence[Example], correct: Sequence[Example], embedder: TextEmbedder, k: int
) -> dict[str, list[Example]]:
    """Each wrong case's k most similar correct cases from the same source (question embeddings), as in LEC."""
    by_source: dict[str, list[Example]] = defaultdict(list)
    for c in correct:
        by_source[c.source].append(c)
    vectors = {}
    for source, cases in by_source.items():
        vectors[source] = embedder.embed([c.input for c in cases])
    result: dict[str, list[Example]] = {}
    wrong_vectors = embedder.embed([w.input for w in wrong]) if wrong else np.zeros((0, 1))
    for w, v in zip(wrong, wrong_vectors, strict=True):
        pool = by_source.get(w.source, [])
        if not pool:
            result[w.id] = []
            continue
        order = np.argsort(-(vectors[w.source] @ v))[:k]
        result[w.id] = [pool[j] for j in order]
    return result


def balanced(rows: Sequence[Row], gold_share: dict[str, float], rng: random.Random) -> list[Row]:
    """The largest subset of ``rows`` whose gold answers follow ``gold_share``, drawn at random, without repeats.

    >>> rows = [{"target": t} for t in "AAAAAAB"]
    >>> sorted(r["target"] for r in balanced(rows, {"A": 0.5, "B": 0.5}, random.Random(0)))
    ['A', 'B']
    """
    by_gold: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_gold[r["target"]].append(r)
    shares = {g: s for g, s in gold_share.items() if s > 0}
    n = min((len(by_gold.get(g, [])) / s for g, s in shares.items()), default=0.0)
    kept: list[Row] = []
    for g, s in shares.items():
        pool = list(by_gold.get(g, []))
        rng.shuffle(pool)
        kept += pool[: int(math.floor(n * s + 1e-9))]
    rng.shuffle(kept)
    return kept


def replay_rows(
    selection: Sequence[Example],
    verdicts: dict[str, str],
    *,
    contrast: bool,
    balance: bool,
    k: int,
    budget: int,
    embedder: TextEmbedder,
    rng: random.Random,
    style: RowStyle = RowStyle(),
) -> tuple[list[Row], dict[str, Any]]:
    """Rows from the wrong cases (and their contrast sets), with the counts behind them."""
    wrong = [e for e in selection if verdicts[e.id] != "correct"]
    correct = [e for e in selection if verdicts[e.id] == "correct"]
    rows = [style.row(e, "wrong", rng) for e in wrong]
    contrast_ids: set[str] = set()
    if contrast and correct:
        for neighbours in nearest_correct(wrong, correct, embedder, k).values():
            contrast_ids.update(c.id for c in neighbours)
        rows += [style.row(e, "contrast", rng) for e in correct if e.id in contrast_ids]
    before_balance = len(rows)
    # Only options have a prior to follow: a number's, a text's or a program's gold is nearly always its own, and
    # balancing those rows would keep almost none. So only the multiple-choice rows are balanced, against the
    # multiple-choice part of the selection; the others pass through.
    choice = [e for e in selection if kind_of(e).multiple_choice]
    balance = balance and bool(choice)
    if balance:
        lettered = {e.id: kind_of(e).multiple_choice for e in selection}
        gold = Counter(e.target for e in choice)
        others = [r for r in rows if not lettered[r["id"]]]
        rows = balanced(
            [r for r in rows if lettered[r["id"]]], {g: c / len(choice) for g, c in gold.items()}, rng
        )  # already shuffled
        if others:
            rows += others
            rng.shuffle(rows)
    else:
        rng.shuffle(rows)
    rows = rows[:budget]
    counts = {
        "wrong_cases": len(wrong),
        "contrast_cases": len(contrast_ids),
        "rows_before_balance": before_balance,
        "balanced": balance,
        "rows": len(rows),
    }
    return rows, counts


def plain_rows(selection: Sequence[Example], n: int, rng: random.Random, style: RowStyle = RowStyle()) -> list[Row]:
    """``n`` random rows of the selection with their gold, whatever the model answered."""
    chosen = rng.sample(list(selection), min(n, len(selection)))
    return [style.row(e, "random", rng) for e in chosen]


def source_items(rows: Sequence[Row]) -> list[str]:
    """The selection items a set of rows was made from: an instructor's sample counts as its case (``id/genN``)."""
    return sorted({str(r["id"]).split("/gen")[0] for r in rows})


def samples_per_case(budget: int, cases: int) -> int:
    """The paper's rule: ceil(budget / #wrong cases) + 1 samples asked per case (some will be dropped).

    >>> samples_per_case(400, 150), samples_per_case(400, 1000)
    (4, 2)
    """
    return math.ceil(budget / max(cases, 1)) + 1
